"""The SOCKS5 entry's decisions (RFC 1928, RFC 1929): pure, no mitmproxy.

A SOCKS5 client gets exactly what a CONNECT gets: the gateway turns its request into
the CONNECT it means (:func:`connect_head`), lets every Datorus decision judge that
CONNECT on the tunnel path, and turns the answer back into a SOCKS5 reply
(:func:`reply_for`). So auth, acceptable use, limits, metering, egress and sessions
each keep one home; this module only translates.

Method selection (:func:`choose_method`): a client that offers username/password is
judged by its credentials, as an HTTP request that carries ``Proxy-Authorization``
is; one that offers only "no authentication" is let in only from an allow-listed
address (it then runs as that address's credential), else it gets 0xFF.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Final

VERSION: Final = 0x05
NO_AUTH: Final = 0x00
USER_PASSWORD: Final = 0x02
NO_ACCEPTABLE: Final = 0xFF

ATYP_IPV4: Final = 0x01
ATYP_DOMAIN: Final = 0x03
ATYP_IPV6: Final = 0x04

# RFC 1928 section 6, REP
SUCCEEDED: Final = 0x00
GENERAL_FAILURE: Final = 0x01
NOT_ALLOWED: Final = 0x02
NETWORK_UNREACHABLE: Final = 0x03
HOST_UNREACHABLE: Final = 0x04
CONNECTION_REFUSED: Final = 0x05
TTL_EXPIRED: Final = 0x06
COMMAND_NOT_SUPPORTED: Final = 0x07
ADDRESS_TYPE_NOT_SUPPORTED: Final = 0x08

# RFC 1929: the sub-negotiation's status (any non-zero status is a failure)
AUTH_OK: Final = b"\x01\x00"
AUTH_FAILED: Final = b"\x01\x01"

# a domain name as a CONNECT authority may carry it: letters, digits, '-', '_' and dots
_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_.])?")


def choose_method(offered: bytes, allow_listed: bool) -> int:
    """The method the gateway picks among those the client *offered*.

    >>> choose_method(b"\\x00\\x02", True)
    2
    >>> choose_method(b"\\x00", True)
    0
    >>> choose_method(b"\\x00", False)
    255
    """
    if USER_PASSWORD in offered:
        return USER_PASSWORD
    if NO_AUTH in offered and allow_listed:
        return NO_AUTH
    return NO_ACCEPTABLE


def reply(code: int) -> bytes:
    """A SOCKS5 reply with *code* and an unspecified bound address (0.0.0.0:0).

    >>> reply(SUCCEEDED).hex()
    '05000001000000000000'
    """
    return bytes((VERSION, code, 0x00, ATYP_IPV4)) + b"\x00\x00\x00\x00\x00\x00"


def authority(atyp: int, host: str, port: int) -> str | None:
    """``host:port`` as a CONNECT request line carries it, or None when *host* cannot be one.

    IPv6 literals go in brackets; a domain name (ATYP 3) must look like one (no spaces,
    control characters or anything else that could break the request line).

    >>> authority(ATYP_IPV6, "::1", 443)
    '[::1]:443'
    >>> authority(ATYP_DOMAIN, "Example.COM", 80)
    'Example.COM:80'
    >>> authority(ATYP_DOMAIN, "evil.com\\r\\nX: y", 80) is None
    True
    """
    if not 0 < port < 65536:
        return None
    if atyp == ATYP_IPV6:
        return f"[{ipaddress.IPv6Address(host)}]:{port}"
    if atyp == ATYP_IPV4:
        return f"{ipaddress.IPv4Address(host)}:{port}"
    if _NAME.fullmatch(host) is None:
        return None
    return f"{host}:{port}"


def connect_head(target: str, username: str | None, password: str | None) -> bytes:
    """The CONNECT request a SOCKS5 request for *target* (``host:port``) stands for.

    With credentials (RFC 1929) it carries them as ``Proxy-Authorization: Basic``,
    username options included, so the CONNECT is judged exactly as an HTTP client's
    would be; without (an allow-listed client) it carries none.

    >>> for line in connect_head("example.com:443", "u-session-a", "p:w").split(b"\\r\\n"):
    ...     print(line.decode())
    CONNECT example.com:443 HTTP/1.1
    Host: example.com:443
    Proxy-Authorization: Basic dS1zZXNzaW9uLWE6cDp3
    <BLANKLINE>
    <BLANKLINE>
    """
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def reply_for(status: int, code: str, reason: str = "") -> int:
    """The SOCKS5 reply for the gateway's answer to the CONNECT (CONTRACT section 2).

    Refusals by policy (auth, acceptable use, rate limit, tunnel cap, balance,
    suspension, an unknown lease) are 0x02 "not allowed by ruleset"; an upstream that
    refused the connection 0x05, one that could not be reached (unresolvable, no
    healthy egress, reset) 0x04; a timeout 0x06; anything else (a stopping gateway, a
    request the gateway could not parse) 0x01.

    >>> reply_for(200, "")
    0
    >>> reply_for(403, "AUP_VIOLATION")
    2
    >>> reply_for(502, "UPSTREAM_FAILED", "Connection refused")
    5
    >>> reply_for(502, "UPSTREAM_FAILED", "[Errno 111] Connect call failed ('127.0.0.1', 1)")
    5
    >>> reply_for(502, "UPSTREAM_FAILED", "dns_resolution_failed")
    4
    >>> reply_for(504, "GATEWAY_TIMEOUT")
    6
    """
    if status == 200:
        return SUCCEEDED
    if code == "GATEWAY_TIMEOUT" or status == 504:
        return TTL_EXPIRED
    if code == "UPSTREAM_FAILED" or status == 502:
        refused = "refused" in reason.lower() or "errno 111]" in reason.lower()  # ECONNREFUSED
        return CONNECTION_REFUSED if refused else HOST_UNREACHABLE
    if 400 < status < 500:
        return NOT_ALLOWED
    return GENERAL_FAILURE  # 400, 503, or no answer at all
