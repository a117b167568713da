"""The PostgreSQL backend: psycopg 3 connections, sync and asyncio, and their errors.

psycopg 3 is the driver on both sides: its :class:`psycopg.Connection` serves the CLI
and the API's worker threads (:class:`~.db.Ledger`), and its
:class:`psycopg.AsyncConnection` the gateway's event loop (:class:`~.gateway.LedgerLink`),
so one well-kept driver, with one set of types and errors, reaches the ledger everywhere.
This module is imported only for a ``postgresql://`` ledger: a process on SQLite never
loads the driver.

Every connection is in autocommit mode (transactions are opened explicitly, as on
SQLite), loads ``NUMERIC`` values with no fraction as ``int`` (``SUM`` over a BIGINT
column is NUMERIC in PostgreSQL: money must stay integers), and raises
:class:`~.errors.PostgresError` rather than the driver's own classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.adapt import Buffer, Loader

from .errors import PostgresError, PostgresIntegrityError
from .target import scrubbed

__all__ = ["AsyncPostgres", "NATIVE_ERRORS", "connect", "connect_async", "translate"]

#: What the driver raises; :func:`translate` turns each into a :class:`PostgresError`.
NATIVE_ERRORS: tuple[type[BaseException], ...] = (psycopg.Error,)

# libpq's keepalives notice a server that vanished without closing the connection
_OPTIONS: dict[str, Any] = {
    "application_name": "datorus",
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


class _IntNumeric(Loader):
    """``NUMERIC`` as ``int`` when it has no fraction (sums of integers), else Decimal."""

    def load(self, data: Buffer) -> int | Decimal:
        value = Decimal(bytes(data).decode())
        return int(value) if value == value.to_integral_value() else value


def translate(e: BaseException, target: str | None = None) -> PostgresError:
    """The :class:`PostgresError` that stands for the driver's error *e* (raise it
    ``from e``); with *target*, the URL's password is masked in its message (libpq
    quotes parts of a URL it cannot parse)."""
    cls = PostgresIntegrityError if isinstance(e, psycopg.IntegrityError) else PostgresError
    message = " ".join(str(e).split()) or type(e).__name__
    if target is not None:
        message = scrubbed(message, target)
    return cls(message, getattr(e, "sqlstate", None))


def connect(target: str, timeout: float = 5.0) -> psycopg.Connection[Any]:
    """A connection to the PostgreSQL ledger at the URL *target* (which must exist)."""
    try:
        conn = psycopg.connect(
            target, autocommit=True, connect_timeout=max(1, int(timeout)), **_OPTIONS
        )
    except psycopg.Error as e:
        raise translate(e, target) from e
    conn.adapters.register_loader("numeric", _IntNumeric)
    return conn


async def connect_async(target: str, timeout: float = 5.0) -> AsyncPostgres:
    """The gateway's asyncio connection to the PostgreSQL ledger at *target*."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            target, autocommit=True, connect_timeout=max(1, int(timeout)), **_OPTIONS
        )
    except psycopg.Error as e:
        raise translate(e, target) from e
    conn.adapters.register_loader("numeric", _IntNumeric)
    return AsyncPostgres(conn)


class AsyncPostgres:
    """One asyncio connection, as :class:`~.gateway.LedgerLink` uses it: statements
    rendered for :data:`~.dialect.POSTGRES` in, tuples and row counts out."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    @property
    def broken(self) -> bool:
        """Whether the connection is lost (the link then opens a new one)."""
        return self.conn.broken or self.conn.closed

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; how many rows it changed."""
        try:
            cur = await self.conn.execute(sql, tuple(args))
        except psycopg.Error as e:
            raise translate(e) from e
        return cur.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one statement per row of *rows* (pipelined); how many rows they changed."""
        try:
            async with self.conn.cursor() as cur:
                await cur.executemany(sql, [tuple(r) for r in rows])
                return cur.rowcount
        except psycopg.Error as e:
            raise translate(e) from e

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query, as tuples."""
        try:
            cur = await self.conn.execute(sql, tuple(args))
            return list(await cur.fetchall())
        except psycopg.Error as e:
            raise translate(e) from e

    async def close(self) -> None:
        """Close the connection (a lost one too)."""
        await self.conn.close()
