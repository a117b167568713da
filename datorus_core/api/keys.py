"""API keys: ``pp_`` + 48 random characters, shown once, stored as a SHA-256 digest.

A key carries 48 characters of a 62-letter alphabet (about 285 bits), so a fast
digest is as safe as a slow one and lets every request look its key up by hash
without paying scrypt::

    >>> key = new_key()
    >>> key.startswith("pp_") and len(key) == 51
    True
"""

from __future__ import annotations

import hashlib
import re

from ..hashing import random_token

KEY_RE = re.compile(r"pp_[A-Za-z0-9]{48}")  # fullmatch only
PREFIX_LEN = 8  # "pp_" and five characters, as seed 002 shows


def new_key() -> str:
    """A fresh API key."""
    return "pp_" + random_token(48)


def key_hash(key: str) -> str:
    """The stored digest of *key*."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    """The part of *key* that lists may show."""
    return key[:PREFIX_LEN]


def parse_bearer(header: str | None) -> str | None:
    """The key in an ``Authorization: Bearer pp_...`` header, or None when malformed."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not KEY_RE.fullmatch(value):
        return None
    return value
