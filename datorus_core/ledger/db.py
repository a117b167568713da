"""Opening the ledger, and the synchronous handle the CLI, the API and tools use.

:class:`Ledger` wraps one DB-API connection and its :class:`~.dialect.Dialect`:
every statement goes through :meth:`Ledger.execute`, which renders the portable SQL
for the dialect, and every write through :meth:`Ledger.transaction`. Rows come back
as dicts keyed by column name. The gateway's event loop does not use this handle: it
talks to the ledger through :class:`~.gateway.LedgerLink` (aiosqlite).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..envelope import DatorusError
from .dialect import SQLITE, Dialect
from .schema import migrate, schema_version

__all__ = ["DatabaseError", "IntegrityError", "Ledger", "connect", "open_ledger"]

# The DB-API errors of the backend in use (sqlite3's for now).
DatabaseError = sqlite3.Error
IntegrityError = sqlite3.IntegrityError

PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON")


def connect(path: str, timeout: float = 5.0) -> sqlite3.Connection:
    """A sqlite3 connection to the ledger with the pragmas every Datorus connection uses.

    Autocommit (``isolation_level=None``): transactions are opened explicitly, by
    :meth:`Ledger.transaction` and :meth:`Ledger.snapshot`.
    """
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    for pragma in PRAGMAS:
        conn.execute(f"PRAGMA {pragma}")
    conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    return conn


class Ledger:
    """An open ledger: one DB-API connection (``conn``) and the dialect it speaks."""

    def __init__(self, conn: sqlite3.Connection, dialect: Dialect = SQLITE) -> None:
        self.conn = conn
        self.dialect = dialect

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run one portable statement; the cursor has ``rowcount`` and the rows."""
        cur = self.conn.cursor()
        cur.execute(self.dialect.sql(sql), tuple(args))
        return cur

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Every row of a SELECT (or ``RETURNING``) as a dict keyed by column name."""
        cur = self.execute(sql, args)
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        """The first row as a dict, or None."""
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def value(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """The first column of the first row, or None when there is no row."""
        row = self.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one portable statement once per row of *rows*; how many rows it changed."""
        cur = self.conn.cursor()
        cur.executemany(self.dialect.sql(sql), (tuple(r) for r in rows))
        return cur.rowcount

    def insert(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run an ``INSERT ... RETURNING id`` and return the new row's id."""
        (row,) = self.execute(sql, args).fetchall()
        return int(row[0])

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: committed at the end, rolled back on any error."""
        self.conn.execute(self.dialect.begin_write)
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: everything read inside sees the same state."""
        self.conn.execute(self.dialect.begin_read)
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def schema_version(self) -> int:
        """The number of the newest migration applied."""
        return schema_version(self.conn)

    def config_version(self) -> int:
        """The configuration version (every operator change bumps it, by trigger)."""
        return int(self.value("SELECT version FROM config_version WHERE id = 1") or 0)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def open_ledger(path: str | Path, create: bool = True) -> Ledger:
    """Open (and migrate) the ledger at *path*; with ``create=False`` a missing file is an error."""
    path = str(path)
    if not create and path != ":memory:" and not Path(path).exists():
        raise DatorusError(
            "SERVICE_UNAVAILABLE",
            message=f"No ledger at {path}: run 'datorus init' first.",
            details={"db": path},
        )
    conn = connect(path)
    migrate(conn)
    return Ledger(conn)


def migrate_file(path: str) -> None:
    """Create or bring the ledger at *path* up to date, on a connection of its own."""
    conn = connect(path)
    try:
        migrate(conn)
    finally:
        conn.close()
