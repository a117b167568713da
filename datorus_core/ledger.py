"""Operator and API operations on the ledger (synchronous, through sqlite-utils).

Every function takes an open ``sqlite_utils.Database`` and raises
:class:`~datorus_core.envelope.DatorusError` with a registered code on bad input,
so the CLI and the REST API report failures the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from . import pricing
from .envelope import DatorusError, control_free
from .hashing import hash_secret, new_password, new_username
from .schema import connect, migrate

EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}")  # fullmatch only


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error)."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")


def open_ledger(path: str | Path, create: bool = True) -> sqlite_utils.Database:
    """Open (and migrate) the ledger at *path*; with ``create=False`` a missing file is an error."""
    path = str(path)
    if not create and path != ":memory:" and not Path(path).exists():
        raise DatorusError(
            "SERVICE_UNAVAILABLE",
            message=f"No ledger at {path}: run 'datorus init' first.",
            details={"db": path},
        )
    conn = connect(path)
    migrate(conn)
    return sqlite_utils.Database(conn)


def _validation(field: str, reason: str) -> DatorusError:
    return DatorusError("VALIDATION_ERROR", details={"field": field, "reason": reason})


# Upper bounds that keep every amount an exact 64-bit integer in the ledger (SQLite
# INTEGER; nanocents = cents x 10^9) with room to spare, and say so instead of overflowing.
LIMITS = {
    "trial_bytes": 10**15,  # 1 PB
    "price_cents_per_gb": 10**9,  # one cent a byte
    "rps": 10**6,
    "burst": 10**6,
    "max_tunnels": 10**6,
    "max_bytes": 10**18,
    "cents": 10**9,  # $10 million in one top-up or correction
}
MAX_BALANCE_CENTS = 10**9  # $10 million: 10^18 nanocents, well inside 2^63


def _bounded(field: str, value: int) -> None:
    top = LIMITS.get(field)
    if top is not None and abs(value) > top:
        raise _validation(field, f"must be at most {top:,}".replace(",", "_"))


def _non_negative(field: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise _validation(field, "must be >= 0")
    if value is not None:
        _bounded(field, value)


def _positive(field: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise _validation(field, "must be > 0")
    if value is not None:
        _bounded(field, value)


def create_account(
    db: sqlite_utils.Database,
    email: str,
    trial_bytes: int,
    price_cents_per_gb: int | None = None,
    rps: int | None = None,
    burst: int | None = None,
    max_tunnels: int | None = None,
    provider: str | None = None,
    verified: bool = False,
) -> dict[str, Any]:
    """Create an account with its trial grant; ``EMAIL_TAKEN`` if the email exists.

    *verified*: the operator vouches for the email (the CLI), so no verification mail
    can grant a second trial; accounts signed up through the API verify to get theirs.
    """
    email = email.strip()
    if not EMAIL_RE.fullmatch(email):
        raise _validation("email", "must be an email address")
    _non_negative("trial_bytes", trial_bytes)
    _non_negative("price_cents_per_gb", price_cents_per_gb)
    _positive("rps", rps)
    _positive("burst", burst)
    _positive("max_tunnels", max_tunnels)
    existing = find_account_by_email(db, email)
    if existing is not None:
        if existing["provider"] and existing["provider"] != provider:
            raise DatorusError(
                "EMAIL_PROVIDER_MISMATCH", details={"provider": existing["provider"]}
            )
        raise DatorusError("EMAIL_TAKEN", details={"email": email})
    with transaction(db):
        cur = db.conn.execute(
            "INSERT INTO accounts (email, provider, price_cents_per_gb, rps, burst, max_tunnels,"
            " verified_at) VALUES (?, ?, ?, ?, ?, ?,"
            " CASE WHEN ? THEN strftime('%Y-%m-%dT%H:%M:%SZ', 'now') END)",
            (email, provider, price_cents_per_gb, rps, burst, max_tunnels, verified),
        )
        account_id = cur.lastrowid
        db.conn.execute("INSERT INTO balances (account_id) VALUES (?)", (account_id,))
        if trial_bytes:
            db.conn.execute(
                "INSERT INTO transactions (account_id, kind, trial_bytes, reason)"
                " VALUES (?, 'trial_grant', ?, 'free trial')",
                (account_id, trial_bytes),
            )
    return {"id": account_id, "email": email}


def find_account_by_email(db: sqlite_utils.Database, email: str) -> dict[str, Any] | None:
    """The account row for *email* (case-insensitive), or None."""
    row = db.conn.execute(
        "SELECT id, email, provider, status FROM accounts WHERE email = ?", (email.strip(),)
    ).fetchone()
    return (
        None if row is None else dict(zip(("id", "email", "provider", "status"), row, strict=True))
    )


def _account_row(db: sqlite_utils.Database, account_id: int) -> dict[str, Any]:
    rows = list(db.query("SELECT * FROM accounts WHERE id = ?", [account_id]))
    if not rows:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"account": account_id})
    return rows[0]


def show_account(db: sqlite_utils.Database, account_id: int) -> dict[str, Any]:
    """The account with its trial remaining, balance and usage totals."""
    row = _account_row(db, account_id)
    ov = next(db.query("SELECT * FROM account_overview WHERE id = ?", [account_id]))
    return {
        "id": row["id"],
        "email": row["email"],
        "status": row["status"],
        "provider": row["provider"],
        "trialRemainingBytes": max(0, ov["trial_remaining_bytes"]),
        "balanceCents": pricing.whole_cents(ov["balance_nanocents"]),
        "balanceNanocents": ov["balance_nanocents"],
        "usedBytes": ov["used_bytes"],
        "requests": ov["requests"],
        "toppedUp": bool(ov["topped_up"]),
        "priceCentsPerGb": row["price_cents_per_gb"],
        "rps": row["rps"],
        "burst": row["burst"],
        "maxTunnels": row["max_tunnels"],
        "createdAt": row["created_at"],
    }


def list_accounts(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every account's overview row."""
    return list(db.query("SELECT * FROM account_overview ORDER BY id"))


