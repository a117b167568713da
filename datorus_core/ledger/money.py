"""Money in the ledger: top-ups, corrections, trial grants, card payments, history.

``transactions`` is the append-only truth; ``balances`` follows it by trigger in the
same transaction, so every function here only ever inserts rows of ``transactions``
(and reads). An ``external_id`` makes a credit happen at most once.
"""

from __future__ import annotations

from typing import Any

from .. import pricing
from ..envelope import DatorusError, control_free, validation_error
from . import events
from .accounts import MAX_BALANCE_CENTS, account_row, bounded, show_account
from .db import Ledger


def add_balance(
    db: Ledger,
    account_id: int,
    cents: int,
    reason: str | None = None,
    kind: str = "topup",
    external_id: str | None = None,
) -> dict[str, Any]:
    """Append a top-up (or adjustment) of *cents*; with *external_id*, at most once.

    Returns the new balance and whether this call applied it (False when the
    external id had already been credited).
    """
    if kind == "topup" and cents <= 0:
        raise validation_error("cents", "a top-up must be > 0 cents")
    bounded("cents", cents)  # the input first, then whether the account exists
    control_free("reason", reason)
    account_row(db, account_id)
    with db.transaction():
        held = balance_nanocents(db, account_id)
        if (
            held + cents * pricing.NANOCENTS_PER_CENT
            > MAX_BALANCE_CENTS * pricing.NANOCENTS_PER_CENT
        ):
            raise validation_error(
                "cents", f"the balance may hold at most {MAX_BALANCE_CENTS} cents"
            )
        cur = db.execute(
            "INSERT INTO transactions (account_id, kind, nanocents, reason, external_id)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (external_id) DO NOTHING",
            (account_id, kind, cents * pricing.NANOCENTS_PER_CENT, reason, external_id),
        )
        applied = cur.rowcount == 1
        if applied and kind == "topup":
            _purchased(db, account_id, cents, "operator", reason)
    return _balance_answer(db, account_id, applied, kind)


def balance_nanocents(db: Ledger, account_id: int) -> int:
    """The account's balance in nanocents (0 for an account with no money row yet).

    Inside a write transaction the balance stays as read until it commits: a usage
    batch another gateway writes meanwhile waits, so a check made on it (a cap, a
    correction, a lease's price) holds when the row goes in, on PostgreSQL as on SQLite.
    """
    value = db.value(
        "SELECT nanocents FROM balances WHERE account_id = ? {for_update}", (account_id,)
    )
    return int(value or 0)


def correct_balance(db: Ledger, account_id: int, cents: int, reason: str) -> dict[str, Any]:
    """Take *cents* (negative) off the balance as an ``adjustment``, e.g. a mistaken top-up.

    A correction needs a reason, is not a top-up (it never lifts the trial gate), and
    cannot take the balance below zero: the check and the insert are one transaction,
    so concurrent usage cannot slip in between. Like every money change it is a row of
    ``transactions``, which the ``balances`` cache follows by trigger.
    """
    account_row(db, account_id)
    if cents >= 0:
        raise validation_error("cents", "a correction must be < 0 cents")
    bounded("cents", cents)
    control_free("reason", reason)
    if not reason.strip():
        raise validation_error("reason", "is required for a correction (a negative amount)")
    delta = cents * pricing.NANOCENTS_PER_CENT
    with db.transaction():
        current = balance_nanocents(db, account_id)
        if current + delta < 0:
            raise DatorusError(
                "VALIDATION_ERROR",
                message=(
                    f"A correction of {cents} cents would take the balance of account"
                    f" {account_id} below zero: it is {pricing.whole_cents(current)} cents."
                ),
                details={
                    "field": "cents",
                    "reason": "would take the balance below zero",
                    "balanceCents": pricing.whole_cents(current),
                },
            )
        db.execute(
            "INSERT INTO transactions (account_id, kind, nanocents, reason)"
            " VALUES (?, 'adjustment', ?, ?)",
            (account_id, delta, reason.strip()),
        )
    return _balance_answer(db, account_id, True, "adjustment")


def insert_trial_grant(db: Ledger, account_id: int, trial_bytes: int, reason: str) -> None:
    """Grant *trial_bytes* once per account (inside the caller's transaction): not when
    the account has any trial grant already (the one made with it included)."""
    db.execute(
        "INSERT INTO transactions (account_id, kind, trial_bytes, reason, external_id)"
        " SELECT ?, 'trial_grant', ?, ?, ?"
        " WHERE NOT EXISTS (SELECT 1 FROM transactions"
        " WHERE account_id = ? AND kind = 'trial_grant')"
        " ON CONFLICT (external_id) DO NOTHING",
        (account_id, trial_bytes, reason, f"trial:{account_id}", account_id),
    )


