"""Reading a judge's answer and grading a proxy's anonymity from it (pure).

A judge answers the address it saw the request come from and the headers it
received, as JSON ``{"ip": ..., "headers": {...}}`` (Datorus's own ``GET /judge``;
httpbin's ``origin`` is read too) or as a bare address. Grading looks only at the
headers the checker did not send itself (the proxy added them):

- ``transparent``: one of them carries one of the gateway's own addresses (the proxy
  passes on who is behind it);
- ``anonymous``: one of them says a proxy is in the way (``Via``, ``X-Forwarded-For``,
  ``Forwarded`` ...), but none carries our address;
- ``elite``: none does.

>>> grade({"Host": "judge", "Via": "1.1 squid"}, {"198.51.100.7"}, SENT)
'anonymous'
>>> grade({"X-Forwarded-For": "198.51.100.7"}, {"198.51.100.7"}, SENT)
'transparent'
>>> grade({"Host": "judge", "User-Agent": "datorus-check"}, {"198.51.100.7"}, SENT)
'elite'

When the gateway's own addresses are unknown, an address in a proxy header other
than the exit's counts as ours (the grade the pool used before it knew them).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

# headers by which a proxy says it is one, or says for whom it acts
PROXY_HEADERS = frozenset(
    {
        "via",
        "forwarded",
        "x-forwarded-for",
        "x-real-ip",
        "client-ip",
        "x-client-ip",
        "x-proxy-id",
        "proxy-connection",
        "x-bluecoat-via",
        "x-originating-ip",
        "true-client-ip",
        "x-cluster-client-ip",
        "proxy-client-ip",
        "wl-proxy-client-ip",
    }
)
# what the checker itself sends the judge (never counted as the proxy's)
SENT = frozenset({"host", "user-agent", "accept", "connection", "proxy-authorization"})
_SPLIT = re.compile(r"[\s,;=\"]+")


@dataclass(frozen=True, slots=True)
class JudgeAnswer:
    """The address the judge saw (None if it said none) and the headers it echoed
    (names in lower case; None if it echoed none)."""

    ip: str | None
    headers: dict[str, str] | None


def _address(token: str) -> str | None:
    """*token* as a normalised IP address (``[v6]:port``, ``v4:port`` and quotes
    allowed), or None."""
    t = token.strip("'\"")
    if t.startswith("["):
        t = t[1:].partition("]")[0]
    elif t.count(":") == 1:  # IPv4 with a port
        t = t.partition(":")[0]
    try:
        return str(ipaddress.ip_address(t))
    except ValueError:
        return None


def addresses_in(value: str) -> set[str]:
    """The IP addresses a header value names.

    >>> sorted(addresses_in('for="[2001:db8::1]:4711";proto=http, for=192.0.2.60:80'))
    ['192.0.2.60', '2001:db8::1']
    """
    found = set()
    for token in _SPLIT.split(value):
        ip = _address(token) if token else None
        if ip is not None:
            found.add(ip)
    return found


def is_proxy_header(name: str) -> bool:
    """True for a header by which a proxy reveals itself (any ``X-Forwarded-*`` too)."""
    n = name.lower()
    return n in PROXY_HEADERS or n.startswith("x-forwarded-")


def grade(
    headers: Mapping[str, str],
    own: Collection[str],
    sent: Collection[str] = SENT,
    exit_ip: str | None = None,
) -> str:
    """``transparent``, ``anonymous`` or ``elite`` from the headers a judge received.

    *own*: the gateway's own addresses; *sent*: the header names the checker sent
    (lower case), left out; *exit_ip*: the address the judge saw, used only while
    *own* is empty.
    """
    added = {k.lower(): str(v) for k, v in headers.items() if k.lower() not in sent}
    mine = {a for a in (_address(x) for x in own) if a is not None}
    proxy = {k: v for k, v in added.items() if is_proxy_header(k)}
    for name, value in added.items():
        named = addresses_in(value)
        if mine and named & mine:
            return "transparent"
        if not mine and name in proxy and named - {_address(exit_ip or "")}:
            return "transparent"
    return "anonymous" if proxy else "elite"


def read_judge(body: bytes) -> JudgeAnswer:
    """What a judge's body says: JSON ``{"ip"|"origin"|"exit_ip"|"address", "headers"}``
    or a bare address.

    >>> read_judge(b'{"origin": "203.0.113.9, 10.0.0.1", "headers": {"Via": "x"}}')
    JudgeAnswer(ip='203.0.113.9', headers={'via': 'x'})
    >>> read_judge(b"2001:db8::5\\n")
    JudgeAnswer(ip='2001:db8::5', headers=None)
    """
    text = body.decode("utf-8", "replace").strip()
    bare = _address(text)
    if bare is not None:
        return JudgeAnswer(bare, None)
    try:
        data = json.loads(text)
    except ValueError:
        return JudgeAnswer(None, None)
    if not isinstance(data, dict):
        return JudgeAnswer(None, None)
    ip = None
    for key in ("ip", "origin", "exit_ip", "address"):
        v = data.get(key)
        if isinstance(v, str):
            ip = _address(v.split(",")[0].strip())
            if ip is not None:
                break
    raw = data.get("headers")
    headers = None
    if isinstance(raw, dict):
        headers = {
            str(k).lower(): ", ".join(map(str, v)) if isinstance(v, list) else str(v)
            for k, v in raw.items()
        }
    return JudgeAnswer(ip, headers)
