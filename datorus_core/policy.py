"""The acceptable-use policy: which proxy destinations the gateway may connect to.

This is the gateway's SSRF guard. It is pure: no mitmproxy, no I/O, no DNS. The gateway
uses it in two steps::

    host = classify_host(raw_host)    # an IP (any spelling) or a normalized name
    if isinstance(host, str):
        denial = policy.check_name(host, port)        # before resolving
        if denial is None:
            addresses = resolve(host)                 # the gateway's own DNS
            denial = policy.check_addresses(addresses, port)
    else:
        denial = policy.check_address(host, port)
    # ... then connect only to an address that was checked.

Addresses are judged as the kernel would route them: an IPv6 address that embeds an IPv4
one (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, 6to4 ``2002::/16`` and
NAT64 ``64:ff9b::/96``) is judged by the embedded IPv4 address, for the built-in denials,
the operator's allow rules and the gateway's own sockets alike. Operator deny rules match
either form, and an operator rule inside ``::ffff:0:0/96`` is read as the IPv4 rule it maps.

Internally an address is a plain ``int`` and every rule table is grouped by prefix length,
so a check costs one dict lookup per distinct prefix length rather than one per rule.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_PORT = 65535
_ALL4 = (1 << 32) - 1

# --------------------------------------------------------------------------- IP literals

_HEX_DIGITS = re.compile(r"[0-9a-fA-F]+")
_OCT_DIGITS = re.compile(r"[0-7]+")
_DEC_DIGITS = re.compile(r"[0-9]+")
# RFC 6874 zone ids are unreserved characters or percent-encodings.
_ZONE_ID = re.compile(r"[A-Za-z0-9._~%-]+")
_TOO_BIG = 1 << 40  # stands for any number far beyond 32 bits without parsing it


def _ipv4_number(part: str) -> int | None:
    """One part of an inet_aton / WHATWG IPv4 literal; None if it is not a number at all.

    ``0x``/``0X`` starts a hexadecimal number (``0x`` alone is 0, as in the WHATWG URL
    standard), another leading ``0`` an octal one, anything else is decimal. Only ASCII
    digits count: ``int()`` would also take underscores, signs, spaces and Unicode digits.
    Huge values come back as ``_TOO_BIG`` so that no long string is ever converted.
    """
    if part[:2] in ("0x", "0X"):
        digits = part[2:]
        if digits and not _HEX_DIGITS.fullmatch(digits):
            return None
        base = 16
    elif len(part) > 1 and part[0] == "0":
        digits = part[1:]
        if not _OCT_DIGITS.fullmatch(digits):
            return None
        base = 8
    else:
        if not _DEC_DIGITS.fullmatch(part):
            return None
        digits, base = part, 10
    digits = digits.lstrip("0")
    if len(digits) > 12:
        return _TOO_BIG
    return int(digits, base) if digits else 0


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Parse an inet_aton-style IPv4 literal (1 to 4 parts, one trailing dot allowed)."""
    if host.endswith("."):
        host = host[:-1]
    parts = host.split(".")
    if len(parts) > 4:
        return None
    values: list[int] = []
    for part in parts:
        value = _ipv4_number(part)
        if value is None:
            return None
        values.append(value)
    *head, last = values
    # a -> 32 bits; a.b -> a.(24 bits); a.b.c -> a.b.(16 bits); a.b.c.d -> four octets.
    if last >= 1 << (8 * (5 - len(values))) or any(v > 255 for v in head):
        return None
    for i, v in enumerate(head):
        last |= v << (24 - 8 * i)
    return ipaddress.IPv4Address(last)


