"""The country of an exit address, offline: ``iptocc``'s table of the regional
internet registries' delegations (IPv4 and IPv6), shipped inside the package.

No network and no database file to download: the table is as fresh as the installed
``iptocc`` (a maintained package released with the registries' data; upgrading it
refreshes the table). Private, reserved and unknown addresses have no country.

>>> country_of("8.8.8.8")
'US'
>>> country_of("10.0.0.1") is None and country_of("not an address") is None
True
"""

from __future__ import annotations

import ipaddress

import iptocc


def country_of(ip: str | None) -> str | None:
    """The ISO 3166-1 alpha-2 code (upper case) of the country *ip* is delegated to,
    or None (no address, a private or reserved one, or one the table lacks)."""
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if not addr.is_global:
        return None
    code = iptocc.country_code(str(addr))
    if isinstance(code, str) and len(code) == 2 and code.isalpha():
        return code.upper()
    return None
