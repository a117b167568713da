"""Opening the ledger, and the synchronous handle the CLI, the API and tools use.

A ledger is a SQLite file or a PostgreSQL database (:mod:`.target`): :func:`connect`,
:func:`open_ledger` and :func:`migrate_file` take either and choose the backend from
it. :class:`Ledger` wraps one DB-API connection and its :class:`~.dialect.Dialect`:
every statement goes through :meth:`Ledger.execute`, which renders the portable SQL
for the dialect, and every write through :meth:`Ledger.transaction`. Rows come back
as dicts keyed by column name. The gateway's event loop does not use this handle: it
talks to the ledger through :class:`~.gateway.LedgerLink`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, cast

from ..envelope import DatorusError, validation_error
from . import schema
from .dialect import POSTGRES, SQLITE, Dialect
from .errors import DatabaseError, IntegrityError
from .target import is_postgres, shown, unsupported

__all__ = ["DatabaseError", "IntegrityError", "Ledger", "connect", "open_ledger"]

PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON")


class Cursor(Protocol):
    """What callers read of :meth:`Ledger.execute`'s cursor (sqlite3's or psycopg's)."""

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


def _check(target: str) -> None:
    why = unsupported(target)
    if why is not None:
        raise validation_error("db", why, f"The ledger {shown(target)} cannot be opened: {why}.")


def connect(target: str, timeout: float = 5.0) -> Any:
    """A DB-API connection to the ledger at *target*, a SQLite path or a PostgreSQL URL.

    Autocommit in both (``isolation_level=None`` for sqlite3): transactions are opened
    explicitly, by :meth:`Ledger.transaction` and :meth:`Ledger.snapshot`. A SQLite
    connection has the pragmas every Datorus connection uses; a PostgreSQL one is made
    by :func:`.postgres.connect` (the database must exist).
    """
    _check(target)
    if is_postgres(target):
        from . import postgres

        return postgres.connect(target, timeout)
    conn = sqlite3.connect(target, timeout=timeout, isolation_level=None, check_same_thread=False)
    for pragma in PRAGMAS:
        conn.execute(f"PRAGMA {pragma}")
    conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    return conn


class Ledger:
    """An open ledger: one DB-API connection (``conn``) and the dialect it speaks."""

    def __init__(self, conn: Any, dialect: Dialect | None = None) -> None:
        self.conn = conn
        sqlite = isinstance(conn, sqlite3.Connection)
        self.dialect = dialect or (SQLITE if sqlite else POSTGRES)
        self._native: tuple[type[BaseException], ...] = ()
        self._write_lock: str | None = None
        if not sqlite:
            from . import postgres, schema_postgres

            self._native = postgres.NATIVE_ERRORS
            # one write transaction of the CLI and the API at a time, as SQLite's BEGIN
            # IMMEDIATE gives: read-check-write (a balance cap, a lease) stays exact
            self._write_lock = f"SELECT pg_advisory_xact_lock({schema_postgres.WRITE_LOCK})"

    @property
    def broken(self) -> bool:
        """Whether the connection is lost (a PostgreSQL server that went away)."""
        return bool(getattr(self.conn, "broken", False) or getattr(self.conn, "closed", False))

    def _run(self, cur: Any, sql: str, args: Sequence[Any], many: bool = False) -> None:
        try:
            if many:
                cur.executemany(sql, args)
            else:
                cur.execute(sql, tuple(args))
        except self._native as e:
            from .postgres import translate

            raise translate(e) from e

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        """Run one portable statement; the cursor has ``rowcount`` and the rows."""
        cur = self.conn.cursor()
        self._run(cur, self.dialect.sql(sql), args)
        return cast(Cursor, cur)

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
        self._run(cur, self.dialect.sql(sql), [tuple(r) for r in rows], many=True)
        return int(cur.rowcount)

    def insert(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run an ``INSERT ... RETURNING id`` and return the new row's id."""
        (row,) = self.execute(sql, args).fetchall()
        return int(row[0])

    def _raw(self, sql: str) -> None:
        self._run(self.conn.cursor(), sql, ())

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: committed at the end, rolled back on any error.

        Write transactions of the CLI and the API never run side by side (SQLite's
        ``BEGIN IMMEDIATE``; a transaction-scoped advisory lock on PostgreSQL).
        """
        self._raw(self.dialect.begin_write)
        try:
            if self._write_lock is not None:
                self._raw(self._write_lock)
            yield
        except BaseException:
            self._rollback()
            raise
        self._raw("COMMIT")

    def _rollback(self) -> None:
        if self.broken:
            return  # nothing to roll back on a lost connection
        self._raw("ROLLBACK")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: everything read inside sees the same state."""
        self._raw(self.dialect.begin_read)
        try:
            yield
        finally:
            if not self.broken:
                self._raw("COMMIT")

    def schema_version(self) -> int:
        """The number of the newest migration applied (0: no ledger here yet)."""
        if self.dialect is SQLITE:
            return schema.schema_version(self.conn)
        from . import schema_postgres

        with self._translated():
            return schema_postgres.schema_version(self.conn)

    def migrate(self) -> int:
        """Create or bring the ledger up to date; the schema version. Idempotent."""
        if self.dialect is SQLITE:
            return schema.migrate(self.conn)
        from . import schema_postgres

        with self._translated():
            return schema_postgres.migrate(self.conn)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except self._native as e:
            from .postgres import translate

            raise translate(e) from e

    def config_version(self) -> int:
        """The configuration version (every operator change bumps it, by trigger)."""
        return int(self.value("SELECT version FROM config_version WHERE id = 1") or 0)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def no_ledger(target: str) -> DatorusError:
    """SERVICE_UNAVAILABLE: there is no ledger at *target* (``datorus init`` makes one)."""
    where = shown(target)
    return DatorusError(
        "SERVICE_UNAVAILABLE",
        message=f"No ledger at {where}: run 'datorus init' first.",
        details={"db": where},
    )


def open_ledger(target: str | Path, create: bool = True) -> Ledger:
    """Open (and migrate) the ledger at *target*, a SQLite path or a PostgreSQL URL.

    With ``create=False`` a missing file, or a PostgreSQL database with no ledger in
    it, is an error. A PostgreSQL database must exist in any case: the ledger's tables
    are made in it, never the database.
    """
    target = str(target)
    _check(target)
    postgres = is_postgres(target)
    if not create and not postgres and target != ":memory:" and not Path(target).exists():
        raise no_ledger(target)
    db = Ledger(connect(target))
    try:
        if not create and postgres and db.schema_version() == 0:
            raise no_ledger(target)
        db.migrate()
    except BaseException:
        db.close()
        raise
    return db


def migrate_file(target: str) -> None:
    """Create or bring the ledger at *target* up to date, on a connection of its own."""
    db = Ledger(connect(target))
    try:
        db.migrate()
    finally:
        db.close()
