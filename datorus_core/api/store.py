"""The API's account operations, and its per-thread connections to the ledger.

Every function here is synchronous (the ledger, SMTP) and runs in a worker thread of
the API, never in the gateway's event loop. The SQL it needs is in
:mod:`datorus_core.ledger` (:mod:`~datorus_core.ledger.api` for the API's own rows).
Changes reach a running gateway through the ledger's ``config_version`` triggers,
which its ledger task polls.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import pricing
from ..clock import iso_utc
from ..envelope import DatorusError, control_free, validation_error
from ..ledger import IntegrityError, Ledger, accounts, money
from ..ledger import api as ledger_api
from ..ledger.db import connect, migrate_file
from ..settings import public_base
from . import keys, mail, tokens

VERIFY = "verify"


class ApiKeyError(DatorusError):
    """A missing, malformed, unknown or revoked API key: 401 on the REST API.

    The code is ``INVALID_CREDENTIAL`` (CONTRACT.md section 3); 407 belongs to the proxy.
    """

    def __init__(self) -> None:
        super().__init__(
            "INVALID_CREDENTIAL",
            message="Missing or invalid API key.",
            headers={"WWW-Authenticate": 'Bearer realm="Datorus"'},
        )

    @property
    def status(self) -> int:
        """401, not the proxy's 407."""
        return 401


def not_found(kind: str, ident: Any) -> DatorusError:
    """``RESOURCE_NOT_FOUND`` for an unknown id."""
    return DatorusError("RESOURCE_NOT_FOUND", details={kind: ident})


class Store:
    """The ledger at *path* (a SQLite path or a PostgreSQL URL), one connection per
    worker thread, migrated once. A thread whose PostgreSQL connection was lost (the
    server restarted) opens a new one at its next request; the request that found it
    lost got a 503 (``DatabaseError``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        migrate_file(path)
        db = self.db()
        self.token_secret = ledger_api.secret(db, "token_signing").encode()
        self.ledger_id = ledger_api.secret(db, "ledger_id")[:16]

    def db(self) -> Ledger:
        """This thread's connection to the ledger."""
        db = getattr(self._local, "db", None)
        if db is not None and db.broken:
            with contextlib.suppress(Exception):
                db.close()
            db = None
        if db is None:
            db = Ledger(connect(self.path))
            self._local.db = db
        return db


# -- accounts and sign-up -----------------------------------------------------------------


def register(
    store: Store, settings: dict[str, Any], email: str, display_name: str | None
) -> dict[str, Any]:
    """Create an unverified account, its first API key, and mail a verification token.

    The trial allocation is granted on verification, not here.
    """
    db = store.db()
    try:
        acc = accounts.create_account(db, email, trial_bytes=0)
    except IntegrityError:  # a concurrent sign-up with the same email won
        raise DatorusError("EMAIL_TAKEN", details={"email": email}) from None
    account_id = acc["id"]
    accounts.set_display_name(db, account_id, display_name)
    key = create_key(db, account_id, "default")
    send_verification(store, settings, account_id, acc["email"])
    return {
        "user": {
            "id": account_id,
            "email": acc["email"],
            "display_name": display_name,
            "verified": False,
        },
        "api_key": key,
    }


def send_verification(store: Store, settings: dict[str, Any], account_id: int, email: str) -> None:
    """Issue a verification token for the account and mail it."""
    db = store.db()
    expires = int(time.time()) + int(settings.get("email_token_ttl", 86400))
    token_id = ledger_api.add_email_token(db, account_id, VERIFY, expires)
    token = tokens.sign(store.token_secret, VERIFY, token_id, expires)
    base = public_base(settings)
    body = (
        "Welcome to Datorus.\n\n"
        "Verify your email address to receive your free trial:\n"
        f"{base}/auth/verify?token={token}\n\n"
        f'Or POST it to {base}/auth/verify as {{"token": "..."}}.\n\n'
        f"Verification token: {token}\n\n"
        "The token can be used once and expires in "
        f"{int(settings.get('email_token_ttl', 86400)) // 3600} hours.\n"
    )
    mail.send(db, settings, email, "Verify your Datorus account", body)


def verify(store: Store, settings: dict[str, Any], token: str) -> dict[str, Any]:
    """Consume a verification token and grant the trial (exactly once per account)."""
    purpose, token_id, expires = tokens.parse(store.token_secret, token)
    db = store.db()
    row = ledger_api.email_token(db, token_id)
    if row is None or row["purpose"] != purpose or row["expires_at"] != expires:
        raise DatorusError("TOKEN_INVALID")
    account_id = row["account_id"]
    if row["used_at"] is not None:
        raise DatorusError("TOKEN_USED")
    if time.time() >= expires:
        raise DatorusError("TOKEN_EXPIRED", details={"expiredAt": iso_utc(expires)})
    trial = int(settings.get("trial_bytes", 0))
    if not ledger_api.consume_verification(db, token_id, account_id, trial):
        raise DatorusError("TOKEN_USED")
    return {"verified": True, "account": account_view(db, account_id, settings)}


