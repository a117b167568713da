"""Accounts and their proxy credentials in the ledger (synchronous).

Every function takes an open :class:`~.db.Ledger` and raises
:class:`~datorus_core.envelope.DatorusError` with a registered code on bad input, so
the CLI and the REST API report failures the same way. Every change here bumps
``config_version`` (a trigger), which a running gateway polls.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .. import pricing
from ..envelope import DatorusError, control_free, validation_error
from ..hashing import hash_secret, new_password, new_username
from . import events
from .db import Ledger

EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}")  # fullmatch only

# the columns an operator may change with set_limits (names are never taken from input)
LIMIT_COLUMNS = ("price_cents_per_gb", "rps", "burst", "max_tunnels")


# Upper bounds that keep every amount an exact 64-bit integer in the ledger (SQLite
# INTEGER, PostgreSQL BIGINT; nanocents = cents x 10^9) with room to spare, and say so
# instead of overflowing.
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


def bounded(field: str, value: int) -> None:
    """VALIDATION_ERROR naming *field* when ``|value|`` is above its :data:`LIMITS` bound.

    >>> bounded("cents", 10**9)
    >>> try:
    ...     bounded("cents", -(10**9) - 1)
    ... except DatorusError as e:
    ...     print(e.code, e.details)
    VALIDATION_ERROR {'field': 'cents', 'reason': 'must be at most 1_000_000_000'}
    """
    top = LIMITS.get(field)
    if top is not None and abs(value) > top:
        raise validation_error(field, f"must be at most {top:,}".replace(",", "_"))


def _non_negative(field: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise validation_error(field, "must be >= 0")
    if value is not None:
        bounded(field, value)


def _positive(field: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise validation_error(field, "must be > 0")
    if value is not None:
        bounded(field, value)


def create_account(
    db: Ledger,
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
        raise validation_error("email", "must be an email address")
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
    with db.transaction():
        account_id = db.insert(
            "INSERT INTO accounts (email, provider, price_cents_per_gb, rps, burst, max_tunnels,"
            " verified_at) VALUES (?, ?, ?, ?, ?, ?, CASE WHEN ? THEN {now} END) RETURNING id",
            (email, provider, price_cents_per_gb, rps, burst, max_tunnels, verified),
        )
        db.execute("INSERT INTO balances (account_id) VALUES (?)", (account_id,))
        if trial_bytes:
            db.execute(
                "INSERT INTO transactions (account_id, kind, trial_bytes, reason)"
                " VALUES (?, 'trial_grant', ?, 'free trial')",
                (account_id, trial_bytes),
            )
    return {"id": account_id, "email": email}


def find_account_by_email(db: Ledger, email: str) -> dict[str, Any] | None:
    """The account row for *email* (case-insensitive), or None."""
    return db.one(
        "SELECT id, email, provider, status FROM accounts WHERE lower(email) = lower(?)",
        (email.strip(),),
    )


def account_row(db: Ledger, account_id: int) -> dict[str, Any]:
    """The ``accounts`` row, or RESOURCE_NOT_FOUND."""
    row = db.one("SELECT * FROM accounts WHERE id = ?", (account_id,))
    if row is None:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"account": account_id})
    return row


def overview(db: Ledger, account_id: int) -> dict[str, Any]:
    """The account's ``account_overview`` row (trial, balance and usage totals)."""
    row = db.one("SELECT * FROM account_overview WHERE id = ?", (account_id,))
    assert row is not None, account_id
    return row


def show_account(db: Ledger, account_id: int) -> dict[str, Any]:
    """The account with its trial remaining, balance and usage totals."""
    row = account_row(db, account_id)
    ov = overview(db, account_id)
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


def list_accounts(db: Ledger) -> list[dict[str, Any]]:
    """Every account's overview row."""
    return db.query("SELECT * FROM account_overview ORDER BY id")


def set_status(db: Ledger, account_id: int, status: str) -> dict[str, Any]:
    """Suspend or reactivate an account."""
    account_row(db, account_id)
    with db.transaction():
        was = db.value("SELECT status FROM accounts WHERE id = ? {for_update}", (account_id,))
        db.execute("UPDATE accounts SET status = ? WHERE id = ?", (status, account_id))
        if status == "suspended" and was != "suspended":
            events.emit(db, "account.suspended", account_id, {"account_id": account_id})
    return {"id": account_id, "status": status}


def set_limits(
    db: Ledger,
    account_id: int,
    price_cents_per_gb: int | None = None,
    rps: int | None = None,
    burst: int | None = None,
    max_tunnels: int | None = None,
) -> dict[str, Any]:
    """Change an account's price or limits; None leaves a value as it is."""
    account_row(db, account_id)
    _non_negative("price_cents_per_gb", price_cents_per_gb)
    _positive("rps", rps)
    _positive("burst", burst)
    _positive("max_tunnels", max_tunnels)
    values = (price_cents_per_gb, rps, burst, max_tunnels)
    changes = [(k, v) for k, v in zip(LIMIT_COLUMNS, values, strict=True) if v is not None]
    if changes:
        sets = ", ".join(f"{k} = ?" for k, _ in changes)
        with db.transaction():
            db.execute(
                f"UPDATE accounts SET {sets} WHERE id = ?", [*(v for _, v in changes), account_id]
            )
    return show_account(db, account_id)


def set_display_name(db: Ledger, account_id: int, display_name: str | None) -> None:
    """The name the account gave at sign-up."""
    with db.transaction():
        db.execute("UPDATE accounts SET display_name = ? WHERE id = ?", (display_name, account_id))


