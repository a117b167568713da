"""Exclusive egress leases in the ledger: taken and charged in one transaction, released.

What a lease is, and how it is shown, is :mod:`datorus_core.leases`; this module
writes and reads the ``leases`` rows and the charge that goes with each.
"""

from __future__ import annotations

from typing import Any

from .. import pricing
from ..egress import parse_egress_url
from ..envelope import DatorusError
from ..leases import leasable, matches, new_lease_id, view
from . import events
from .db import Ledger
from .money import balance_nanocents

# The live leases (id, account_id, egress_id, expires_at) as of a Unix time, in the
# field order of ``live.Lease.from_row``.
ACTIVE_SQL = (
    "SELECT id, account_id, egress_id, expires_at FROM leases"
    " WHERE released_at IS NULL AND expires_at > ?"
)


def active_rows(db: Ledger, now: int) -> list[tuple[Any, ...]]:
    """The live leases at *now* (Unix seconds), as ``live.Lease.from_row`` reads them."""
    return [tuple(r) for r in db.execute(ACTIVE_SQL, (now,)).fetchall()]


__all__ = ["acquire", "for_account", "release"]

_EGRESS = "id, url, COALESCE(country, found_country) AS country, anonymity, score, exit_ip, status"


def acquire(
    db: Ledger,
    account_id: int,
    filters: dict[str, Any],
    seconds: int,
    cents: int,
    now: int,
    max_per_account: int = 5,
) -> dict[str, Any]:
    """Lease the best-scored free egress that matches *filters* for *seconds*.

    404 ``RESOURCE_NOT_FOUND`` when no leasable egress matches, 429 ``RATE_LIMITED``
    (``details.limit = "leases"``, ``Retry-After``) when every match is leased, when
    the account holds *max_per_account* leases already, or when the lease would take
    the last egress everyone else can use; 402 ``INSUFFICIENT_BALANCE`` when the
    balance cannot pay *cents*.
    """
    with db.transaction():
        enabled = db.query(
            f"SELECT {_EGRESS} FROM egress WHERE enabled = 1 ORDER BY score DESC, id"
        )
        rows = [r for r in enabled if leasable(r) and matches(r, filters)]
        if not rows:
            raise DatorusError(
                "RESOURCE_NOT_FOUND",
                message="No proxy in the pool matches these filters.",
                details={"filters": {k: v for k, v in filters.items() if v is not None}},
            )
        leased: dict[int, int] = {}
        mine: list[int] = []
        for _, aid, eid, until in db.execute(ACTIVE_SQL, (now,)).fetchall():
            leased[eid] = min(until, leased.get(eid, until))
            if aid == account_id:
                mine.append(until)
        if len(mine) >= max_per_account:
            retry = max(1, min(mine) - now)
            raise DatorusError(
                "RATE_LIMITED",
                message="This account holds as many leases as it may; release one first.",
                details={
                    "limit": "leases_per_account",
                    "maxLeases": max_per_account,
                    "retryAfterSeconds": retry,
                },
                headers={"Retry-After": str(retry)},
            )
        free = [r for r in rows if r["id"] not in leased]
        if not free:
            retry = max(1, min(leased[r["id"]] for r in rows) - now)
            raise DatorusError(
                "RATE_LIMITED",
                message="Every matching proxy is leased; retry when one is released.",
                details={"limit": "leases", "retryAfterSeconds": retry},
                headers={"Retry-After": str(retry)},
            )
        if sum(1 for r in enabled if r["id"] not in leased) <= 1:
            # the last way out everyone else can use is never leased
            retry = max(1, min(leased.values(), default=now + seconds) - now)
            raise DatorusError(
                "RATE_LIMITED",
                message="The last unleased egress stays shared; retry when a lease ends.",
                details={"limit": "leases", "reason": "pool_reserve", "retryAfterSeconds": retry},
                headers={"Retry-After": str(retry)},
            )
        balance = balance_nanocents(db, account_id)
        need = pricing.cents_to_nanocents(cents)
        if balance < need:
            raise DatorusError(
                "INSUFFICIENT_BALANCE",
                details={
                    "currentBalanceCents": pricing.whole_cents(balance),
                    "currentBalanceNanocents": balance,
                    "requiredCents": cents,
                },
            )
        egress = free[0]
        lease_id = new_lease_id()
        db.execute(
            "INSERT INTO leases (id, account_id, egress_id, cents, expires_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (lease_id, account_id, egress["id"], cents, now + seconds),
        )
        spec = parse_egress_url(egress["url"])
        db.execute(
            "INSERT INTO transactions (account_id, kind, nanocents, reason, external_id)"
            " VALUES (?, 'adjustment', ?, ?, ?)",
            (
                account_id,
                -need,
                f"Proxy acquired: {spec.customer_url()} for {seconds} s",
                f"lease:{lease_id}",
            ),
        )
        lease = db.one("SELECT * FROM leases WHERE id = ?", (lease_id,))
        assert lease is not None
        left = balance_nanocents(db, account_id)
        events.emit(
            db,
            "lease.acquired",
            account_id,
            {
                "account_id": account_id,
                "lease_id": lease_id,
                "proxy_id": str(egress["id"]),
                "cents": cents,
                "expires_at": now + seconds,
            },
        )
    return {
        **view(lease, egress),
        "credits_remaining": pricing.whole_cents(left),
        "expires_ts": lease["expires_at"],
    }


def release(db: Ledger, account_id: int, lease_id: str, now: int) -> dict[str, Any]:
    """End one of the account's live leases now (not refunded); 404 otherwise."""
    with db.transaction():
        cur = db.execute(
            "UPDATE leases SET released_at = {now}"
            " WHERE id = ? AND account_id = ? AND released_at IS NULL AND expires_at > ?",
            (lease_id, account_id, now),
        )
    if cur.rowcount != 1:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"lease": lease_id})
    return {"lease_id": lease_id, "released": True, "refunded_cents": 0}


def for_account(db: Ledger, account_id: int, now: int) -> list[dict[str, Any]]:
    """The account's live leases, oldest first."""
    out = []
    for lease in db.query(
        "SELECT * FROM leases WHERE account_id = ? AND released_at IS NULL AND expires_at > ?"
        " ORDER BY created_at, id",
        (account_id, now),
    ):
        egress = db.one(
            f"SELECT {_EGRESS} FROM egress WHERE id = ?",
            [lease["egress_id"]],
        )
        if egress is not None:
            out.append(view(lease, egress))
    return out
