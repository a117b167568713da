"""The customer API's own rows in the ledger: API keys, e-mail tokens, secrets, the mail
outbox, idempotent answers, and paging.

The REST API (``datorus_core/api/``) decides; this module only reads and writes.
Everything here is synchronous and runs in the API's worker threads (or the CLI).
"""

from __future__ import annotations

import secrets
from typing import Any

from .db import Ledger
from .money import insert_trial_grant

# An account's API keys, every column: the API pages through it, the CLI lists it.
KEYS_SQL = "SELECT * FROM api_keys WHERE account_id = ?"
# The operator's keys (of no account).
OPERATOR_KEYS_SQL = "SELECT * FROM api_keys WHERE operator = 1"


# -- secrets ------------------------------------------------------------------------------


def secret(db: Ledger, name: str) -> str:
    """The ledger's secret *name*, made (random, 32 bytes as hex) the first time it is asked."""
    db.execute(
        "INSERT INTO api_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        (name, secrets.token_hex(32)),
    )
    return str(db.value("SELECT value FROM api_secrets WHERE name = ?", (name,)))


def drop_secret(db: Ledger, name: str, value: str) -> None:
    """Forget the secret *name* if it is still *value*, so that :func:`secret` makes a
    new one: processes that replace the same secret at once replace it once."""
    db.execute("DELETE FROM api_secrets WHERE name = ? AND value = ?", (name, value))


# -- sign-up ------------------------------------------------------------------------------


def add_email_token(db: Ledger, account_id: int, purpose: str, expires_at: int) -> int:
    """Record a new e-mail token (its id goes into the signed token); returns the id."""
    with db.transaction():
        return db.insert(
            "INSERT INTO email_tokens (account_id, purpose, expires_at) VALUES (?, ?, ?)"
            " RETURNING id",
            (account_id, purpose, expires_at),
        )


def email_token(db: Ledger, token_id: int) -> dict[str, Any] | None:
    """The token's ``account_id``, ``purpose``, ``expires_at`` and ``used_at``, or None."""
    return db.one(
        "SELECT account_id, purpose, expires_at, used_at FROM email_tokens WHERE id = ?",
        (token_id,),
    )


def consume_verification(db: Ledger, token_id: int, account_id: int, trial_bytes: int) -> bool:
    """Use the token once, mark the account verified and grant its trial, together.

    The trial is granted only when this marks the account verified (not for an account
    created verified, nor on a later verification) and the account has none yet.
    False (and nothing written) when the token was used already.
    """
    with db.transaction():
        cur = db.execute(
            "UPDATE email_tokens SET used_at = {now} WHERE id = ? AND used_at IS NULL",
            (token_id,),
        )
        if cur.rowcount != 1:
            return False
        cur = db.execute(
            "UPDATE accounts SET verified_at = {now} WHERE id = ? AND verified_at IS NULL",
            (account_id,),
        )
        # the trial comes with the verification that verified the account, never with a
        # later one, nor for an account the operator made (created verified)
        if trial_bytes > 0 and cur.rowcount == 1:
            insert_trial_grant(db, account_id, trial_bytes, "free trial (email verified)")
    return True


def use_email_token(db: Ledger, token_id: int) -> bool:
    """Mark an e-mail token used (a console sign-in link); False when it was used already."""
    with db.transaction():
        cur = db.execute(
            "UPDATE email_tokens SET used_at = {now} WHERE id = ? AND used_at IS NULL",
            (token_id,),
        )
    return cur.rowcount == 1


# -- API keys -----------------------------------------------------------------------------


def add_api_key(
    db: Ledger, account_id: int | None, prefix: str, key_hash: str, label: str | None
) -> dict[str, Any]:
    """Store a new key (its hash only) and return its row. An *account_id* of None makes
    an operator key (``operator = 1``: the operator's routes, no account)."""
    with db.transaction():
        key_id = db.insert(
            "INSERT INTO api_keys (account_id, prefix, key_hash, label, operator)"
            " VALUES (?, ?, ?, ?, ?) RETURNING id",
            (account_id, prefix, key_hash, label, 1 if account_id is None else 0),
        )
    row = db.one("SELECT * FROM api_keys WHERE id = ?", (key_id,))
    assert row is not None
    return row


def live_api_key(db: Ledger, key_hash: str) -> dict[str, Any] | None:
    """The unrevoked key with *key_hash*: its ``id``, ``account_id`` (None for an
    operator key), ``operator`` and ``last_used_at``."""
    return db.one(
        "SELECT id, account_id, operator, last_used_at FROM api_keys"
        " WHERE key_hash = ? AND revoked_at IS NULL",
        (key_hash,),
    )