def set_stripe_customer(db: Ledger, account_id: int, customer_id: str) -> None:
    """Remember the account's Stripe customer."""
    with db.transaction():
        db.execute(
            "UPDATE accounts SET stripe_customer_id = ? WHERE id = ?", (customer_id, account_id)
        )


def set_payment_method(db: Ledger, account_id: int, payment_method: str) -> None:
    """Remember the account's saved card (a Stripe payment method)."""
    with db.transaction():
        db.execute(
            "UPDATE accounts SET stripe_payment_method = ? WHERE id = ?",
            (payment_method, account_id),
        )


# -- proxy credentials --------------------------------------------------------------------


def create_credential(
    db: Ledger,
    account_id: int,
    max_bytes: int | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """A new proxy credential; the password is returned this once and stored hashed."""
    _positive("max_bytes", max_bytes)  # the input first, then whether the account exists
    control_free("label", label)
    account_row(db, account_id)
    username, password = new_username(), new_password()
    with db.transaction():
        credential_id = db.insert(
            "INSERT INTO credentials (account_id, username, password_hash, max_bytes, label)"
            " VALUES (?, ?, ?, ?, ?) RETURNING id",
            (account_id, username, hash_secret(password), max_bytes, label),
        )
    return {
        "id": credential_id,
        "accountId": account_id,
        "username": username,
        "password": password,
        "maxBytes": max_bytes,
    }


def credential_revoked(db: Ledger, username: str) -> bool | None:
    """Whether the credential *username* is revoked; None when there is none."""
    row = db.one("SELECT revoked_at FROM credentials WHERE username = ?", (username,))
    return None if row is None else row["revoked_at"] is not None


def add_credential(
    db: Ledger, account_id: int, username: str, password: str, label: str | None = None
) -> bool:
    """Make the credential *username* with *password* unless one of that name exists;
    True when this call made it.

    For a credential that several processes derive from one secret (the API's fetch
    credential): when they make it at once, one row results.
    """
    control_free("label", label)
    with db.transaction():
        cur = db.execute(
            "INSERT INTO credentials (account_id, username, password_hash, label)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (username) DO NOTHING",
            (account_id, username, hash_secret(password), label),
        )
    return cur.rowcount == 1


def add_credentials_bulk(db: Ledger, rows: Iterable[tuple[int, str, str]]) -> int:
    """Insert many credentials ``(account_id, username, password_hash)`` in one transaction.

    Used by the benchmark (``scripts/bench``) to seed a ledger with thousands of
    credentials that share one real hash (hashing each password would take minutes):
    no validation and no per-credential answer, unlike :func:`create_credential`, which
    operators and the API use. Returns how many rows went in.
    """
    with db.transaction():
        return db.execute_many(
            "INSERT INTO credentials (account_id, username, password_hash) VALUES (?, ?, ?)",
            rows,
        )


# an account's credentials with the bytes each has used (id, username, label, max_bytes,
# created_at, revoked_at, used): the API pages through it
CREDENTIALS_SQL = (
    "SELECT c.id, c.username, c.label, c.max_bytes, c.created_at, c.revoked_at,"
    " COALESCE(u.bytes, 0) AS used FROM credentials c"
    " LEFT JOIN credential_usage u ON u.credential_id = c.id WHERE c.account_id = ?"
)


def list_credentials(db: Ledger, account_id: int) -> list[dict[str, Any]]:
    """The account's credentials (never their hashes)."""
    account_row(db, account_id)
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
        for r in db.query(CREDENTIALS_SQL + " ORDER BY c.id", (account_id,))
    ]


def credential_rows(
    db: Ledger, account_id: int, username: str | None = None, live: bool = False
) -> list[dict[str, Any]]:
    """Rows of :data:`CREDENTIALS_SQL`: one *username*'s, or only unrevoked ones."""
    sql, args = CREDENTIALS_SQL, list[Any]([account_id])
    if username is not None:
        sql += " AND c.username = ?"
        args.append(username)
    if live:
        sql += " AND c.revoked_at IS NULL"
    return db.query(sql, args)


def find_credential(db: Ledger, account_id: int, ident: str) -> str | None:
    """The username of the account's credential with id or username *ident*, or None."""
    username = db.value(
        "SELECT username FROM credentials WHERE account_id = ? AND (username = ? OR"
        " (CAST(id AS TEXT) = ?))",
        (account_id, ident, ident),
    )
    return None if username is None else str(username)


def live_usernames(db: Ledger, account_id: int, label: str) -> list[str]:
    """The usernames of the account's unrevoked credentials labelled *label*."""
    return [
        r["username"]
        for r in db.query(
            "SELECT username FROM credentials"
            " WHERE account_id = ? AND label = ? AND revoked_at IS NULL",
            (account_id, label),
        )
    ]


def revoke_credential(db: Ledger, username: str, account_id: int | None = None) -> dict[str, Any]:
    """Revoke a credential by username (optionally only within one account)."""
    sql = "SELECT id FROM credentials WHERE username = ?"
    args: list[Any] = [username]
    if account_id is not None:
        sql += " AND account_id = ?"
        args.append(account_id)
    credential_id = db.value(sql, args)
    if credential_id is None:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"username": username})
    with db.transaction():
        db.execute(
            "UPDATE credentials SET revoked_at = {now} WHERE id = ? AND revoked_at IS NULL",
            (credential_id,),
        )
        # its allow-listed addresses go with it: a CIDR belongs to one credential, so a
        # revoked one's entries would keep the range from every other credential for good
        db.execute("DELETE FROM credential_allowed_ips WHERE credential_id = ?", (credential_id,))
    return {"username": username, "revoked": True}
