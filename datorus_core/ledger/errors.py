"""The database errors of either backend, as one pair of names.

``except DatabaseError`` and ``except IntegrityError`` (tuples of classes) work for a
SQLite ledger and a PostgreSQL one alike. SQLite's are :mod:`sqlite3`'s own; a
PostgreSQL error is re-raised by :mod:`.postgres` as :class:`PostgresError` (or
:class:`PostgresIntegrityError`), with the driver's exception as its ``__cause__``, so
that a process on SQLite never has to import the PostgreSQL driver to name them.
"""

from __future__ import annotations

import sqlite3

__all__ = ["DatabaseError", "IntegrityError", "PostgresError", "PostgresIntegrityError"]


class PostgresError(Exception):
    """An error of a PostgreSQL ledger (the connection, a statement, the server)."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate  # PostgreSQL's five-character error code, when it gave one


class PostgresIntegrityError(PostgresError):
    """A PostgreSQL constraint refused a row (unique, foreign key, check, not null)."""


DatabaseError = (sqlite3.Error, PostgresError)
IntegrityError = (sqlite3.IntegrityError, PostgresIntegrityError)