def key_is_live(db: Ledger, key_id: int) -> bool:
    """Whether key *key_id* exists unrevoked (one primary-key lookup: an open event
    stream asks on each poll)."""
    return (
        db.value("SELECT 1 FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,))
        is not None
    )


def touch_api_key(db: Ledger, key_id: int, now: str) -> None:
    """Record that the key was used at *now*."""
    db.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, key_id))


def revoke_api_key(db: Ledger, account_id: int, key_id: int) -> bool:
    """Revoke one of the account's keys (idempotent); False when it has no such key."""
    with db.transaction():
        cur = db.execute(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, {now})"
            " WHERE id = ? AND account_id = ?",
            (key_id, account_id),
        )
    return cur.rowcount == 1


def api_key_owner(db: Ledger, key_id: int) -> int | None:
    """The account a key belongs to, or None (no such key, or an operator key)."""
    owner = db.value("SELECT account_id FROM api_keys WHERE id = ?", (key_id,))
    return None if owner is None else int(owner)


def api_key(db: Ledger, key_id: int) -> dict[str, Any] | None:
    """One key's row (any kind), or None."""
    return db.one("SELECT * FROM api_keys WHERE id = ?", (key_id,))


def revoke_operator_key(db: Ledger, key_id: int) -> bool:
    """Revoke an operator key (idempotent); False when there is no such operator key."""
    with db.transaction():
        cur = db.execute(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, {now})"
            " WHERE id = ? AND operator = 1",
            (key_id,),
        )
    return cur.rowcount == 1


def api_keys(db: Ledger, account_id: int) -> list[dict[str, Any]]:
    """Every key of the account, as rows."""
    return db.query(KEYS_SQL, (account_id,))


def operator_keys(db: Ledger) -> list[dict[str, Any]]:
    """Every operator key, as rows."""
    return db.query(OPERATOR_KEYS_SQL)


# -- paging -------------------------------------------------------------------------------


def page(
    db: Ledger, source_sql: str, args: list[Any], after: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """Up to ``limit + 1`` rows of *source_sql* with ids above *after*, by id, and how
    many rows it has in all. *source_sql* is one of this package's listing statements
    (:data:`KEYS_SQL`, :data:`~.accounts.CREDENTIALS_SQL`)."""
    total = int(db.value(f"SELECT COUNT(*) FROM ({source_sql}) AS page_source", args))
    rows = db.query(
        f"SELECT * FROM ({source_sql}) AS page_source WHERE id > ? ORDER BY id LIMIT ?",
        [*args, after, limit + 1],
    )
    return rows, total


# -- idempotent answers -------------------------------------------------------------------


def stored_response(db: Ledger, account_id: int, key: str) -> str | None:
    """The answer (JSON text) first given to the account's ``Idempotency-Key`` *key*."""
    response = db.value(
        "SELECT response FROM idempotency WHERE account_id = ? AND key = ?", (account_id, key)
    )
    return None if response is None else str(response)


def store_response(db: Ledger, account_id: int, key: str, response: str) -> None:
    """Keep the answer to *key* (the first one stays)."""
    db.execute(
        "INSERT INTO idempotency (account_id, key, response) VALUES (?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (account_id, key, response),
    )


# -- the mail outbox ----------------------------------------------------------------------


def add_outbox(db: Ledger, to: str, subject: str, body: str) -> int:
    """Record one outgoing message; returns its outbox id."""
    return db.insert(
        "INSERT INTO outbox (recipient, subject, body) VALUES (?, ?, ?) RETURNING id",
        (to, subject, body),
    )


def outbox_failed(db: Ledger, outbox_id: int, error: str) -> None:
    """Mark a message as not delivered, and why."""
    db.execute("UPDATE outbox SET error = ? WHERE id = ?", (error, outbox_id))


def outbox_sent(db: Ledger, outbox_id: int) -> None:
    """Mark a message as delivered now."""
    db.execute("UPDATE outbox SET sent_at = {now} WHERE id = ?", (outbox_id,))


def outbox(db: Ledger, to: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest messages first (only those to *to*, in any case, when given)."""
    sql = "SELECT id, recipient, subject, body, created_at, sent_at, error FROM outbox"
    args: list[Any] = []
    if to:
        sql += " WHERE lower(recipient) = lower(?)"
        args.append(to)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    return db.query(sql, args)