SIGNIN = "console"
SIGNIN_SECONDS = 900  # a console sign-in link lives 15 minutes


def send_signin_link(store: Store, settings: dict[str, Any], email: str) -> bool:
    """Mail the console's one-time sign-in link to *email* if an account has it.

    Returns whether a mail went out; callers say the same thing either way, so the
    page never tells who has an account.
    """
    db = store.db()
    acc = accounts.find_account_by_email(db, email.strip())
    if acc is None:
        return False
    expires = int(time.time()) + SIGNIN_SECONDS
    token_id = ledger_api.add_email_token(db, acc["id"], SIGNIN, expires)
    token = tokens.sign(store.token_secret, SIGNIN, token_id, expires)
    base = public_base(settings)
    body = (
        "Sign in to the Datorus console with this link:\n"
        f"{base}/console/signin?token={token}\n\n"
        f"It works once and expires in {SIGNIN_SECONDS // 60} minutes. If you did not ask"
        " for it, ignore this mail.\n"
    )
    mail.send(db, settings, acc["email"], "Your Datorus console sign-in link", body)
    return True


def signin_account(store: Store, token: str) -> int:
    """The account a console sign-in *token* is for, using the token up.

    400 ``TOKEN_INVALID``, 409 ``TOKEN_USED``, 410 ``TOKEN_EXPIRED``.
    """
    purpose, token_id, expires = tokens.parse(store.token_secret, token)
    db = store.db()
    row = ledger_api.email_token(db, token_id)
    if row is None or purpose != SIGNIN or row["purpose"] != SIGNIN:
        raise DatorusError("TOKEN_INVALID")
    if row["expires_at"] != expires:
        raise DatorusError("TOKEN_INVALID")
    if row["used_at"] is not None:
        raise DatorusError("TOKEN_USED")
    if time.time() >= expires:
        raise DatorusError("TOKEN_EXPIRED", details={"expiredAt": iso_utc(expires)})
    if not ledger_api.use_email_token(db, token_id):
        raise DatorusError("TOKEN_USED")
    return int(row["account_id"])


def account_view(db: Ledger, account_id: int, settings: dict[str, Any]) -> dict:
    """``GET /account``: who, status, trial, balance, price and limits."""
    row = accounts.account_row(db, account_id)
    acc = accounts.show_account(db, account_id)
    return {
        "id": account_id,
        "email": row["email"],
        "display_name": row["display_name"],
        "status": row["status"],
        "provider": row["provider"],
        "verified": row["verified_at"] is not None,
        "verified_at": row["verified_at"],
        "created_at": row["created_at"],
        "trial_remaining_bytes": acc["trialRemainingBytes"],
        "balance_cents": acc["balanceCents"],
        "balance_nanocents": acc["balanceNanocents"],
        "topped_up": acc["toppedUp"],
        "used_bytes": acc["usedBytes"],
        "price_cents_per_gb": _or(row["price_cents_per_gb"], settings.get("price_cents_per_gb")),
        "rate_limit": {
            "requests_per_second": row["rps"] or settings.get("rps"),
            "burst": row["burst"] or settings.get("burst"),
        },
        "max_tunnels": row["max_tunnels"] or settings.get("max_tunnels"),
    }


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


# -- API keys -----------------------------------------------------------------------------


def create_key(db: Ledger, account_id: int | None, label: str | None) -> dict[str, Any]:
    """A new key for the account, or an operator key (*account_id* None); the only time
    the raw key is returned."""
    control_free("label", label)
    key = keys.new_key()
    row = ledger_api.add_api_key(db, account_id, keys.key_prefix(key), keys.key_hash(key), label)
    return {**key_view(row), "key": key}


def key_view(row: dict[str, Any]) -> dict[str, Any]:
    """A key as lists show it: never the key itself."""
    return {
        "id": row["id"],
        "prefix": row["prefix"],
        "label": row["label"],
        "operator": bool(row.get("operator")),
        "created_at": row["created_at"],
        "last_used_at": row["last_used_at"],
        "revoked": row["revoked_at"] is not None,
    }


