"""Exclusive egress leases (seed 002's ``POST /proxies/acquire``), in the ledger.

A lease gives one account one egress to itself for a while: the gateway sends that
account's requests that name the lease (``X-Datorus-Lease-Id`` or ``-lease-ID`` in the
proxy username) through it, and no other request leaves by it until the lease ends.
A lease costs ``lease_price_cents`` from the balance when it is taken (seed 002: one
credit, a cent here), not refunded on an early release. The charge and the lease are
written in one transaction, and the charge carries ``external_id = "lease:ID"``, so a
lease is charged exactly once.
"""

from __future__ import annotations

import secrets
from typing import Any

from . import pricing
from .clock import iso_utc
from .egress import parse_egress_url
from .envelope import DatorusError
from .ledger import Ledger
from .sessions import LEASE_ID_RE

__all__ = ["LEASE_ID_RE", "acquire", "for_account", "new_lease_id", "release"]

MAX_SECONDS = 3600
DEFAULT_SECONDS = 300

ACTIVE_SQL = (
    "SELECT id, account_id, egress_id, expires_at FROM leases"
    " WHERE released_at IS NULL AND expires_at > ?"
)


def new_lease_id() -> str:
    """A lease id: ``ls`` + 24 hex digits (no ``-``, so it can ride in a username)."""
    return "ls" + secrets.token_hex(12)


def _leasable(row: dict[str, Any]) -> bool:
    """Only a distinct way out can be leased: not the box's shared default route, and
    not one failing its checks (score 0)."""
    return row["url"] != "direct://" and row["score"] > 0


def _matches(row: dict[str, Any], f: dict[str, Any]) -> bool:
    kind = parse_egress_url(row["url"]).kind
    return (
        (f.get("protocol") is None or kind == f["protocol"])
        and (f.get("country") is None or (row["country"] or "") == f["country"].lower())
        and (f.get("anonymity") is None or row["anonymity"] == f["anonymity"])
        and (f.get("min_score") is None or row["score"] >= f["min_score"])
    )


def view(lease: dict[str, Any], egress: dict[str, Any]) -> dict[str, Any]:
    """A lease as the API shows it: seed 002's fields and how to use it."""
    spec = parse_egress_url(egress["url"])
    return {
        "lease_id": lease["id"],
        "proxy": {
            "id": egress["id"],
            "ip": spec.address,
            "port": spec.port if spec.is_proxy else None,
            "protocol": spec.kind,
            "country": egress["country"].upper() if egress["country"] else None,
            "anonymity": egress["anonymity"],
            "exit_ip": egress["exit_ip"],
        },
        "created_at": lease["created_at"],
        "expires_at": iso_utc(lease["expires_at"]),
        "use": {"header": "X-Datorus-Lease-Id", "username_option": f"-lease-{lease['id']}"},
    }


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
        enabled = list(
            db.query(
                "SELECT id, url, country, anonymity, score, exit_ip FROM egress"
                " WHERE enabled = 1 ORDER BY score DESC, id"
            )
        )
        rows = [r for r in enabled if _leasable(r) and _matches(r, filters)]
        if not rows:
            raise DatorusError(
                "RESOURCE_NOT_FOUND",
                message="No proxy in the pool matches these filters.",
                details={"filters": {k: v for k, v in filters.items() if v is not None}},
            )
        leased: dict[int, int] = {}
        mine: list[int] = []
        for _, aid, eid, until in db.conn.execute(ACTIVE_SQL, (now,)).fetchall():
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
        (balance,) = db.conn.execute(
            "SELECT COALESCE((SELECT nanocents FROM balances WHERE account_id = ?), 0)",
            (account_id,),
        ).fetchone()
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
        db.conn.execute(
            "INSERT INTO leases (id, account_id, egress_id, cents, expires_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (lease_id, account_id, egress["id"], cents, now + seconds),
        )
        spec = parse_egress_url(egress["url"])
        db.conn.execute(
            "INSERT INTO transactions (account_id, kind, nanocents, reason, external_id)"
            " VALUES (?, 'adjustment', ?, ?, ?)",
            (
                account_id,
                -need,
                f"Proxy acquired: {spec.customer_url()} for {seconds} s",
                f"lease:{lease_id}",
            ),
        )
        lease = db.one("SELECT * FROM leases WHERE id = ?", [lease_id])
        (left,) = db.conn.execute(
            "SELECT nanocents FROM balances WHERE account_id = ?", (account_id,)
        ).fetchone()
    return {
        **view(lease, egress),
        "credits_remaining": pricing.whole_cents(left),
        "expires_ts": lease["expires_at"],
    }


def release(db: Ledger, account_id: int, lease_id: str, now: int) -> dict:
    """End one of the account's live leases now (not refunded); 404 otherwise."""
    with db.transaction():
        cur = db.conn.execute(
            "UPDATE leases SET released_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')"
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
        [account_id, now],
    ):
        egress = db.one(
            "SELECT id, url, country, anonymity, score, exit_ip FROM egress WHERE id = ?",
            [lease["egress_id"]],
        )
        if egress is not None:
            out.append(view(lease, egress))
    return out
