"""Helpers shared by the REST API tests: envelope assertions and the outbox."""

from __future__ import annotations

import re
from typing import Any

import httpx
from support.ledger import cli, ledger_row

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
TOKEN_RE = re.compile(r"Verification token: (\S+)")


def assert_api_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """*r* is the canonical envelope with *code* and *status*; returns ``error``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"code", "message", "details", "requestId", "timestamp"}
    assert err["code"] == code, err
    assert UUID_RE.fullmatch(err["requestId"])
    assert TS_RE.fullmatch(err["timestamp"])
    assert r.headers["x-datorus-request-id"] == err["requestId"]
    return err


def token_from_outbox(db, email: str) -> str:
    """The newest verification token mailed to *email*, read with ``datorus outbox``."""
    items = cli(db, "outbox", "--to", email)["items"]
    assert items, f"no mail to {email}"
    m = TOKEN_RE.search(items[0]["body"])
    assert m, items[0]["body"]
    return m.group(1)


def register(api: str, email: str, **extra: Any) -> dict[str, Any]:
    """``POST /auth/register``; returns the 201 body."""
    r = httpx.post(f"{api}/auth/register", json={"email": email, **extra}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for an API key."""
    return {"Authorization": f"Bearer {key}"}


def token_from_ledger(db, email: str) -> str:
    """Like :func:`token_from_outbox`, reading the ledger's ``outbox`` table directly (fast)."""
    row = ledger_row(
        db, "SELECT body FROM outbox WHERE recipient = ? ORDER BY id DESC LIMIT 1", (email,)
    )
    assert row, f"no mail to {email}"
    m = TOKEN_RE.search(row[0])
    assert m, row[0]
    return m.group(1)
