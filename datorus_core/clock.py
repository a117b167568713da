"""The project's one time format: UTC instants as ISO-8601 text with a ``Z``.

Every timestamp Datorus writes or shows (the ledger's ``created_at`` columns, the
error envelope's ``timestamp``, receipts, lease expiries, the API's ``*_at`` fields)
has the form ``YYYY-MM-DDTHH:MM:SSZ``, whole seconds, which sorts as it reads::

    >>> iso_utc(0)
    '1970-01-01T00:00:00Z'
    >>> iso_utc(1_800_000_000.9)
    '2027-01-15T08:00:00Z'
"""

from __future__ import annotations

import time

__all__ = ["ISO_FORMAT", "iso_utc"]

ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def iso_utc(ts: float | None = None) -> str:
    """Unix seconds *ts* (default: now) as ``YYYY-MM-DDTHH:MM:SSZ``, rounded down."""
    return time.strftime(ISO_FORMAT, time.gmtime(ts))