def credit_payment(
    db: Ledger,
    account_id: int,
    cents: int,
    payment_id: str,
    reason: str,
    event_id: str | None = None,
    event_type: str | None = None,
    source: str = "stripe",
) -> bool:
    """Credit *cents* for card payment *payment_id* at most once; True if this call did.

    The payment event's id (when given) is recorded in the same transaction as the credit.
    """
    external = f"stripe:{payment_id}"
    with db.transaction():
        if event_id is not None:
            db.execute(
                "INSERT INTO stripe_events (id, type, account_id, external_id)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (event_id, event_type or "", account_id, external),
            )
        cur = db.execute(
            "INSERT INTO transactions (account_id, kind, nanocents, reason, external_id)"
            " VALUES (?, 'topup', ?, ?, ?) ON CONFLICT (external_id) DO NOTHING",
            (account_id, cents * pricing.NANOCENTS_PER_CENT, reason, external),
        )
        if cur.rowcount == 1:
            _purchased(db, account_id, cents, source, reason, payment_id)
    return cur.rowcount == 1


def _purchased(
    db: Ledger,
    account_id: int,
    cents: int,
    source: str,
    reason: str | None,
    payment_id: str | None = None,
) -> None:
    """``credits.purchased`` for a credit just inserted (in the caller's transaction)."""
    data: dict[str, Any] = {
        "account_id": account_id,
        "amount_cents": cents,
        "balance_cents": pricing.whole_cents(balance_nanocents(db, account_id)),
        "source": source,
        "reason": reason,
    }
    if payment_id is not None:
        data["payment_id"] = payment_id
    events.emit(db, "credits.purchased", account_id, data)


def transactions(db: Ledger, account_id: int, limit: int = 50) -> list[dict[str, Any]]:
    """The account's most recent transactions, newest first."""
    account_row(db, account_id)
    return db.query(
        "SELECT id, kind, nanocents, trial_bytes, bytes, requests, reason, external_id,"
        " created_at FROM transactions WHERE account_id = ? ORDER BY id DESC LIMIT ?",
        (account_id, limit),
    )


_MONEY_SQL = (
    "SELECT id, id AS first_id, kind, nanocents, trial_bytes, bytes, requests, reason,"
    " external_id, created_at, created_at AS first_created_at, 1 AS transactions"
    " FROM transactions WHERE account_id = ? AND kind != 'usage' ORDER BY id DESC LIMIT ?"
)
_LAST_USAGE_SQL = (
    "SELECT id, created_at FROM transactions WHERE account_id = ? AND kind = 'usage'"
    " AND created_at < ? ORDER BY created_at DESC, id DESC LIMIT 1"
)
_USAGE_DAYS_SQL = (
    "SELECT substr(created_at, 1, 10) AS day, MAX(id) AS id, MIN(id) AS first_id,"
    " 'usage' AS kind, SUM(nanocents) AS nanocents, SUM(trial_bytes) AS trial_bytes,"
    " SUM(bytes) AS bytes, SUM(requests) AS requests, NULL AS reason, NULL AS external_id,"
    " MAX(created_at) AS created_at, MIN(created_at) AS first_created_at,"
    " COUNT(*) AS transactions"
    " FROM transactions WHERE account_id = ? AND kind = 'usage' AND created_at >= ?"
    " GROUP BY day"
)


def credit_history(db: Ledger, account_id: int, limit: int) -> dict[str, Any]:
    """The account's balance and its newest *limit* money rows, with usage rolled up per day.

    Every transaction that is not usage (top-ups, trial grants, lease charges,
    adjustments) is a row of its own; the usage the gateway flushes (a transaction per
    account every ``flush_ms``) is one row per UTC day, placed at that day's newest
    usage. ``transactions`` stays the untouched truth: this only reads it, in one
    snapshot with the balance, so the rows of a whole history add up to the balance.
    Newest first; each row has ``first_id``/``id``, ``first_created_at``/``created_at``
    and ``transactions`` (how many it rolls up).
    """
    account_row(db, account_id)
    with db.snapshot():  # one read snapshot: the balance and the rows agree
        bal = db.execute(
            "SELECT nanocents, trial_bytes FROM balances WHERE account_id = ?", (account_id,)
        ).fetchone() or (0, 0)
        money = db.query(_MONEY_SQL, (account_id, limit))
        # (newest id, usage day or "", row): money rows, then one entry per usage day
        rows: list[tuple[int, str, dict[str, Any]]] = [(r["id"], "", r) for r in money]
        before, days = "9999", 0
        while days < limit:  # one index probe per day with usage, newest day first
            row = db.execute(_LAST_USAGE_SQL, (account_id, before)).fetchone()
            if row is None:
                break
            before = row[1][:10]  # 'YYYY-MM-DD' sorts before that day's timestamps
            rows.append((row[0], before, {}))
            days += 1
        rows = sorted(rows, key=lambda x: -x[0])[:limit]
        shown = [day for _, day, _ in rows if day]
        if shown:
            usage = {r.pop("day"): r for r in db.query(_USAGE_DAYS_SQL, (account_id, min(shown)))}
            rows = [(i, day, usage[day] if day else r) for i, day, r in rows]
        items = [r for _, _, r in rows]
    return {"balance_nanocents": bal[0], "trial_bytes": bal[1], "items": items}


def _balance_answer(db: Ledger, account_id: int, applied: bool, kind: str) -> dict[str, Any]:
    """What a top-up or correction answers: the balance after it, and what it was."""
    acc = show_account(db, account_id)
    return {
        "id": account_id,
        "balanceCents": acc["balanceCents"],
        "balanceNanocents": acc["balanceNanocents"],
        "applied": applied,
        "kind": kind,
    }
