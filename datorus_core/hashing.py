"""Hashing of secrets: salted slow hashes for passwords, fast keyed digests for caches.

Passwords and API keys are stored only as scrypt hashes (stdlib, memory-hard).
The gateway never pays scrypt on the hot path: once a credential has verified,
it remembers a keyed BLAKE2b digest of ``username:password`` (the key is random per
process), which is cheap to compute and useless outside the process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

_N, _R, _P = 2**14, 8, 1
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_PROCESS_KEY = secrets.token_bytes(32)


def hash_secret(secret: str) -> str:
    """A salted scrypt hash of *secret*, self-describing (``scrypt$N$r$p$salt$hash``)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    salt_b64, digest_b64 = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"scrypt${_N}${_R}${_P}${salt_b64}${digest_b64}"


def verify_secret(secret: str, stored: str) -> bool:
    """True when *secret* matches *stored*; constant-time comparison. Slow by design."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        digest = hashlib.scrypt(
            secret.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, UnicodeError):
        return False
    return hmac.compare_digest(digest, expected)


def cache_key(username: str, password: str) -> bytes:
    """A fast keyed digest of a username/password pair, for the verified-credential cache."""
    return hashlib.blake2b(
        f"{username}\x00{password}".encode("utf-8", "surrogatepass"),
        key=_PROCESS_KEY,
        digest_size=16,
    ).digest()


def random_token(length: int) -> str:
    """*length* random alphanumeric characters from the OS's CSPRNG."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_username() -> str:
    """A fresh proxy username: lowercase letters and digits only (no session-syntax clash)."""
    return "dt" + secrets.token_hex(6)


def new_password() -> str:
    """A fresh proxy password: 24 alphanumeric characters."""
    return random_token(24)
