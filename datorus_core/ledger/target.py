"""Where a ledger lives: a SQLite file path or a PostgreSQL URL.

``datorus_db``, the CLI's ``--db`` and ``DATORUS_DB`` all take either. A URL is
recognised by its ``://``; only ``postgresql://`` and ``postgres://`` (libpq's two
spellings) are ledgers, and a URL is never made into a file path. A URL may carry a
password, so whatever prints a target prints :func:`shown` of it::

    >>> is_postgres("postgresql://datorus:s3cret@db.internal:5432/ledger")
    True
    >>> is_postgres("/var/lib/datorus/datorus.db")
    False
    >>> shown("postgresql://datorus:s3cret@db.internal:5432/ledger")
    'postgresql://datorus:********@db.internal:5432/ledger'
    >>> shown("postgres://db.internal/ledger?sslmode=require&password=s3cret")
    'postgres://db.internal/ledger?sslmode=require&password=********'
    >>> shown("./datorus.db")
    './datorus.db'
"""

from __future__ import annotations

import re

__all__ = ["POSTGRES_SCHEMES", "is_postgres", "is_url", "shown", "unsupported"]

POSTGRES_SCHEMES = ("postgresql", "postgres")

_USERINFO_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*):[^@/?#]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def is_url(target: str) -> bool:
    """Whether *target* is a URL (``scheme://...``) rather than a file path."""
    return "://" in target


def is_postgres(target: str) -> bool:
    """Whether *target* is a PostgreSQL URL (``postgresql://`` or ``postgres://``)."""
    return target.split("://", 1)[0].lower() in POSTGRES_SCHEMES if is_url(target) else False


def unsupported(target: str) -> str | None:
    """Why *target* can name no ledger (a URL of another scheme), or None.

    >>> unsupported("mysql://db/ledger")
    'mysql:// is not a ledger: use a SQLite file path or a postgresql:// URL'
    >>> unsupported("postgresql://") is None and unsupported("a/b.db") is None
    True
    """
    if is_url(target) and not is_postgres(target):
        scheme = target.split("://", 1)[0]
        return f"{scheme}:// is not a ledger: use a SQLite file path or a postgresql:// URL"
    return None


def shown(target: str) -> str:
    """*target* as it may be printed or logged: a URL's password masked."""
    if not is_url(target):
        return target
    out = _USERINFO_PASSWORD.sub(r"\1:********@", target)
    return _QUERY_PASSWORD.sub(r"\1********", out)