def live_key(db: Ledger, header: str | None) -> dict[str, Any]:
    """The live key row (``id``, ``account_id``, ``operator``) of a ``Bearer`` header;
    ApiKeyError (401) for a missing, malformed, unknown or revoked key."""
    key = keys.parse_bearer(header)
    if key is None:
        raise ApiKeyError()
    row = ledger_api.live_api_key(db, keys.key_hash(key))
    if row is None:
        raise ApiKeyError()
    now = iso_utc()
    if row["last_used_at"] != now:  # at most one write per key per second
        ledger_api.touch_api_key(db, row["id"], now)
    return row


class OperatorKeyError(ApiKeyError):
    """An operator key on a route of a customer's account: it has no account (401)."""

    def __init__(self) -> None:
        super().__init__()
        self.message = "An operator key has no account: this route needs a customer's API key."
        self.details = {"reason": "operator_key"}


def key_owner(db: Ledger, row: dict[str, Any]) -> dict[str, Any]:
    """The account row of a live customer key *row* (with ``api_key_id``);
    OperatorKeyError (401) for an operator key."""
    if row["operator"]:
        raise OperatorKeyError()
    acc = accounts.account_row(db, row["account_id"])
    acc["api_key_id"] = row["id"]
    return acc


def authenticate(db: Ledger, header: str | None) -> dict[str, Any]:
    """The account row a customer's ``Bearer`` key belongs to; ApiKeyError (401)
    otherwise (an operator key included: it has no account)."""
    return key_owner(db, live_key(db, header))


def revoke_key(db: Ledger, account_id: int, key_id: str) -> dict[str, Any]:
    """Revoke one of the account's keys (idempotent); unknown ids are RESOURCE_NOT_FOUND."""
    kid = parse_id(key_id, "key")
    if not ledger_api.revoke_api_key(db, account_id, kid):
        raise not_found("key", key_id)
    return {"id": kid, "revoked": True}


def parse_id(value: str, kind: str) -> int:
    """A path id as an integer; anything else names no resource."""
    if not value.isdigit() or len(value) > 18:
        raise not_found(kind, value)
    return int(value)


# -- pagination ---------------------------------------------------------------------------


def encode_cursor(last: int | str, field: str = "after") -> str:
    """An opaque cursor that resumes after *last* (*field* ``before``: a newest-first
    list, resuming with what is older than *last*)."""
    return base64.urlsafe_b64encode(json.dumps({field: last}).encode()).decode().rstrip("=")


def decode_before(cursor: str | None, kind: type) -> Any:
    """The key a newest-first list's cursor resumes before (None for none: the newest);
    VALIDATION_ERROR when it is not ours.

    >>> decode_before(encode_cursor("0190f8c2", "before"), str)
    '0190f8c2'
    """
    if not cursor:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        before = data["before"]
        if type(before) is not kind or (isinstance(before, str) and not 0 < len(before) <= 100):
            raise ValueError
        return before
    except (ValueError, TypeError, KeyError, UnicodeError):
        raise validation_error("cursor", "not a cursor this API returned") from None


def decode_cursor(cursor: str | None) -> int:
    """The id a cursor resumes after (0 for none); VALIDATION_ERROR when it is not ours."""
    if not cursor:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after = data["after"]
        if not isinstance(after, int) or after < 0:
            raise ValueError
        return after
    except (ValueError, TypeError, KeyError, UnicodeError):
        raise validation_error("cursor", "not a cursor this API returned") from None


def page(
    db: Ledger,
    source_sql: str,
    args: list[Any],
    limit: int,
    cursor: str | None,
) -> tuple[list[dict[str, Any]], str | None, int]:
    """One page of a ledger listing (``ledger.api.KEYS_SQL``, ``ledger.accounts.
    CREDENTIALS_SQL``) by ascending id: rows, next cursor, total."""
    rows, total = ledger_api.page(db, source_sql, args, decode_cursor(cursor), limit)
    nxt = encode_cursor(rows[limit - 1]["id"]) if len(rows) > limit else None
    return rows[:limit], nxt, total


def page_items(
    items: list[dict[str, Any]], limit: int, cursor: str | None, by_id: bool = True
) -> tuple[list[dict[str, Any]], str | None, int]:
    """One page of a list already read whole, as :func:`page` pages the ledger: rows,
    next cursor, total.

    *by_id*: *items* are in ascending ``id`` order and a cursor resumes after an id (a
    row added or removed meanwhile moves nothing); else the cursor is a position in
    *items* (lists sorted by something else: ``GET /proxies`` by score).

    >>> rows = [{"id": 2}, {"id": 5}, {"id": 9}]
    >>> first, nxt, total = page_items(rows, 2, None)
    >>> [r["id"] for r in first], total
    ([2, 5], 3)
    >>> [r["id"] for r in page_items(rows, 2, nxt)[0]], page_items(rows, 2, nxt)[1]
    ([9], None)
    """
    start = decode_cursor(cursor)
    if by_id:
        rest = [r for r in items if int(r["id"]) > start]
        nxt = encode_cursor(int(rest[limit - 1]["id"])) if len(rest) > limit else None
        return rest[:limit], nxt, len(items)
    more = start + limit < len(items)
    return items[start : start + limit], encode_cursor(start + limit) if more else None, len(items)