def set_status(db: sqlite_utils.Database, account_id: int, status: str) -> dict[str, Any]:
    """Suspend or reactivate an account."""
    _account_row(db, account_id)
    with transaction(db):
        db.conn.execute("UPDATE accounts SET status = ? WHERE id = ?", (status, account_id))
    return {"id": account_id, "status": status}


def set_limits(
    db: sqlite_utils.Database,
    account_id: int,
    price_cents_per_gb: int | None = None,
    rps: int | None = None,
    burst: int | None = None,
    max_tunnels: int | None = None,
) -> dict[str, Any]:
    """Change an account's price or limits; None leaves a value as it is."""
    _account_row(db, account_id)
    _non_negative("price_cents_per_gb", price_cents_per_gb)
    _positive("rps", rps)
    _positive("burst", burst)
    _positive("max_tunnels", max_tunnels)
    changes = {
        k: v
        for k, v in {
            "price_cents_per_gb": price_cents_per_gb,
            "rps": rps,
            "burst": burst,
            "max_tunnels": max_tunnels,
        }.items()
        if v is not None
    }
    if changes:
        with transaction(db):
            db["accounts"].update(account_id, changes)
    return show_account(db, account_id)


def create_credential(
    db: sqlite_utils.Database,
    account_id: int,
    max_bytes: int | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """A new proxy credential; the password is returned this once and stored hashed."""
    _positive("max_bytes", max_bytes)  # the input first, then whether the account exists
    control_free("label", label)
    _account_row(db, account_id)
    username, password = new_username(), new_password()
    with transaction(db):
        cur = db.conn.execute(
            "INSERT INTO credentials (account_id, username, password_hash, max_bytes, label)"
            " VALUES (?, ?, ?, ?, ?)",
            (account_id, username, hash_secret(password), max_bytes, label),
        )
    return {
        "id": cur.lastrowid,
        "accountId": account_id,
        "username": username,
        "password": password,
        "maxBytes": max_bytes,
    }


def list_credentials(db: sqlite_utils.Database, account_id: int) -> list[dict[str, Any]]:
    """The account's credentials (never their hashes)."""
    _account_row(db, account_id)
    return [
        {
            "id": r["id"],
            "username": r["username"],
            "label": r["label"],
            "maxBytes": r["max_bytes"],
            "usedBytes": r["used"],
            "createdAt": r["created_at"],
            "revoked": r["revoked_at"] is not None,
        }
        for r in db.query(
            "SELECT c.*, COALESCE(u.bytes, 0) AS used FROM credentials c"
            " LEFT JOIN credential_usage u ON u.credential_id = c.id"
            " WHERE c.account_id = ? ORDER BY c.id",
            [account_id],
        )
    ]


def revoke_credential(
    db: sqlite_utils.Database, username: str, account_id: int | None = None
) -> dict[str, Any]:
    """Revoke a credential by username (optionally only within one account)."""
    sql = "SELECT id FROM credentials WHERE username = ?"
    args: list[Any] = [username]
    if account_id is not None:
        sql += " AND account_id = ?"
        args.append(account_id)
    row = db.conn.execute(sql, args).fetchone()
    if row is None:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"username": username})
    with transaction(db):
        db.conn.execute(
            "UPDATE credentials SET revoked_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')"
            " WHERE id = ? AND revoked_at IS NULL",
            (row[0],),
        )
    return {"username": username, "revoked": True}


