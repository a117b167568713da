"""Registrable domains: what "usage by destination" groups hosts into.

``www.shop.example.co.uk`` and ``img.example.co.uk`` are one customer-facing target,
``example.co.uk``: the registrable domain (the public suffix plus one label), read off
the Public Suffix List that the ``publicsuffixlist`` package ships (offline; its
releases follow the list). An IP literal, ``localhost`` or a bare public suffix has no
registrable domain and stands for itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from publicsuffixlist import PublicSuffixList

#: The most host names read from the receipts to fold into domains (the busiest first).
HOSTS_FOLDED = 10_000

#: The per-host counters that are summed into a domain's row.
SUMMED = ("requests", "bytesUp", "bytesDown", "bytes", "trialBytes", "chargedNanocents")


@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def registrable(host: str) -> str:
    """The registrable domain of *host* (lower case, no trailing dot), or *host* itself
    when it has none (an IP address, a single label, a public suffix).

    >>> registrable("WWW.Example.co.uk.")
    'example.co.uk'
    >>> registrable("127.0.0.1"), registrable("[::1]"), registrable("localhost")
    ('127.0.0.1', '::1', 'localhost')
    >>> registrable("foo.github.io")
    'foo.github.io'
    """
    h = host.strip().rstrip(".").lower()
    bare = h[1:-1] if h.startswith("[") and h.endswith("]") else h
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    return _psl().privatesuffix(h) or h


def by_registrable(
    rows: Iterable[Mapping[str, Any]], limit: int | None = None
) -> list[dict[str, Any]]:
    """Fold per-host usage rows (``host`` and the :data:`SUMMED` counters) into one row
    per registrable domain, with ``domain`` and ``hosts`` (how many hosts it covers);
    most bytes first, then by name; at most *limit* rows.

    >>> by_registrable([
    ...     {"host": "a.example.com", "requests": 1, "bytesUp": 1, "bytesDown": 2, "bytes": 3,
    ...      "trialBytes": 0, "chargedNanocents": 5},
    ...     {"host": "b.example.com", "requests": 2, "bytesUp": 1, "bytesDown": 1, "bytes": 2,
    ...      "trialBytes": 1, "chargedNanocents": 1},
    ... ])[0]["domain"], by_registrable([])
    ('example.com', [])
    """
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        name = registrable(str(r["host"]))
        row = out.get(name)
        if row is None:
            row = out[name] = {"domain": name, "hosts": 0, **{k: 0 for k in SUMMED}}
        row["hosts"] += 1
        for k in SUMMED:
            row[k] += int(r[k])
    ordered = sorted(out.values(), key=lambda d: (-d["bytes"], d["domain"]))
    return ordered if limit is None else ordered[:limit]
