"""Allow-listed client addresses: which credential a request without credentials runs as.

``datorus credential allow-ip USERNAME CIDR`` lets requests from those client addresses
in without ``Proxy-Authorization`` (or, on the SOCKS5 entry, with the "no
authentication" method), as that credential. A request that carries credentials is
judged by them. When the CIDRs of two credentials overlap, the most specific (the
longest prefix) wins; the same CIDR twice is refused when it is added
(:func:`normalize_cidr` gives the one spelling the ledger keeps).

Pure: the gateway builds an :class:`AllowList` from the ledger's rows at every snapshot.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_cidr(text: str) -> str:
    """The canonical spelling of a CIDR (an address alone is a /32 or /128).

    Raises ValueError for anything else, and for a CIDR with host bits set (say what
    was meant: ``10.0.0.0/24``, not ``10.0.0.7/24``).

    >>> normalize_cidr("127.0.0.1")
    '127.0.0.1/32'
    >>> normalize_cidr("2001:DB8::/32")
    '2001:db8::/32'
    >>> normalize_cidr("::ffff:10.0.0.0/104")
    '10.0.0.0/8'
    """
    raw = text.strip()
    if not raw or raw != text or any(c.isspace() for c in raw):
        raise ValueError(f"{text!r} is not a CIDR (write it as 203.0.113.0/24 or 2001:db8::/48)")
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            loose = ipaddress.ip_network(raw, strict=False)
            raise ValueError(f"{text!r} has host bits set (its network is {loose})") from None
        raise ValueError(
            f"{text!r} is not a CIDR (write it as 203.0.113.0/24 or 2001:db8::/48)"
        ) from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return str(net)


class AllowList:
    """Credential ids by client network; :meth:`match` finds the most specific one.

    >>> a = AllowList([(1, "10.0.0.0/8"), (2, "10.1.0.0/16")])
    >>> a.match("10.1.2.3"), a.match("10.9.9.9"), a.match("192.0.2.1")
    (2, 1, None)
    >>> a.match("::ffff:10.1.2.3")
    2
    """

    __slots__ = ("by_length",)

    def __init__(self, rows: Iterable[tuple[int, str]] = ()) -> None:
        # (version, prefix length) -> network address as an int -> credential id; the
        # lengths kept longest first, so the first hit is the most specific
        table: dict[tuple[int, int], dict[int, int]] = {}
        for cred_id, cidr in rows:
            net = ipaddress.ip_network(cidr, strict=False)
            key = (net.version, net.prefixlen)
            table.setdefault(key, {})[int(net.network_address)] = cred_id
        self.by_length = sorted(table.items(), key=lambda kv: -kv[0][1])

    def __bool__(self) -> bool:
        return bool(self.by_length)

    def match(self, address: str | None) -> int | None:
        """The credential id the client *address* runs as, or None (not allow-listed)."""
        if not self.by_length or not address:
            return None
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        bits = 32 if ip.version == 4 else 128
        value = int(ip)
        for (version, length), nets in self.by_length:
            if version != ip.version:
                continue
            hit = nets.get(value >> (bits - length) << (bits - length) if length else 0)
            if hit is not None:
                return hit
        return None
