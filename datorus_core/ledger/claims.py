"""Named claims with an expiry: one process per ledger runs a background service.

A claim (``service_claims``) names a service (``pool``: the pool worker's checks and
scheduled scrapes), the process that runs it (*owner*, ``scraping.new_owner``) and
when the claim lapses. The holder renews it well before then; another process takes it
only once it has lapsed (its holder stopped or hung), so with ``datorus serve
--workers N`` and several gateways on one PostgreSQL ledger one process runs the
service at a time, and another takes over within the claim's time to live.

>>> from datorus_core.ledger import open_ledger
>>> d = open_ledger(":memory:")
>>> claim(d, "pool", "a", now=100, ttl=15), claim(d, "pool", "b", now=101, ttl=15)
(True, False)
>>> claim(d, "pool", "a", now=110, ttl=15), claim(d, "pool", "b", now=126, ttl=15)
(True, True)
>>> release(d, "pool", "a"), release(d, "pool", "b"), holder(d, "pool", 127)
(False, True, None)
"""

from __future__ import annotations

from typing import Any

from .db import Ledger

POOL = "pool"  # the pool worker: egress checks and scheduled scrapes

# taken when free, lapsed, or already ours (then only renewed)
_CLAIM = (
    "INSERT INTO service_claims (name, owner, expires_at, claimed_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
    " expires_at = excluded.expires_at,"
    " claimed_at = CASE WHEN service_claims.owner = excluded.owner"
    " THEN service_claims.claimed_at ELSE excluded.claimed_at END"
    " WHERE service_claims.owner = excluded.owner"
    " OR service_claims.expires_at <= excluded.claimed_at"
)


def claim(db: Ledger, name: str, owner: str, now: int, ttl: int) -> bool:
    """Take or renew the claim on *name* for *owner* until *now* + *ttl* (Unix seconds);
    whether *owner* holds it now."""
    if ttl < 1:
        raise ValueError("ttl must be >= 1")
    with db.transaction():
        db.execute(_CLAIM, (name, owner, now + ttl, now))
        held = db.value("SELECT owner FROM service_claims WHERE name = ?", (name,))
    return bool(held == owner)


def release(db: Ledger, name: str, owner: str) -> bool:
    """Give the claim on *name* back if *owner* holds it (another may take it at once)."""
    with db.transaction():
        cur = db.execute("DELETE FROM service_claims WHERE name = ? AND owner = ?", (name, owner))
    return cur.rowcount > 0


def holder(db: Ledger, name: str, now: int) -> dict[str, Any] | None:
    """Who holds the claim on *name* at *now* (``owner``, ``expires_at``,
    ``claimed_at``), or None when nobody does."""
    return db.one(
        "SELECT owner, expires_at, claimed_at FROM service_claims"
        " WHERE name = ? AND expires_at > ?",
        (name, now),
    )
