"""A proxy a list names: typed and validated when it is made, whoever makes it.

``FoundProxy`` checks and normalises its fields in its constructor, so a parser (a
shipped one or a third-party plugin) cannot hand the importer a bad entry::

    >>> p = FoundProxy("SOCKS5", "Proxy.Example.COM", 1080, "alice", "s3cret", "de")
    >>> p.protocol, p.host, p.port, p.country
    ('socks5', 'proxy.example.com', 1080, 'DE')
    >>> p   # credentials never show in a repr (logs, tracebacks)
    FoundProxy(protocol='socks5', host='proxy.example.com', port=1080, country='DE')
    >>> FoundProxy("http", "2001:0db8::0001", 8080).public_url()
    'http://[2001:db8::1]:8080'
    >>> FoundProxy("http", "10.0.0.1", 70000)
    Traceback (most recent call last):
    ...
    datorus_core.sources.found.InvalidEntry: the port must be 1-65535

An ``InvalidEntry`` message says what is wrong and never repeats the value (a line may
carry a password).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import quote

from ..egress import COUNTRY_RE

PROTOCOLS = ("http", "https", "socks4", "socks5")
MAX_CREDENTIAL_BYTES = 255  # SOCKS5's limit (RFC 1929), in UTF-8 bytes
# a DNS label (RFC 1123): letters, digits and hyphens, not at either end, 1-63 of them
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_DOTTED_DIGITS = re.compile(r"[0-9.]+")
# C0 and C1 controls and DEL: envelope.has_control's set, as one regex (a list may have
# a million entries)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class InvalidEntry(ValueError):
    """One entry of a list is not a usable proxy; the message names the reason only."""


def normalize_host(host: object) -> str:
    """*host* as a lower-case hostname, a dotted IPv4 or a compressed IPv6 (no brackets).

    >>> normalize_host("[2001:DB8:0::1]"), normalize_host("Example.ORG")
    ('2001:db8::1', 'example.org')
    >>> normalize_host("999.1.1.1")
    Traceback (most recent call last):
    ...
    datorus_core.sources.found.InvalidEntry: the host is not a valid IPv4 address
    """
    if not isinstance(host, str) or not host:
        raise InvalidEntry("the host is missing")
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in h:
        if "%" in h:  # a zone id names an interface of the box that wrote the list
            raise InvalidEntry("the host is an IPv6 address with a zone id")
        try:
            return ipaddress.IPv6Address(h).compressed
        except ValueError:
            raise InvalidEntry("the host is not a valid IPv6 address") from None
    if _DOTTED_DIGITS.fullmatch(h):
        try:
            return str(ipaddress.IPv4Address(h))
        except ValueError:
            raise InvalidEntry("the host is not a valid IPv4 address") from None
    h = h.lower()
    labels = h.split(".")
    if len(h) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidEntry("the host is not a valid hostname or IP address")
    if labels[-1].isdigit():  # "1.2.3.x4" is neither a name (RFC 3696) nor an address
        raise InvalidEntry("the host is not a valid hostname or IP address")
    return h


def _credential(what: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEntry(f"the {what} must be text")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_CREDENTIAL_BYTES:
        raise InvalidEntry(f"the {what} is longer than {MAX_CREDENTIAL_BYTES} bytes")
    if _CONTROL.search(value):  # CR/LF would split a header or a log line
        raise InvalidEntry(f"the {what} holds a control character")
    return value


@dataclass(frozen=True, slots=True)
class FoundProxy:
    """One upstream proxy a list names (validated and normalised on construction)."""

    protocol: str  # http | https | socks4 | socks5
    host: str  # hostname, IPv4 or IPv6 (no brackets)
    port: int  # 1-65535
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    country: str | None = None  # ISO 3166-1 alpha-2, upper case

    def __post_init__(self) -> None:
        proto = self.protocol.lower() if isinstance(self.protocol, str) else None
        if proto not in PROTOCOLS:
            raise InvalidEntry("the protocol must be http, https, socks4 or socks5")
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidEntry("the port must be 1-65535")
        user = _credential("username", self.username)
        pw = _credential("password", self.password)
        if user == "":
            raise InvalidEntry("the username is empty")
        if user is None and pw is not None:
            raise InvalidEntry("a password needs a username")
        country = self.country
        if country is not None:
            if not isinstance(country, str) or not COUNTRY_RE.fullmatch(country):
                raise InvalidEntry("the country must be an ISO 3166-1 alpha-2 code")
            country = country.upper()
        object.__setattr__(self, "protocol", proto)
        object.__setattr__(self, "host", normalize_host(self.host))
        object.__setattr__(self, "country", country)

    @property
    def key(self) -> tuple[str, str, int, str | None]:
        """What makes two entries the same proxy: protocol, host, port and username."""
        return (self.protocol, self.host, self.port, self.username)

    def _netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def url(self) -> str:
        """``protocol://[user:pass@]host:port``, credentials percent-encoded (for the pool)."""
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="") + ":" + quote(self.password or "", safe="") + "@"
        return f"{self.protocol}://{auth}{self._netloc()}"

    def public_url(self) -> str:
        """The URL with the password hidden (for lists and logs)."""
        if self.username is None:
            return f"{self.protocol}://{self._netloc()}"
        return f"{self.protocol}://{quote(self.username, safe='')}:***@{self._netloc()}"