def _parse_ipv6(text: str) -> ipaddress.IPv6Address | None:
    """Parse an IPv6 literal, dropping a ``%zone`` suffix."""
    addr, sep, zone = text.partition("%")
    if sep and not _ZONE_ID.fullmatch(zone):
        return None
    try:
        return ipaddress.IPv6Address(addr)
    except ValueError:
        return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """Return the IP address *host* spells, in any spelling, or None if it spells none.

    Accepted: dotted quads, bracketed or bare IPv6 (zone ids stripped), and every form
    ``inet_aton`` and browsers take for IPv4: a single decimal, hex (``0x7f000001``) or
    octal number, parts in hex or octal (``0x7f.0.0.01``), short forms (``127.1`` is
    127.0.0.1, ``127.0.1`` too), and one trailing dot. Out-of-range values
    (``256.0.0.1``, ``0x1ffffffff``) and surrounding whitespace give None. The parser is
    written out rather than borrowed from ``socket.inet_aton``, which on some platforms
    accepts trailing garbage after a space.
    """
    if not host or not host.isascii():
        return None
    if host[0] == "[":
        return _parse_ipv6(host[1:-1]) if host[-1] == "]" else None
    if ":" in host:
        return _parse_ipv6(host)
    return _parse_ipv4(host)


# ------------------------------------------------------------------------------ host names

_NAME_CHARS = re.compile(r"[a-z0-9_.-]+")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def _to_ascii_name(host: str) -> str:
    """Lower-case, IDNA-encode and strip one trailing dot; validate lengths and characters."""
    if not host:
        raise ValueError("empty host name")
    name = host.lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii").lower()
        except UnicodeError as e:  # the codec's error, re-raised with the offending name
            raise ValueError(f"host name {host!r} cannot be IDNA-encoded: {e}") from None
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError(f"host name {host!r} is empty")
    if len(name) > 253:
        raise ValueError(f"host name {host!r} is longer than 253 characters")
    if not _NAME_CHARS.fullmatch(name):
        raise ValueError(f"host name {host!r} has characters outside [a-z0-9-_.]")
    for label in name.split("."):
        if not label:
            raise ValueError(f"host name {host!r} has an empty label")
        if len(label) > 63:
            raise ValueError(f"host name {host!r} has a label longer than 63 characters")
    return name


def _ends_in_number(name: str) -> bool:
    """True if the last label is numeric, which makes resolvers and browsers read an IP."""
    return _NUMERIC_LABEL.fullmatch(name.rpartition(".")[2]) is not None


def normalize_hostname(host: str) -> str:
    """Return *host* lower-cased, IDNA-encoded, without one trailing dot.

    Raise ValueError for an empty name, an empty label, a label over 63 characters, a
    name over 253, characters outside ``[a-z0-9-_.]`` after IDNA, and a name whose last
    label is a number (``256.0.0.1``, ``foo.0x10``): no top-level domain is numeric, and
    resolvers would read such a name as an IPv4 literal, so it is never a host name.
    """
    name = _to_ascii_name(host)
    if _ends_in_number(name):
        raise ValueError(f"host name {host!r} ends in a number but is not a valid IP address")
    return name


def classify_host(host: str) -> IPAddress | str:
    """Return the IP address *host* spells, or else its normalized host name.

    This is the gateway's first step, before any DNS. A name that IDNA maps onto an IP
    literal (full-width digits, ideographic dots) is returned as that IP, as browsers do.
    Raise ValueError for a host that is neither (see ``normalize_hostname``).
    """
    ip = parse_ip_literal(host)
    if ip is not None:
        return ip
    name = _to_ascii_name(host)
    ip = parse_ip_literal(name)
    if ip is not None:
        return ip
    if _ends_in_number(name):
        raise ValueError(f"host {host!r} ends in a number but is not a valid IP address")
    return name


# ---------------------------------------------------------------------------------- rules


