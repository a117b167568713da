"""The web console's session cookie and form tokens (pure: no database, no clock inside).

A session is a small JSON object signed with HMAC-SHA256 under a secret the ledger
keeps (so every worker and every node reads every other's cookies), sent as an
HttpOnly, SameSite=Lax cookie. It holds who signed in (``kind``: ``anon``,
``customer`` or ``operator``), the account or the operator key, how (``key``: the
API key id a customer signed in with, None after a mailed link), its expiry, and the
form token (``csrf``) that every form of the session must post back::

    >>> s = new_session("customer", now=1_000, account_id=7)
    >>> cookie = sign(b"k" * 32, s)
    >>> read(b"k" * 32, cookie, now=1_001) == s
    True
    >>> read(b"k" * 32, cookie + "x", now=1_001) is None
    True
    >>> read(b"k" * 32, cookie, now=1_000 + SESSION_SECONDS) is None
    True
    >>> form_token_ok(s, s["csrf"]), form_token_ok(s, "nope"), form_token_ok(s, None)
    (True, False, False)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from typing import Any

COOKIE = "datorus_console"
SESSION_SECONDS = 12 * 3600  # a signed-in session lasts 12 hours
ANON_SECONDS = 3600  # a visitor's form token (sign-in forms) lasts an hour
KINDS = ("anon", "customer", "operator")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_session(
    kind: str,
    now: float,
    account_id: int | None = None,
    key_id: int | None = None,
) -> dict[str, Any]:
    """A fresh session of *kind* with a new form token (sign-in always makes a new one:
    a token a visitor had before signing in is worth nothing after)."""
    if kind not in KINDS:
        raise ValueError(f"unknown session kind {kind!r}")
    ttl = ANON_SECONDS if kind == "anon" else SESSION_SECONDS
    return {
        "kind": kind,
        "account": account_id,
        "key": key_id,
        "csrf": secrets.token_urlsafe(24),
        "exp": int(now) + ttl,
    }


def sign(secret: bytes, session: dict[str, Any]) -> str:
    """The cookie value of *session*."""
    payload = json.dumps(session, separators=(",", ":"), sort_keys=True).encode()
    mac = hmac.new(secret, b"console.v1." + payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def read(secret: bytes, value: str | None, now: float) -> dict[str, Any] | None:
    """The session in cookie *value* if Datorus signed it and it has not expired."""
    if not value or len(value) > 4096:
        return None
    try:
        payload_b64, mac_b64 = value.split(".")
        payload, mac = _unb64(payload_b64), _unb64(mac_b64)
        expected = hmac.new(secret, b"console.v1." + payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            return None
        session = json.loads(payload)
    except (ValueError, binascii.Error, UnicodeError):
        return None
    if not isinstance(session, dict) or session.get("kind") not in KINDS:
        return None
    if not isinstance(session.get("exp"), int) or now >= session["exp"]:
        return None
    if not isinstance(session.get("csrf"), str):
        return None
    return session


def form_token_ok(session: dict[str, Any] | None, submitted: str | None) -> bool:
    """Whether *submitted* is the session's form token (constant-time)."""
    if session is None or not submitted:
        return False
    return hmac.compare_digest(str(session["csrf"]).encode(), submitted.encode())