def add_balance(
    db: sqlite_utils.Database,
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
        raise _validation("cents", "a top-up must be > 0 cents")
    _bounded("cents", cents)  # the input first, then whether the account exists
    control_free("reason", reason)
    _account_row(db, account_id)
    applied = True
    with transaction(db):
        (held,) = db.conn.execute(
            "SELECT COALESCE((SELECT nanocents FROM balances WHERE account_id = ?), 0)",
            (account_id,),
        ).fetchone()
        if (
            held + cents * pricing.NANOCENTS_PER_CENT
            > MAX_BALANCE_CENTS * pricing.NANOCENTS_PER_CENT
        ):
            raise _validation("cents", f"the balance may hold at most {MAX_BALANCE_CENTS} cents")
        cur = db.conn.execute(
            "INSERT INTO transactions (account_id, kind, nanocents, reason, external_id)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (external_id) DO NOTHING",
            (account_id, kind, cents * pricing.NANOCENTS_PER_CENT, reason, external_id),
        )
        applied = cur.rowcount == 1
    acc = show_account(db, account_id)
    return {
        "id": account_id,
        "balanceCents": acc["balanceCents"],
        "balanceNanocents": acc["balanceNanocents"],
        "applied": applied,
        "kind": kind,
    }


def correct_balance(
    db: sqlite_utils.Database, account_id: int, cents: int, reason: str
) -> dict[str, Any]:
    """Take *cents* (negative) off the balance as an ``adjustment``, e.g. a mistaken top-up.

    A correction needs a reason, is not a top-up (it never lifts the trial gate), and
    cannot take the balance below zero: the check and the insert are one transaction,
    so concurrent usage cannot slip in between. Like every money change it is a row of
    ``transactions``, which the ``balances`` cache follows by trigger.
    """
    _account_row(db, account_id)
    if cents >= 0:
        raise _validation("cents", "a correction must be < 0 cents")
    _bounded("cents", cents)
    control_free("reason", reason)
    if not reason.strip():
        raise _validation("reason", "is required for a correction (a negative amount)")
    delta = cents * pricing.NANOCENTS_PER_CENT
    with transaction(db):
        row = db.conn.execute(
            "SELECT nanocents FROM balances WHERE account_id = ?", (account_id,)
        ).fetchone()
        current = row[0] if row else 0
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
        db.conn.execute(
            "INSERT INTO transactions (account_id, kind, nanocents, reason)"
            " VALUES (?, 'adjustment', ?, ?)",
            (account_id, delta, reason.strip()),
        )
    acc = show_account(db, account_id)
    return {
        "id": account_id,
        "balanceCents": acc["balanceCents"],
        "balanceNanocents": acc["balanceNanocents"],
        "applied": True,
        "kind": "adjustment",
    }


def usage(db: sqlite_utils.Database, account_id: int, by_day: bool = False) -> dict[str, Any]:
    """Totals of requests, bytes and charges for the account (and per day with *by_day*)."""
    _account_row(db, account_id)
    ov = next(db.query("SELECT * FROM account_overview WHERE id = ?", [account_id]))
    out: dict[str, Any] = {
        "id": account_id,
        "requests": ov["requests"],
        "bytes": ov["used_bytes"],
        "chargedCents": pricing.whole_cents(ov["charged_nanocents"]),
        "chargedNanocents": ov["charged_nanocents"],
        "trialRemainingBytes": max(0, ov["trial_remaining_bytes"]),
        "balanceCents": pricing.whole_cents(ov["balance_nanocents"]),
        "balanceNanocents": ov["balance_nanocents"],
    }
    if by_day:
        out["days"] = [
            {
                "day": r["day"],
                "requests": r["requests"],
                "bytesUp": r["up"],
                "bytesDown": r["down"],
                "bytes": r["up"] + r["down"],
                "trialBytes": r["trial"],
                "chargedNanocents": r["nc"],
            }
            for r in db.query(
                "SELECT day, SUM(requests) AS requests, SUM(bytes_up) AS up,"
                " SUM(bytes_down) AS down, SUM(trial_bytes) AS trial, SUM(nanocents) AS nc"
                " FROM usage_daily WHERE account_id = ? GROUP BY day ORDER BY day",
                [account_id],
            )
        ]
    return out


def transactions(
    db: sqlite_utils.Database, account_id: int, limit: int = 50
) -> list[dict[str, Any]]:
    """The account's most recent transactions, newest first."""
    _account_row(db, account_id)
    return list(
        db.query(
            "SELECT id, kind, nanocents, trial_bytes, bytes, requests, reason, external_id,"
            " created_at FROM transactions WHERE account_id = ? ORDER BY id DESC LIMIT ?",
            [account_id, limit],
        )
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


def credit_history(db: sqlite_utils.Database, account_id: int, limit: int) -> dict[str, Any]:
    """The account's balance and its newest *limit* money rows, with usage rolled up per day.

    Every transaction that is not usage (top-ups, trial grants, lease charges,
    adjustments) is a row of its own; the usage the gateway flushes (a transaction per
    account every ``flush_ms``) is one row per UTC day, placed at that day's newest
    usage. ``transactions`` stays the untouched truth: this only reads it, in one
    snapshot with the balance, so the rows of a whole history add up to the balance.
    Newest first; each row has ``first_id``/``id``, ``first_created_at``/``created_at``
    and ``transactions`` (how many it rolls up).
    """
    _account_row(db, account_id)
    conn = db.conn
    conn.execute("BEGIN")  # one read snapshot: the balance and the rows agree
    try:
        bal = conn.execute(
            "SELECT nanocents, trial_bytes FROM balances WHERE account_id = ?", (account_id,)
        ).fetchone() or (0, 0)
        money = list(db.query(_MONEY_SQL, [account_id, limit]))
        # (newest id, usage day or "", row): money rows, then one entry per usage day
        rows: list[tuple[int, str, dict[str, Any]]] = [(r["id"], "", r) for r in money]
        before, days = "9999", 0
        while days < limit:  # one index probe per day with usage, newest day first
            row = conn.execute(_LAST_USAGE_SQL, (account_id, before)).fetchone()
            if row is None:
                break
            before = row[1][:10]  # 'YYYY-MM-DD' sorts before that day's timestamps
            rows.append((row[0], before, {}))
            days += 1
        rows = sorted(rows, key=lambda x: -x[0])[:limit]
        shown = [day for _, day, _ in rows if day]
        if shown:
            usage = {r.pop("day"): r for r in db.query(_USAGE_DAYS_SQL, [account_id, min(shown)])}
            rows = [(i, day, usage[day] if day else r) for i, day, r in rows]
        items = [r for _, _, r in rows]
    finally:
        conn.execute("COMMIT")
    return {"balance_nanocents": bal[0], "trial_bytes": bal[1], "items": items}


def receipt(db: sqlite_utils.Database, request_id: str) -> dict[str, Any]:
    """The receipt of one finished request."""
    rows = list(db.query("SELECT * FROM receipts WHERE request_id = ?", [request_id]))
    if not rows:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"requestId": request_id})
    return rows[0]


