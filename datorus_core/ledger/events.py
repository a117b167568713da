"""Events, subscriptions and the delivery outbox in the ledger (issue 18).

An event is written by :func:`emit` inside the transaction of the change it describes
(a top-up, a lease, a suspension), so it exists exactly when the change committed. On
PostgreSQL every writer of events takes the events lock just before its first event
insert and holds it to its commit: ids then commit in id order, and a reader that saw
id *n* never later finds a smaller one (``GET /account/events`` and the dispatcher read
"after *n*"). On SQLite one writer at a time gives the same.

Delivery is an outbox: :func:`dispatch` fans new events out to the subscriptions that
match them (``deliveries`` rows, pending), :func:`claim_due` hands due rows to one
sender among every process on the ledger, :func:`record` keeps the outcome.
"""

from __future__ import annotations

import json
import secrets as _secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import events as ev
from ..envelope import DatorusError, validation_error
from .db import Ledger
from .dialect import POSTGRES, Dialect

EVENT_COLUMNS = "id, type, account_id, data, created_at"
MAX_SUBSCRIPTIONS = 20  # per account
# an event insert that may name a dedupe key (ON CONFLICT: a second writer skips it)
INSERT_SQL = (
    "INSERT INTO events (type, account_id, data, dedupe) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (dedupe) DO NOTHING"
)


def lock_sql(dialect: Dialect) -> str | None:
    """The statement that orders event commits (PostgreSQL), or None (SQLite)."""
    if dialect is not POSTGRES:
        return None
    from .schema_postgres import EVENTS_LOCK

    return f"SELECT pg_advisory_xact_lock({EVENTS_LOCK})"


def encode(data: dict[str, Any]) -> str:
    """An event's data as stored."""
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def emit(
    db: Ledger,
    event_type: str,
    account_id: int | None,
    data: dict[str, Any],
    dedupe: str | None = None,
) -> bool:
    """Append an event inside the caller's write transaction, as its last statements;
    False when its *dedupe* key was written before (nothing is then written)."""
    assert event_type in ev.TYPES, event_type
    lock = lock_sql(db.dialect)
    if lock is not None:
        db.execute(lock)
    return db.execute(INSERT_SQL, (event_type, account_id, encode(data), dedupe)).rowcount == 1


def emit_now(
    db: Ledger,
    event_type: str,
    account_id: int | None,
    data: dict[str, Any],
    dedupe: str | None = None,
) -> bool:
    """:func:`emit` in a transaction of its own (an event that describes no ledger change)."""
    with db.transaction():
        return emit(db, event_type, account_id, data, dedupe)


def last_topup_id(db: Ledger, account_id: int) -> int:
    """The id of the account's newest top-up (0: none): a crossing's key, so that an event
    or a charge made "once per crossing" happens again only after money came in."""
    return int(
        db.value(
            "SELECT MAX(id) FROM transactions WHERE account_id = ? AND kind = 'topup'",
            (account_id,),
        )
        or 0
    )