def page_newest(
    fetch: Callable[[Any, int], list[dict[str, Any]]],
    total: int,
    limit: int,
    cursor: str | None,
    key: str,
    kind: type = int,
) -> tuple[list[dict[str, Any]], str | None, int]:
    """One page of a newest-first list (receipts, deliveries): rows, next cursor, total.

    ``fetch(before, n)`` gives up to *n* rows newest first whose *key* is below
    *before* (None: from the newest); the cursor names the last row shown, so rows
    added meanwhile shift nothing.
    """
    rows = fetch(decode_before(cursor, kind), limit + 1)
    nxt = encode_cursor(rows[limit - 1][key], "before") if len(rows) > limit else None
    return rows[:limit], nxt, total


def listing(rows: list[dict[str, Any]], nxt: str | None, total: int) -> dict[str, Any]:
    """A list as every list route answers it (seed 002's shape)."""
    return {"items": rows, "next_cursor": nxt, "total_count": total}


# -- credentials, credits, usage ----------------------------------------------------------


def credential_view(row: dict[str, Any]) -> dict[str, Any]:
    """A proxy credential as the API lists it (never its password)."""
    return {
        "id": row["id"],
        "username": row["username"],
        "label": row["label"],
        "max_bytes": row["max_bytes"],
        "used_bytes": row["used"],
        "created_at": row["created_at"],
        "revoked": row["revoked_at"] is not None,
        "revoked_at": row["revoked_at"],
    }


def revoke_credential(db: Ledger, account_id: int, ident: str) -> dict[str, Any]:
    """Revoke one of the account's proxy credentials, by id or username."""
    username = accounts.find_credential(db, account_id, ident)
    if username is None:
        raise not_found("credential", ident)
    accounts.revoke_credential(db, username, account_id)
    (out,) = accounts.credential_rows(db, account_id, username=username)
    return credential_view(out)


TX_TYPES = {"trial_grant": "trial", "topup": "purchase", "usage": "usage"}


def credits(db: Ledger, account_id: int, limit: int) -> dict[str, Any]:
    """Seed 002's ``GET /account/credits``: balance and recent transactions, in cents.

    Usage is rolled up per UTC day (``ledger.money.credit_history``), so top-ups, lease
    charges and adjustments stay in view however often usage is flushed. Each row's
    ``amount`` is what it moved the balance in whole cents (the balance shows whole
    cents rounded down, and so do the running totals behind the rows), so the amounts
    of rows reaching back to the account's start add up to ``balance`` exactly;
    ``amount_nanocents`` is the exact amount.
    """
    h = money.credit_history(db, account_id, limit)
    balance = h["balance_nanocents"]
    cents = pricing.whole_cent_steps(balance, [t["nanocents"] for t in h["items"]])
    items = [
        {
            "id": t["id"],
            "amount": amount,
            "amount_nanocents": t["nanocents"],
            "tx_type": _tx_type(t),
            "description": t["reason"] or _describe(t),
            "trial_bytes": t["trial_bytes"],
            "bytes": t["bytes"],
            "requests": t["requests"],
            "transactions": t["transactions"],
            "first_created_at": t["first_created_at"],
            "created_at": t["created_at"],
        }
        for t, amount in zip(h["items"], cents, strict=True)
    ]
    return {
        "balance": pricing.whole_cents(balance),
        "balance_nanocents": balance,
        "trial_remaining_bytes": max(0, h["trial_bytes"]),
        "recent_transactions": items,
    }


def _tx_type(t: dict[str, Any]) -> str:
    if (t.get("external_id") or "").startswith("lease:"):
        return "acquire"
    return TX_TYPES.get(t["kind"], t["kind"])


def _describe(t: dict[str, Any]) -> str:
    if t["kind"] == "usage":
        from_trial = -t["trial_bytes"]  # usage spends trial bytes: negative in the ledger
        return (
            f"Proxy usage on {t['created_at'][:10]}: {t['requests']} requests,"
            f" {t['bytes']} bytes ({from_trial} from the trial)"
        )
    return t["kind"]
