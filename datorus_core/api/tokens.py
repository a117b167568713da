"""Signed, single-use, expiring email tokens (pure: no database, no clock inside).

A token is ``base64url(payload) "." base64url(HMAC-SHA256(secret, payload))`` with
``payload = "v1.<purpose>.<token id>.<expires unix seconds>"``. The signature proves
Datorus issued it; the ledger's ``email_tokens`` row makes it single-use::

    >>> t = sign(b"k" * 32, "verify", 7, 1_900_000_000)
    >>> parse(b"k" * 32, t)
    ('verify', 7, 1900000000)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from ..envelope import DatorusError


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: bytes, purpose: str, token_id: int, expires: int) -> str:
    """The token for row *token_id*, valid until *expires* (Unix seconds)."""
    payload = f"v1.{purpose}.{token_id}.{expires}".encode()
    mac = hmac.new(secret, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def parse(secret: bytes, token: str) -> tuple[str, int, int]:
    """``(purpose, token id, expires)`` of a well-formed, authentic token.

    Raises ``TOKEN_INVALID`` for anything that is not a token Datorus signed.
    Expiry and use are the caller's to check (they need the clock and the ledger).
    """
    try:
        payload_b64, mac_b64 = token.strip().split(".")
        payload, mac = _unb64(payload_b64), _unb64(mac_b64)
        expected = hmac.new(secret, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise ValueError("bad signature")
        version, purpose, token_id, expires = payload.decode().split(".")
        if version != "v1":
            raise ValueError("unknown version")
        return purpose, int(token_id), int(expires)
    except (ValueError, binascii.Error, UnicodeError):
        raise DatorusError("TOKEN_INVALID") from None