def _parse_port(text: str, spec: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise ValueError(f"rule {spec!r}: port {text!r} is not a number 1-65535")
    port = int(text)
    if not 0 < port <= _MAX_PORT:
        raise ValueError(f"rule {spec!r}: port {port} is not in 1-65535")
    return port


def _parse_network(text: str) -> IPNetwork | None:
    if "%" in text:
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def host_bits_set(spec: str) -> tuple[str, str] | None:
    """``(cidr_as_given, network)`` when the CIDR of the rule *spec* has host bits set, which
    :func:`parse_rule` accepts and widens to the network (a host's address with the prefix
    of a range is often a slip for one host, so the caller says so); else None.

    >>> host_bits_set("10.0.0.1/8:443")
    ('10.0.0.1/8', '10.0.0.0/8')
    >>> host_bits_set("10.0.0.0/8") is None and host_bits_set("example.com:443") is None
    True
    """
    text = spec.strip()
    if text.startswith("["):
        token = text[1:].partition("]")[0]
    elif _parse_network(text) is not None:
        token = text
    else:
        token = text.rpartition(":")[0]
    net = _parse_network(token) if "/" in token else None
    if net is None:
        return None
    try:
        ipaddress.ip_network(token, strict=True)
    except ValueError:
        return token, str(net)
    return None


def parse_rule(spec: str, allow_domains: bool) -> tuple[str, int | None]:
    """Parse an operator rule into ``(canonical_target, port_or_None)``.

    Accepted forms: ``CIDR``, a single IP (made ``/32`` or ``/128``), ``CIDR:PORT``,
    bare IPv6 ``fd00::/8`` and bracketed ``[fd00::/8]`` or ``[fd00::/8]:PORT``; and, when
    *allow_domains*, ``example.com``, ``*.example.com`` and either with ``:PORT``. A CIDR
    target is ``str(ip_network(x, strict=False))``; a domain is normalized (``*.`` kept).
    Surrounding whitespace is ignored. Raise ValueError with a message for anything else.
    """
    text = spec.strip()
    if not text:
        raise ValueError("empty rule")
    port: int | None = None
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"rule {spec!r}: expected [IPv6-CIDR] or [IPv6-CIDR]:PORT")
        if rest:
            port = _parse_port(rest[1:], spec)
        net = _parse_network(inner)
        if net is None or net.version != 6:
            raise ValueError(f"rule {spec!r}: {inner!r} is not an IPv6 address or network")
        return str(net), port
    net = _parse_network(text)
    if net is not None:  # a bare IPv6 network has colons but never a port
        return str(net), None
    target = text
    if ":" in text:
        target, _, port_text = text.rpartition(":")
        port = _parse_port(port_text, spec)
        if ":" in target:
            raise ValueError(
                f"rule {spec!r}: an IPv6 target with a port must be bracketed, e.g. [fd00::/8]:443"
            )
    if not target:
        raise ValueError(f"rule {spec!r}: no target before the port")
    net = _parse_network(target)
    if net is not None:
        return str(net), port
    if not allow_domains:
        raise ValueError(f"rule {spec!r}: {target!r} is not an IP address or CIDR network")
    wildcard = target.startswith("*.")
    try:
        name = normalize_hostname(target[2:] if wildcard else target)
    except ValueError as e:
        raise ValueError(
            f"rule {spec!r}: {target!r} is not a CIDR network or domain: {e}"
        ) from None
    return ("*." + name if wildcard else name), port


