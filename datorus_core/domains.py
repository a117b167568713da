"""Registrable domains: what a customer's usage is grouped by (issue 18's usage by
destination).

A host counts under its registrable domain (the public suffix plus one label, from the
Public Suffix List that mitmproxy already brings: ``publicsuffix2``); an IP address or a
name with no known suffix counts as itself::

    >>> [registrable(h) for h in ("www.example.co.uk", "a.b.example.com", "10.0.0.1",
    ...                           "[::1]", "localhost", "foo.github.io")]
    ['example.co.uk', 'example.com', '10.0.0.1', '::1', 'localhost', 'foo.github.io']
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from publicsuffix2 import PublicSuffixList

__all__ = ["fold", "registrable"]


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the bundled list, read once (a quarter second)


def registrable(host: str) -> str:
    """The registrable domain of *host* (lower case), or *host* itself."""
    h = host.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    sld = _psl().get_sld(h, strict=True)
    return str(sld) if sld else h


SUMS = ("requests", "bytes_up", "bytes_down", "trial_bytes", "nanocents")


def fold(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-host rows (``host`` and :data:`SUMS`) summed per registrable domain, the
    costliest first (then by bytes, then by name)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        d = registrable(str(r["host"]))
        acc = out.setdefault(d, {"domain": d, **dict.fromkeys(SUMS, 0)})
        for k in SUMS:
            acc[k] += int(r[k] or 0)
    for v in out.values():
        v["bytes"] = v["bytes_up"] + v["bytes_down"]
    return sorted(out.values(), key=lambda v: (-v["nanocents"], -v["bytes"], v["domain"]))