def parse_rule_target(spec: str, action: str) -> tuple[str, int | None]:
    """Split ``CIDR[:PORT]`` / ``DOMAIN[:PORT]`` / ``[v6]:PORT``; raise VALIDATION_ERROR."""
    from .policy import parse_rule

    try:
        return parse_rule(spec, allow_domains=(action == "deny"))
    except ValueError as e:
        raise _validation("rule", str(e)) from None


def add_policy_rule(db: sqlite_utils.Database, action: str, spec: str) -> dict[str, Any]:
    """Record an allow or deny rule; idempotent."""
    target, port = parse_rule_target(spec, action)
    with transaction(db):
        db.conn.execute(
            "INSERT INTO policy_rules (action, target, port) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (action, target, port),
        )
    rule = f"{action} {target}" + (f":{port}" if port is not None else "")
    return {"rule": rule, "action": action, "target": target, "port": port}


def remove_policy_rule(db: sqlite_utils.Database, action: str, spec: str) -> dict[str, Any]:
    """Delete an allow or deny rule; RESOURCE_NOT_FOUND if there is none."""
    target, port = parse_rule_target(spec, action)
    with transaction(db):
        cur = db.conn.execute(
            "DELETE FROM policy_rules WHERE action = ? AND target = ? AND port IS ?",
            (action, target, port),
        )
    if cur.rowcount == 0:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"rule": spec})
    return {"rule": f"{action} {spec}", "removed": True}


def list_policy_rules(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every operator policy rule."""
    return list(
        db.query("SELECT id, action, target, port, created_at FROM policy_rules ORDER BY id")
    )