# ------------------------------------------------------------------------------- checking


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a destination is denied.

    ``rule`` names the rule: a built-in range (``loopback``, ``private``, ``link_local``,
    ``cgnat``, ``unique_local``, ``multicast``, ``unspecified``, ``reserved``),
    ``gateway_self``, ``invalid_port``, ``denied_port:N``, ``denied_domain:TARGET[:PORT]`` or
    ``denied_cidr:TARGET[:PORT]`` (an IPv6 CIDR with a port is written ``[TARGET]:PORT``).
    ``address`` is the offending IP (canonical text) when an address caused the denial.
    """

    rule: str
    address: str | None = None


# built-in ranges an operator may open with an allow rule (multicast, unspecified and
# reserved addresses cannot be connected to anyway; gateway_self is never allowed)
_ALLOWABLE = frozenset({"loopback", "private", "link_local", "cgnat", "unique_local"})


def _single_network(address: str | None) -> tuple[str, int]:
    """``(CIDR of that one address as an allow rule reads it, IP version)``."""
    if address is None:  # "localhost" is judged as 127.0.0.1
        return "127.0.0.1/32", 4
    version, value, _ = _effective(_coerce_address(address))
    if version == 4:
        return f"{ipaddress.IPv4Address(value)}/32", 4
    return f"{ipaddress.IPv6Address(value)}/128", 6


def denial_hint(denial: Denial, port: int) -> str | None:
    """The operator command that lets this destination through, or None if none does.

    A built-in range: ``datorus policy allow 127.0.0.1/32`` (that one address, every
    port); a denied port: the allow rule naming the address and port; an operator deny
    rule: ``datorus policy remove deny TARGET`` (a rule from the ``deny`` setting is
    removed there instead).
    """
    rule = denial.rule
    if rule in _ALLOWABLE:
        return f"datorus policy allow {_single_network(denial.address)[0]}"
    if rule.startswith("denied_port:"):
        if denial.address is None:
            return f"datorus policy allow CIDR:{port}"
        net, version = _single_network(denial.address)
        return (
            f"datorus policy allow {net}:{port}"
            if version == 4
            else (f"datorus policy allow [{net}]:{port}")
        )
    for prefix in ("denied_domain:", "denied_cidr:"):
        if rule.startswith(prefix):
            return f"datorus policy remove deny {rule[len(prefix) :]}"
    return None


class _RuleTable:
    """CIDR rules of one IP version, grouped by prefix length (most specific first)."""

    __slots__ = ("_groups",)

    def __init__(self, bits: int, rules: Iterable[tuple[IPNetwork, int | None, str]]) -> None:
        by_len: dict[int, dict[int, list[tuple[int | None, str]]]] = {}
        for net, port, label in rules:
            nets = by_len.setdefault(net.prefixlen, {})
            nets.setdefault(int(net.network_address), []).append((port, label))
        full = (1 << bits) - 1
        self._groups = tuple(
            (full ^ (full >> plen), {k: tuple(v) for k, v in by_len[plen].items()})
            for plen in sorted(by_len, reverse=True)
        )

    def match(self, value: int, port: int, exact_port: bool = False) -> str | None:
        """The label of a rule covering *value* on *port*, or None.

        A rule without a port covers every port, unless *exact_port* asks for rules that
        name this very port.
        """
        for mask, nets in self._groups:
            entries = nets.get(value & mask)
            if entries is not None:
                for rule_port, label in entries:
                    if rule_port == port or (rule_port is None and not exact_port):
                        return label
        return None


def _v4(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def _v6(text: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(text)


_BUILTIN4 = _RuleTable(
    32,
    (
        (_v4("127.0.0.0/8"), None, "loopback"),
        (_v4("10.0.0.0/8"), None, "private"),
        (_v4("172.16.0.0/12"), None, "private"),
        (_v4("192.168.0.0/16"), None, "private"),
        (_v4("169.254.0.0/16"), None, "link_local"),
        (_v4("100.64.0.0/10"), None, "cgnat"),
        (_v4("224.0.0.0/4"), None, "multicast"),
        (_v4("0.0.0.0/8"), None, "unspecified"),
        (_v4("240.0.0.0/4"), None, "reserved"),  # includes 255.255.255.255
    ),
)
_BUILTIN6 = _RuleTable(
    128,
    (
        (_v6("::1/128"), None, "loopback"),
        (_v6("::/128"), None, "unspecified"),
        (_v6("fe80::/10"), None, "link_local"),
        (_v6("fc00::/7"), None, "unique_local"),
        (_v6("ff00::/8"), None, "multicast"),
    ),
)

_LOOPBACK4 = int(ipaddress.IPv4Address("127.0.0.1"))
_MAPPED_HI = 0xFFFF  # ::ffff:0:0/96, shifted right by 32
_NAT64_HI = 0x0064_FF9B << 64  # 64:ff9b::/96, shifted right by 32
_SIXTOFOUR_HI = 0x2002  # 2002::/16, shifted right by 112


def _embedded_v4(value: int) -> int | None:
    """The IPv4 address an IPv6 address embeds and is routed by, if any."""
    hi = value >> 32
    if hi in (_MAPPED_HI, _NAT64_HI) or (hi == 0 and value > 1):  # mapped, NAT64, compat
        return value & _ALL4
    if value >> 112 == _SIXTOFOUR_HI:
        return (value >> 80) & _ALL4
    return None


def _effective(ip: IPAddress) -> tuple[int, int, int | None]:
    """``(version, value, ipv6)``: the address judged and the IPv6 address given, if any.

    The judged address is the embedded IPv4 one for IPv6 addresses that embed one.
    """
    value = int(ip)
    if ip.version == 4:
        return 4, value, None
    v4 = _embedded_v4(value)
    return (6, value, value) if v4 is None else (4, v4, value)


def _as_v4_network(net: IPNetwork) -> IPNetwork:
    """A network inside ``::ffff:0:0/96`` as the IPv4 network it maps (the same sockets).

    NAT64 and 6to4 networks stay IPv6: denying ``64:ff9b::/96`` must not deny all of IPv4.
    """
    if net.version == 6 and net.prefixlen >= 96 and int(net.network_address) >> 32 == _MAPPED_HI:
        base = ipaddress.IPv4Address(int(net.network_address) & _ALL4)
        return ipaddress.IPv4Network(f"{base}/{net.prefixlen - 96}")
    return net


@functools.lru_cache(maxsize=4096)
def _address_from_text(text: str) -> IPAddress:
    """Parse an address string; memoized, as resolvers hand the same addresses out often."""
    try:  # the fast path for resolver output, skipping ip_address()'s IPv4-then-IPv6 tries
        return ipaddress.IPv6Address(text) if ":" in text else ipaddress.IPv4Address(text)
    except ValueError:
        parsed = parse_ip_literal(text)
        if parsed is None:
            raise ValueError(f"{text!r} is not an IP address") from None
        return parsed


def _coerce_address(ip: str | IPAddress) -> IPAddress:
    if isinstance(ip, str):
        return _address_from_text(ip)
    if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return ip
    raise TypeError(f"{ip!r} is not an IP address or a string")


def _valid_port(port: int) -> bool:
    return isinstance(port, int) and 0 < port <= _MAX_PORT


@dataclass(frozen=True, slots=True)
class _OwnPort:
    """The gateway's listeners on one port: every loopback address and/or exact addresses."""

    any_loopback: bool
    v4: frozenset[int]
    v6: frozenset[int]