def after(db: Ledger, account_id: int | None, after_id: int, limit: int) -> list[dict[str, Any]]:
    """The events after *after_id*, oldest first: the account's own, or (``None``) all."""
    if account_id is None:
        rows = db.query(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
    else:
        rows = db.query(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE account_id = ? AND id > ?"
            " ORDER BY id LIMIT ?",
            (account_id, after_id, limit),
        )
    return [ev.view(r) for r in rows]


def newest_of_type(db: Ledger, account_id: int, type_: str, limit: int) -> list[dict[str, Any]]:
    """The account's newest *limit* events of one type, newest first."""
    rows = db.query(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE account_id = ? AND type = ?"
        " ORDER BY id DESC LIMIT ?",
        (account_id, type_, limit),
    )
    return [ev.view(r) for r in rows]


def count(db: Ledger, account_id: int) -> int:
    """How many events the account has in the log (``events_account`` counts them)."""
    return int(db.value("SELECT COUNT(*) FROM events WHERE account_id = ?", (account_id,)) or 0)


def prune(db: Ledger, days: int) -> int:
    """Delete events older than *days* days and their deliveries; how many events went."""
    with db.transaction():
        cutoff = db.value("SELECT MAX(id) FROM events WHERE created_at < ?", (_days_ago(db, days),))
        if cutoff is None:
            return 0
        db.execute("DELETE FROM deliveries WHERE event_id <= ?", (cutoff,))
        return db.execute("DELETE FROM events WHERE id <= ?", (cutoff,)).rowcount


def _days_ago(db: Ledger, days: int) -> str:
    import datetime as dt

    t = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- subscriptions ------------------------------------------------------------------------

SUB_COLUMNS = (
    "id, account_id, kind, target, events, created_at, last_success_at, last_failure_at,"
    " last_failure"
)


def subscription_view(row: dict[str, Any]) -> dict[str, Any]:
    """A subscription as the API and the CLI show it (never its secret)."""
    return {
        "id": str(row["id"]),
        "kind": row["kind"],
        "url" if row["kind"] == "webhook" else "target": row["target"],
        "events": row["events"].split(","),
        "created_at": row["created_at"],
        "last_success_at": row["last_success_at"],
        "last_failure_at": row["last_failure_at"],
        "last_failure": row["last_failure"],
    }


def add_subscription(
    db: Ledger, account_id: int | None, kind: str, target: str, patterns: Sequence[str]
) -> dict[str, Any]:
    """A new subscription; its signing secret is in the answer (``secret``) this once."""
    secret = "whsec_" + _secrets.token_urlsafe(32) if kind == "webhook" else None
    with db.transaction():
        if account_id is not None:
            n = db.value(
                "SELECT COUNT(*) FROM subscriptions WHERE account_id = ? AND deleted_at IS NULL",
                (account_id,),
            )
            if int(n or 0) >= MAX_SUBSCRIPTIONS:
                raise validation_error(
                    "url", f"an account may have at most {MAX_SUBSCRIPTIONS} webhooks"
                )
        sid = db.insert(
            "INSERT INTO subscriptions (account_id, kind, target, events, secret)"
            " VALUES (?, ?, ?, ?, ?) RETURNING id",
            (account_id, kind, target, ",".join(patterns), secret),
        )
    row = db.one(f"SELECT {SUB_COLUMNS} FROM subscriptions WHERE id = ?", (sid,))
    assert row is not None
    out = subscription_view(row)
    if secret is not None:
        out["secret"] = secret
    return out


def subscriptions(db: Ledger, account_id: int | None) -> list[dict[str, Any]]:
    """The live subscriptions of an account, or (``None``) the operator's notifiers."""
    where = "account_id = ?" if account_id is not None else "account_id IS NULL"
    args = (account_id,) if account_id is not None else ()
    return [
        subscription_view(r)
        for r in db.query(
            f"SELECT {SUB_COLUMNS} FROM subscriptions WHERE {where} AND deleted_at IS NULL"
            " ORDER BY id",
            args,
        )
    ]


def get_subscription(db: Ledger, account_id: int | None, sub_id: int) -> dict[str, Any]:
    """One live subscription of the account (or operator); 404 otherwise. Has ``secret``."""
    where = "account_id = ?" if account_id is not None else "account_id IS NULL"
    args: tuple[Any, ...] = (sub_id, account_id) if account_id is not None else (sub_id,)
    row = db.one(
        f"SELECT {SUB_COLUMNS}, secret FROM subscriptions WHERE id = ? AND {where}"
        " AND deleted_at IS NULL",
        args,
    )
    if row is None:
        # an account's subscriptions are its webhooks; the operator's (no account) notifiers
        what = "webhook" if account_id is not None else "notifier"
        raise DatorusError("RESOURCE_NOT_FOUND", details={what: str(sub_id)})
    return row


def remove_subscription(db: Ledger, account_id: int | None, sub_id: int) -> dict[str, Any]:
    """Delete a subscription (its pending deliveries are dropped); 404 if not live."""
    get_subscription(db, account_id, sub_id)
    with db.transaction():
        db.execute("UPDATE subscriptions SET deleted_at = {now} WHERE id = ?", (sub_id,))
        db.execute(
            "UPDATE deliveries SET status = 'failed', last_error = 'subscription removed',"
            " done_at = {now} WHERE subscription_id = ? AND status = 'pending'",
            (sub_id,),
        )
    return {"id": str(sub_id), "deleted": True}


# -- the outbox ---------------------------------------------------------------------------

_DISPATCH = "dispatch"


def dispatch(db: Ledger, now_ms: int, batch: int = 500) -> int:
    """Fan the events not yet dispatched out to the subscriptions matching them: one
    pending delivery each. Once among every process (the cursor is read and moved in
    one write transaction). Returns how many events were looked at. Opens no write
    transaction while there is nothing new (it runs twice a second in every gateway)."""
    cursor = db.value("SELECT last_id FROM event_cursor WHERE name = ?", (_DISPATCH,))
    newest = db.value("SELECT MAX(id) FROM events")
    if newest is None or (cursor is not None and int(cursor) >= int(newest)):
        return 0
    with db.transaction():
        db.execute(
            "INSERT {or_ignore} INTO event_cursor (name, last_id) VALUES (?, 0)"
            " {on_conflict_ignore}",
            (_DISPATCH,),
        )
        last = int(
            db.value("SELECT last_id FROM event_cursor WHERE name = ? {for_update}", (_DISPATCH,))
        )
        rows = db.query(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (last, batch),
        )
        if not rows:
            return 0
        subs = db.query("SELECT id, account_id, events FROM subscriptions WHERE deleted_at IS NULL")
        out: list[tuple[int, int, int, int]] = []
        for r in rows:
            for s in subs:
                mine = s["account_id"] is None or s["account_id"] == r["account_id"]
                if mine and ev.matches(s["events"].split(","), r["type"]):
                    out.append((s["id"], r["id"], now_ms, now_ms))
        if out:
            db.execute_many(
                "INSERT INTO deliveries (subscription_id, event_id, next_at, first_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (subscription_id, event_id) DO NOTHING",
                out,
            )
        db.execute(
            "UPDATE event_cursor SET last_id = ? WHERE name = ?", (rows[-1]["id"], _DISPATCH)
        )
    return len(rows)


def claim_due(db: Ledger, now_ms: int, lease_ms: int, limit: int) -> list[dict[str, Any]]:
    """Claim up to *limit* due pending deliveries for *lease_ms* (another process skips
    them meanwhile), oldest due first, at most one per subscription and none of one whose
    delivery is under way (a subscription's deliveries go one at a time, so a dead
    receiver holds up only itself), with their event and subscription. Opens no write
    transaction while nothing is due."""
    if not db.value(
        "SELECT 1 FROM deliveries WHERE status = 'pending' AND next_at <= ?"
        " AND claim_until <= ? LIMIT 1",
        (now_ms, now_ms),
    ):
        return []
    with db.transaction():
        rows = db.query(
            "SELECT d.id, d.subscription_id, d.event_id, d.attempts, d.first_at"
            " FROM deliveries d WHERE d.status = 'pending' AND d.next_at <= ?"
            " AND d.claim_until <= ? AND d.subscription_id NOT IN ("
            "SELECT subscription_id FROM deliveries WHERE status = 'pending'"
            " AND claim_until > ?) ORDER BY d.next_at, d.id LIMIT ?",
            (now_ms, now_ms, now_ms, limit * 4),
        )
        seen: set[int] = set()
        picked: list[dict[str, Any]] = []
        for r in rows:
            if r["subscription_id"] not in seen and len(picked) < limit:
                seen.add(r["subscription_id"])
                picked.append(r)
        if picked:
            db.execute_many(
                "UPDATE deliveries SET claim_until = ? WHERE id = ?",
                [(now_ms + lease_ms, r["id"]) for r in picked],
            )
    if not picked:
        return []
    marks = ",".join("?" * len(picked))
    events = {
        int(e["id"]): e
        for e in db.query(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE id IN ({marks})",
            [r["event_id"] for r in picked],
        )
    }
    subs = {
        int(x["id"]): x
        for x in db.query(
            "SELECT id, account_id, kind, target, secret, deleted_at FROM subscriptions"
            f" WHERE id IN ({marks})",
            [r["subscription_id"] for r in picked],
        )
    }
    out, gone = [], []
    for r in picked:
        event, sub = events.get(r["event_id"]), subs.get(r["subscription_id"])
        if event is None or sub is None or sub["deleted_at"] is not None:
            gone.append(Outcome(r["id"], r["subscription_id"], False, None, "gone", None))
            continue
        out.append({**r, "event": ev.view(event), "subscription": sub})
    if gone:
        record_many(db, gone)
    return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """One delivery attempt's outcome (see :func:`record`)."""

    delivery_id: int
    subscription_id: int
    ok: bool
    status: int | None
    error: str | None
    retry_at_ms: int | None


def record_many(db: Ledger, outcomes: Sequence[Outcome]) -> None:
    """Several attempts' outcomes in one transaction (as :func:`record` each)."""
    done = [(o.status, o.delivery_id) for o in outcomes if o.ok]
    failed = [(o.status, o.error, o.delivery_id) for o in outcomes
              if not o.ok and o.retry_at_ms is None]  # fmt: skip
    retry = [(o.status, o.error, o.retry_at_ms, o.delivery_id) for o in outcomes
             if not o.ok and o.retry_at_ms is not None]  # fmt: skip
    with db.transaction():
        if done:
            db.execute_many(
                "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1,"
                " last_status = ?, last_error = NULL, done_at = {now}, claim_until = 0"
                " WHERE id = ?",
                done,
            )
        if failed:
            db.execute_many(
                "UPDATE deliveries SET status = 'failed', attempts = attempts + 1,"
                " last_status = ?, last_error = ?, done_at = {now}, claim_until = 0"
                " WHERE id = ?",
                failed,
            )
        if retry:
            db.execute_many(
                "UPDATE deliveries SET attempts = attempts + 1, last_status = ?,"
                " last_error = ?, next_at = ?, claim_until = 0 WHERE id = ?",
                retry,
            )
        ok_subs = sorted({o.subscription_id for o in outcomes if o.ok})
        if ok_subs:
            db.execute_many(
                "UPDATE subscriptions SET last_success_at = {now} WHERE id = ?",
                [(i,) for i in ok_subs],
            )
        bad = {o.subscription_id: o.error for o in outcomes if not o.ok}
        if bad:
            db.execute_many(
                "UPDATE subscriptions SET last_failure_at = {now}, last_failure = ? WHERE id = ?",
                [(e, i) for i, e in sorted(bad.items())],
            )


def record(
    db: Ledger,
    delivery_id: int,
    subscription_id: int,
    ok: bool,
    status: int | None,
    error: str | None,
    retry_at_ms: int | None,
) -> None:
    """The outcome of one attempt: delivered; failed for good (*retry_at_ms* None); or
    pending again at *retry_at_ms*. The subscription's health follows."""
    record_many(db, [Outcome(delivery_id, subscription_id, ok, status, error, retry_at_ms)])


def plugin_health(db: Ledger, customers: bool = False) -> dict[str, dict[str, Any]]:
    """Per notifier kind: the operator's live notifiers (*customers*: the customers'
    webhooks instead) and the outbox's record of them (the last success, the last
    failure and why, deliveries by status). The two are never mixed: one customer's
    failing receiver says nothing about the operator's notifiers."""
    whose = "account_id IS NOT NULL" if customers else "account_id IS NULL"
    out: dict[str, dict[str, Any]] = {}
    for r in db.query(
        "SELECT kind, COUNT(*) AS subscriptions, MAX(last_success_at) AS last_success_at,"
        f" MAX(last_failure_at) AS last_failure_at FROM subscriptions"
        f" WHERE deleted_at IS NULL AND {whose} GROUP BY kind"
    ):
        why = db.value(
            "SELECT last_failure FROM subscriptions WHERE kind = ? AND deleted_at IS NULL"
            f" AND {whose} AND last_failure_at IS NOT NULL"
            " ORDER BY last_failure_at DESC, id DESC LIMIT 1",
            (r["kind"],),
        )
        counts = {
            s: int(n)
            for s, n in db.execute(
                "SELECT d.status, COUNT(*) FROM deliveries d JOIN subscriptions s"
                f" ON s.id = d.subscription_id WHERE s.kind = ? AND s.{whose}"
                " GROUP BY d.status",
                (r["kind"],),
            ).fetchall()
        }
        out[r["kind"]] = {**r, "last_failure": why, "deliveries": counts}
    return out


def note_health(db: Ledger, sub_id: int, ok: bool, error: str | None) -> None:
    """Record a delivery made outside the outbox (``datorus notifier test``)."""
    with db.transaction():
        if ok:
            db.execute("UPDATE subscriptions SET last_success_at = {now} WHERE id = ?", (sub_id,))
        else:
            db.execute(
                "UPDATE subscriptions SET last_failure_at = {now}, last_failure = ? WHERE id = ?",
                (error, sub_id),
            )


def deliveries(
    db: Ledger, account_id: int | None, sub_id: int, limit: int = 50, before: int | None = None
) -> list[dict[str, Any]]:
    """The newest deliveries of one subscription (pending, delivered, failed), those
    with ids below *before* if given."""
    get_subscription(db, account_id, sub_id)
    older = "" if before is None else " AND id < ?"
    args = (sub_id, limit) if before is None else (sub_id, before, limit)
    return db.query(
        "SELECT id, event_id, status, attempts, last_status, last_error, done_at"
        f" FROM deliveries WHERE subscription_id = ?{older} ORDER BY id DESC LIMIT ?",
        args,
    )


def delivery_count(db: Ledger, sub_id: int) -> int:
    """How many deliveries one subscription has on record."""
    n = db.value("SELECT COUNT(*) FROM deliveries WHERE subscription_id = ?", (sub_id,))
    return int(n or 0)


# -- events swept from time ---------------------------------------------------------------


def expire_leases(db: Ledger, now: int) -> int:
    """Write ``lease.expired`` for each lease that ran out unreleased and has none yet
    (no write transaction while there is none)."""
    if not db.value(
        "SELECT 1 FROM leases WHERE announced = 0 AND released_at IS NULL AND expires_at <= ?"
        " LIMIT 1",
        (now,),
    ):
        return 0
    with db.transaction():
        rows = db.query(
            "SELECT id, account_id, egress_id, expires_at FROM leases"
            " WHERE announced = 0 AND released_at IS NULL AND expires_at <= ?"
            " ORDER BY expires_at, id LIMIT 500 {for_update}",
            (now,),
        )
        if not rows:
            return 0
        db.execute_many("UPDATE leases SET announced = 1 WHERE id = ?", [(r["id"],) for r in rows])
        for r in rows:
            emit(
                db,
                "lease.expired",
                r["account_id"],
                {"lease_id": r["id"], "proxy_id": str(r["egress_id"]),
                 "expired_at": r["expires_at"]},
                dedupe=f"lease.expired:{r['id']}",
            )  # fmt: skip
    return len(rows)


def rows_for(
    items: Iterable[tuple[str, int | None, dict[str, Any], str | None]],
) -> list[tuple[str, int | None, str, str | None]]:
    """Parameter rows of :data:`INSERT_SQL` for ``(type, account_id, data, dedupe)``."""
    return [(t, a, encode(d), k) for t, a, d, k in items]


# -- low-balance alerts and auto-recharge -------------------------------------------------

NANO = 10**9  # nanocents per cent
ALERT_COLUMNS = "low_cents, mail_low, recharge_threshold_cents, recharge_amount_cents"


def alerts(db: Ledger, account_id: int) -> dict[str, Any]:
    """The account's low-balance mark and auto-recharge (nulls: none set)."""
    row = db.one(f"SELECT {ALERT_COLUMNS} FROM account_alerts WHERE account_id = ?", (account_id,))
    return row or dict.fromkeys(ALERT_COLUMNS.split(", ")) | {"mail_low": 1}


def set_alerts(db: Ledger, account_id: int, **values: Any) -> dict[str, Any]:
    """Set some of the account's alert columns (the others stay)."""
    cols = [c for c in ALERT_COLUMNS.split(", ") if c in values]
    with db.transaction():
        db.execute(
            "INSERT INTO account_alerts (account_id) VALUES (?)"
            " ON CONFLICT (account_id) DO NOTHING",
            (account_id,),
        )
        if cols:
            db.execute(
                f"UPDATE account_alerts SET {', '.join(f'{c} = ?' for c in cols)}"
                " WHERE account_id = ?",
                [*(values[c] for c in cols), account_id],
            )
    return alerts(db, account_id)


def low_balances(db: Ledger) -> list[dict[str, Any]]:
    """Topped-up accounts whose balance is below their low mark, with their email."""
    return db.query(
        "SELECT a.id AS account_id, a.email, b.nanocents, l.low_cents, l.mail_low"
        " FROM account_alerts l JOIN accounts a ON a.id = l.account_id"
        " JOIN balances b ON b.account_id = l.account_id"
        " WHERE l.low_cents IS NOT NULL AND b.topped_up = 1"
        " AND b.nanocents < l.low_cents * ?",
        (NANO,),
    )


def emit_low(db: Ledger, row: dict[str, Any]) -> bool:
    """``credits.low`` for *row* (of :func:`low_balances`), once per top-up; True if this
    call wrote it (the caller then mails it)."""
    aid = row["account_id"]
    with db.transaction():
        key = f"credits.low:{aid}:{last_topup_id(db, aid)}"
        return emit(
            db,
            "credits.low",
            aid,
            {
                "account_id": aid,
                "balance_cents": row["nanocents"] // NANO,
                "threshold_cents": row["low_cents"],
            },
            dedupe=key,
        )


def due_recharges(db: Ledger) -> list[dict[str, Any]]:
    """Accounts with auto-recharge, a saved card and a balance below the threshold."""
    return db.query(
        "SELECT l.account_id, b.nanocents, l.recharge_threshold_cents,"
        " l.recharge_amount_cents FROM account_alerts l"
        " JOIN accounts a ON a.id = l.account_id JOIN balances b ON b.account_id = a.id"
        " WHERE l.recharge_threshold_cents IS NOT NULL AND l.recharge_amount_cents IS NOT NULL"
        " AND a.stripe_payment_method IS NOT NULL AND a.status = 'active'"
        " AND b.nanocents < l.recharge_threshold_cents * ?",
        (NANO,),
    )


def claim_recharge(db: Ledger, account_id: int, now: int, retry_after: int = 300) -> str | None:
    """The crossing's key if this process is to charge it now, else None.

    A crossing is the balance below the threshold since the account's newest top-up: its
    key names that top-up, so one dip is charged once, however many gateways see it. The
    mark is taken in the ledger (the first writer wins); one left ``claimed`` longer than
    *retry_after* seconds (its process died mid-charge) is taken again, and the charge
    repeated with the same idempotency key, which Stripe answers without a second charge.
    """
    with db.transaction():
        key = f"autorecharge:{account_id}:{last_topup_id(db, account_id)}"
        cur = db.execute(
            "INSERT INTO event_marks (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (key, f"claimed:{now}"),
        )
        if cur.rowcount == 1:
            return key
        value = str(db.value("SELECT value FROM event_marks WHERE name = ? {for_update}", (key,)))
        if value.startswith("claimed:") and int(value.split(":")[1]) < now - retry_after:
            db.execute("UPDATE event_marks SET value = ? WHERE name = ?", (f"claimed:{now}", key))
            return key
    return None


def finish_recharge(db: Ledger, key: str, outcome: str) -> None:
    """Mark a crossing's charge done (``charged``, ``declined``...): never tried again."""
    with db.transaction():
        db.execute("UPDATE event_marks SET value = ? WHERE name = ?", (outcome, key))