class Policy:
    """The gateway's destination policy, precomputed for cheap per-request checks.

    *allow* and *deny* hold ``parse_rule`` outputs. Allow rules must be CIDRs (an allow by
    name could not stop DNS rebinding); deny rules may also be domains. *deny_ports* are
    denied on every address unless an allow rule naming that very port covers it.
    *own_sockets* are the gateway's listening ``(host, port)`` pairs, which are always
    denied: a host of ``""``, ``"0.0.0.0"`` or ``"::"`` (or any name) means every loopback
    address plus each of *local_addresses*; a loopback host means every loopback address.
    The unspecified address reaches the local machine, so it counts as the gateway on
    every own port. Raise ValueError for a malformed rule, port or address.
    """

    def __init__(
        self,
        allow: Iterable[tuple[str, int | None]] = (),
        deny: Iterable[tuple[str, int | None]] = (),
        deny_ports: Iterable[int] = (25,),
        own_sockets: Iterable[tuple[str, int]] = (),
        *,
        local_addresses: Iterable[str] = (),
    ) -> None:
        allow4: list[tuple[IPNetwork, int | None, str]] = []
        allow6: list[tuple[IPNetwork, int | None, str]] = []
        for target, port in allow:
            net = self._rule_network(target, port)
            if net is None:
                raise ValueError(f"allow rule {target!r}: allow rules must be CIDRs, not domains")
            net = _as_v4_network(net)
            (allow4 if net.version == 4 else allow6).append((net, port, target))
        self._allow4 = _RuleTable(32, allow4)
        self._allow6 = _RuleTable(128, allow6)
        self._allow_ports = frozenset(p for _, p, _ in allow4 + allow6 if p is not None)

        deny4: list[tuple[IPNetwork, int | None, str]] = []
        deny6: list[tuple[IPNetwork, int | None, str]] = []
        exact: dict[str, list[tuple[int | None, str]]] = {}
        wild: dict[str, list[tuple[int | None, str]]] = {}
        for target, port in deny:
            net = self._rule_network(target, port)
            if net is None:
                wildcard = target.startswith("*.")
                name = normalize_hostname(target[2:] if wildcard else target)
                shown = ("*." if wildcard else "") + name
                label = f"denied_domain:{shown}" + ("" if port is None else f":{port}")
                (wild if wildcard else exact).setdefault(name, []).append((port, label))
                continue
            shown = str(net)
            if port is not None:
                shown = f"{shown}:{port}" if net.version == 4 else f"[{shown}]:{port}"
            label = f"denied_cidr:{shown}"
            net = _as_v4_network(net)
            (deny4 if net.version == 4 else deny6).append((net, port, label))
        self._deny4 = _RuleTable(32, deny4)
        self._deny6 = _RuleTable(128, deny6)
        self._deny_exact = {k: tuple(v) for k, v in exact.items()}
        self._deny_wild = {k: tuple(v) for k, v in wild.items()}

        self._deny_ports = frozenset(deny_ports)
        for p in self._deny_ports:
            if not _valid_port(p):
                raise ValueError(f"deny port {p!r} is not a port number 1-65535")

        self._own = self._own_ports(own_sockets, local_addresses)

    @staticmethod
    def _rule_network(target: str, port: int | None) -> IPNetwork | None:
        """Validate one rule; return its network, or None if it is a domain."""
        if port is not None and not _valid_port(port):
            raise ValueError(f"rule {target!r}: port {port!r} is not a port number 1-65535")
        if not isinstance(target, str) or not target:
            raise ValueError(f"rule target {target!r} is empty or not a string")
        return _parse_network(target)

    @staticmethod
    def _own_ports(
        own_sockets: Iterable[tuple[str, int]], local_addresses: Iterable[str]
    ) -> dict[int, _OwnPort]:
        local4: set[int] = set()
        local6: set[int] = set()
        for text in local_addresses:
            version, value, _ = _effective(_coerce_address(text))
            (local4 if version == 4 else local6).add(value)
        acc: dict[int, tuple[bool, set[int], set[int]]] = {}
        for host, port in own_sockets:
            if not _valid_port(port):
                raise ValueError(f"own socket port {port!r} is not a port number 1-65535")
            any_loopback, v4s, v6s = acc.setdefault(port, (False, set(), set()))
            ip = parse_ip_literal(host) if host else None
            if ip is None or ip.is_unspecified:
                # "", "0.0.0.0", "::" or a name we may not resolve: every local address.
                acc[port] = (True, v4s | local4, v6s | local6)
                continue
            version, value, _ = _effective(ip)
            if version == 4:
                if value >> 24 == 127:
                    acc[port] = (True, v4s, v6s)
                v4s.add(value)
            else:
                if value == 1:
                    acc[port] = (True, v4s, v6s)
                v6s.add(value)
        return {p: _OwnPort(a, frozenset(s4), frozenset(s6)) for p, (a, s4, s6) in acc.items()}

    def _is_self(self, version: int, value: int, port: int) -> bool:
        own = self._own.get(port)
        if own is None:
            return False
        if version == 4:
            top = value >> 24
            return top == 0 or (own.any_loopback and top == 127) or value in own.v4
        return value == 0 or (own.any_loopback and value == 1) or value in own.v6

    def check_address(self, ip: str | IPAddress, port: int) -> Denial | None:
        """Return why connecting to *ip*:*port* is denied, or None if it is allowed.

        In order: the gateway's own sockets (``gateway_self``, denied even if allowed);
        *deny_ports* (unless an allow rule naming that port covers the address); operator
        deny CIDRs; operator allow CIDRs (allowed); the built-in ranges. *ip* may be an
        address object or any spelling ``parse_ip_literal`` accepts; raise ValueError for
        anything else.
        """
        addr = _coerce_address(ip)
        if not _valid_port(port):
            return Denial("invalid_port", str(addr))
        version, value, ipv6 = _effective(addr)
        if self._is_self(version, value, port):
            return Denial("gateway_self", str(addr))
        if version == 4:
            allow, deny, builtin = self._allow4, self._deny4, _BUILTIN4
        else:
            allow, deny, builtin = self._allow6, self._deny6, _BUILTIN6
        if port in self._deny_ports and allow.match(value, port, exact_port=True) is None:
            return Denial(f"denied_port:{port}", str(addr))
        label = deny.match(value, port)
        if label is None and version == 4 and ipv6 is not None:
            label = self._deny6.match(ipv6, port)  # a deny rule may name the IPv6 form too
        if label is not None:
            return Denial(label, str(addr))
        if allow.match(value, port) is not None:
            return None
        label = builtin.match(value, port)
        return None if label is None else Denial(label, str(addr))

    def check_addresses(self, ips: Iterable[str | IPAddress], port: int) -> Denial | None:
        """The first denial among *ips* (e.g. every address a name resolved to), or None."""
        for ip in ips:
            denial = self.check_address(ip, port)
            if denial is not None:
                return denial
        return None

    def _domain_denial(self, name: str, port: int) -> str | None:
        """The label of a domain deny rule covering *name* on *port*, or None."""
        exact, wild = self._deny_exact, self._deny_wild
        if not exact and not wild:
            return None
        candidates = [exact.get(name)]
        dot = name.find(".")
        while dot != -1:
            suffix = name[dot + 1 :]
            candidates.append(exact.get(suffix))  # "example.com" also covers its subdomains
            candidates.append(wild.get(suffix))
            dot = name.find(".", dot + 1)
        for entries in candidates:
            if entries:
                for rule_port, label in entries:
                    if rule_port is None or rule_port == port:
                        return label
        return None

    def check_name(self, hostname: str, port: int) -> Denial | None:
        """Return why *hostname*:*port* is denied before resolving it, or None.

        *hostname* is a normalized name (see ``classify_host``); an IP literal passed here
        by mistake is judged by ``check_address``. Denies by *deny_ports* (unless some allow
        rule names that port: the addresses decide then), by domain deny rules, and
        ``localhost`` / ``*.localhost`` as ``loopback`` unless an allow rule covers
        127.0.0.1 on *port*. The resolved addresses must still go to ``check_addresses``.
        """
        if not _valid_port(port):
            return Denial("invalid_port", None)
        name = hostname.lower()
        if name.endswith("."):
            name = name[:-1]
        if parse_ip_literal(name) is not None:
            return self.check_address(name, port)
        if port in self._deny_ports and port not in self._allow_ports:
            return Denial(f"denied_port:{port}", None)
        label = self._domain_denial(name, port)
        if label is not None:
            return Denial(label, None)
        if (name == "localhost" or name.endswith(".localhost")) and self._allow4.match(
            _LOOPBACK4, port
        ) is None:
            return Denial("loopback", None)
        return None
