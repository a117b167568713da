"""The gateway's connection to the ledger: snapshots in, usage batches out.

One asyncio connection serves both directions, one transaction at a time, so a
snapshot and a batch write never interleave: that is what keeps the in-memory
balances equal to the ledger plus the pending batch. On SQLite it is aiosqlite (one
worker thread); on PostgreSQL, psycopg's :class:`~psycopg.AsyncConnection`
(:mod:`.postgres`), opened again on the next call after the server went away. This is
the only way the gateway's event loop reaches the ledger; its statements are rendered
by the same :class:`~.dialect.Dialect` as the synchronous handle's.

A usage batch is written once: its id goes into ``usage_batches`` in the same
transaction as its usage, so a batch written again after its commit's answer was lost
(the connection broke at the commit, and the gateway kept the batch to write it again)
is recognised and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiosqlite

from ..clock import iso_utc
from ..egress import parse_egress_url
from ..envelope import request_id_floor
from ..runtime import Notice, UsageBatch
from .db import migrate_file
from .dialect import POSTGRES, SQLITE, Dialect
from .egress import POOL_SQL, CheckWrite
from .events import INSERT_SQL as EVENT_INSERT
from .events import encode as encode_event
from .events import lock_sql as events_lock_sql
from .leases import ACTIVE_SQL
from .target import is_postgres
from .usage import clean_receipts

_ACCOUNTS = """
    SELECT a.id, a.status, a.price_cents_per_gb, a.rps, a.burst, a.max_tunnels,
           COALESCE(b.trial_bytes, 0), COALESCE(b.nanocents, 0), COALESCE(b.topped_up, 0)
    FROM accounts a LEFT JOIN balances b ON b.account_id = a.id
"""
_CREDENTIALS = """
    SELECT c.id, c.account_id, c.username, c.password_hash, c.max_bytes, COALESCE(u.bytes, 0)
    FROM credentials c LEFT JOIN credential_usage u ON u.credential_id = c.id
    WHERE c.revoked_at IS NULL
"""
_RULES = "SELECT action, target, port FROM policy_rules ORDER BY id"
_ALLOWED_IPS = "SELECT credential_id, cidr FROM credential_allowed_ips ORDER BY id"
_VERSION = "SELECT version FROM config_version WHERE id = 1"


@dataclass(frozen=True)
class Rows:
    """One INSERT of a usage batch's rows, declared once and rendered two ways.

    :meth:`one` is the portable statement for one row, run once per row
    (``executemany``: SQLite, in-process, pays little per statement). :meth:`arrays`
    inserts every row in ONE statement, each column a PostgreSQL array unnested in
    order: on PostgreSQL a statement per row costs a Bind and an Execute on the server
    and a round of parameter handling in the driver, which was most of a batch's CPU
    (issue 16's writer: 109 CPU us per usage event, client and server, against 56).
    *types* holds each column's type, or a quoted constant that is no parameter::

        >>> r = Rows("t", ("a", "k", "b"), ("int", "'u'", "text"))
        >>> r.one()
        "INSERT INTO t (a, k, b) VALUES (?, 'u', ?)"
        >>> print(r.arrays().replace(" FROM", "\\n FROM"))
        INSERT INTO t (a, k, b) SELECT u.c0, 'u', u.c2
         FROM unnest(?::int[], ?::text[]) AS u(c0, c2)

    Rows keep their order in both (``unnest`` yields the arrays in order), so two
    gateways still lock shared rows in the same order.
    """

    table: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    tail: str = ""  # ON CONFLICT ...
    head: str = "INSERT INTO"  # or "INSERT {or_ignore} INTO" (with a {on_conflict_ignore} tail)

    def one(self) -> str:
        """The statement for one row, ``?`` per parameter."""
        values = ", ".join(t if t.startswith("'") else "?" for t in self.types)
        return f"{self.head} {self.table} ({', '.join(self.columns)}) VALUES ({values}){self.tail}"

    def arrays(self) -> str:
        """The statement for every row at once, one array parameter per column."""
        params = [(f"c{i}", t) for i, t in enumerate(self.types) if not t.startswith("'")]
        picked = ", ".join(t if t.startswith("'") else f"u.c{i}" for i, t in enumerate(self.types))
        arrays = ", ".join(f"?::{t}[]" for _, t in params)
        names = ", ".join(n for n, _ in params)
        return (
            f"{self.head} {self.table} ({', '.join(self.columns)}) SELECT {picked}"
            f" FROM unnest({arrays}) AS u({names}){self.tail}"
        )


_B, _T = "bigint", "text"
_USAGE = Rows(
    "transactions",
    ("account_id", "kind", "nanocents", "trial_bytes", "bytes", "requests"),
    (_B, "'usage'", _B, _B, _B, _B),
)
_DAILY = Rows(
    "usage_daily",
    ("account_id", "credential_id", "day", "requests", "bytes_up", "bytes_down", "trial_bytes",
     "nanocents"),
    (_B, _B, _T, _B, _B, _B, _B, _B),
    " ON CONFLICT (account_id, credential_id, day) DO UPDATE SET"
    " requests = usage_daily.requests + excluded.requests,"
    " bytes_up = usage_daily.bytes_up + excluded.bytes_up,"
    " bytes_down = usage_daily.bytes_down + excluded.bytes_down,"
    " trial_bytes = usage_daily.trial_bytes + excluded.trial_bytes,"
    " nanocents = usage_daily.nanocents + excluded.nanocents",
)  # fmt: skip
_CREDENTIAL_BYTES = Rows(
    "credential_usage",
    ("credential_id", "bytes"),
    (_B, _B),
    " ON CONFLICT (credential_id) DO UPDATE SET bytes = credential_usage.bytes + excluded.bytes",
)
_RECEIPTS = Rows(
    "receipts",
    ("request_id", "account_id", "credential_id", "method", "host", "port", "status", "bytes_up",
     "bytes_down", "trial_bytes", "nanocents", "started_at", "finished_at", "code"),
    (_T, _B, _B, _T, _T, _B, _B, _B, _B, _B, _B, _T, _T, _T),
    " {on_conflict_ignore}",
    "INSERT {or_ignore} INTO",
)  # fmt: skip
_CHECK_ROW = (
    "INSERT INTO egress_checks (egress_id, checker_name, stage, passed, latency_ms,"
    " exit_ip, detail, created_at) SELECT id, ?, ?, ?, ?, ?, ?, ? FROM egress WHERE id = ?"
)
# found_country is not among the columns whose change touches config_version: the
# exit's country moves no operator setting (each gateway learns it from its own checks)
_CHECK_EGRESS = (
    "UPDATE egress SET score = ?, uptime_pct = ?, avg_latency_ms = ?,"
    " exit_ip = COALESCE(?, exit_ip), anonymity = COALESCE(?, anonymity),"
    " found_country = COALESCE(?, found_country),"
    " status = ?, fail_streak = ?, last_checked_at = ?, check_seq = ? WHERE id = ?"
)
# each batch of checks takes the next number; the egress it wrote carry it (check_seq),
# so a gateway reads only the egress checked since the number it last saw
_CHECK_SEQ_NEXT = "UPDATE check_sequence SET seq = seq + 1 WHERE id = 1 RETURNING seq"
_CHECK_SEQ = "SELECT seq FROM check_sequence WHERE id = 1"
# what the checks change of an egress, as a gateway applies it (``CheckedRow``)
_CHECKED_SINCE = (
    "SELECT id, status, fail_streak, score, avg_latency_ms, exit_ip,"
    " COALESCE(country, found_country), check_seq FROM egress"
    " WHERE check_seq > ? ORDER BY check_seq LIMIT ?"
)
CHECKED_ROWS_MAX = 50_000  # egress rows one read of checked_since returns at most
_CHECKER_RUN = (
    "INSERT INTO checker_runs (name, runs, failures, errors, last_run_at, last_failure_at,"
    " last_failure, last_error_at, last_error) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET runs = checker_runs.runs + 1,"
    " failures = checker_runs.failures + excluded.failures,"
    " errors = checker_runs.errors + excluded.errors,"
    " last_run_at = excluded.last_run_at,"
    " last_failure_at = COALESCE(excluded.last_failure_at, checker_runs.last_failure_at),"
    " last_failure = COALESCE(excluded.last_failure, checker_runs.last_failure),"
    " last_error_at = COALESCE(excluded.last_error_at, checker_runs.last_error_at),"
    " last_error = COALESCE(excluded.last_error, checker_runs.last_error)"
)
_CHECK_TRIM = (  # the last 500 checks of each egress are kept
    "DELETE FROM egress_checks WHERE egress_id = ? AND id <= ("
    " SELECT id FROM egress_checks WHERE egress_id = ? ORDER BY id DESC"
    " LIMIT 1 OFFSET 500)"
)
_WORKER_USAGE = "SELECT worker, credential_id, account_id, bytes, trial_bytes FROM worker_usage"
_WORKER_BYTES = Rows(
    "worker_usage",
    ("worker", "credential_id", "account_id", "bytes", "trial_bytes"),
    (_T, _B, _B, _B, _B),
    " ON CONFLICT (worker, credential_id) DO UPDATE SET"
    " bytes = worker_usage.bytes + excluded.bytes,"
    " trial_bytes = worker_usage.trial_bytes + excluded.trial_bytes",
)
_FORGET_WORKER = "DELETE FROM worker_usage WHERE worker = ?"
_DENIALS = "INSERT INTO aup_denials (account_id, host, port, rule) VALUES (?, ?, ?, ?)"
_PRUNE = "DELETE FROM receipts WHERE request_id < ?"
_MAIL_WAITING = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
_DELIVERIES_WAITING = "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'"
_BATCH = (
    "INSERT INTO usage_batches (id, worker, written_at) VALUES (?, ?, ?)"
    " ON CONFLICT (id) DO NOTHING"
)
_PRUNE_BATCHES = "DELETE FROM usage_batches WHERE written_at < ?"
_SECRET_ADD = "INSERT INTO api_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
_SECRET = "SELECT value FROM api_secrets WHERE name = ?"
_ACTIVE_COUNT = "SELECT COUNT(*) FROM egress WHERE enabled = 1 AND status = 'active'"
_MARK = "SELECT value FROM event_marks WHERE name = ?"
_SET_MARK = (
    "INSERT INTO event_marks (name, value) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
# an event once per top-up of its account: the dedupe key ends with the newest top-up's id
_INSERT_PER_TOPUP = (
    "INSERT INTO events (type, account_id, data, dedupe)"
    " SELECT ?, ?, ?, ? || CAST(COALESCE(MAX(id), 0) AS TEXT) FROM transactions"
    " WHERE account_id = ? AND kind = 'topup' ON CONFLICT (dedupe) DO NOTHING"
)
# how long a written batch's id is kept: a batch is written again within seconds of
# its lost answer (the next write after the ledger is back), never days later
BATCH_ID_DAYS = 7
# the gateway's SQLite connection leaves foreign_keys off, as it always has
_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000")


class AsyncConnection(Protocol):
    """One asyncio connection to the ledger, statements already rendered for its dialect."""

    @property
    def broken(self) -> bool:
        """Whether the connection is lost (the link opens a new one on its next call)."""

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; how many rows it changed."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one statement per row; how many rows they changed."""

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query, as tuples."""

    async def close(self) -> None:
        """Close the connection."""


class AsyncSqlite:
    """:class:`AsyncConnection` on SQLite (aiosqlite)."""

    broken = False  # a SQLite file does not go away

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    @classmethod
    async def connect(cls, path: str) -> AsyncSqlite:
        """The gateway's connection to the SQLite ledger at *path*."""
        conn = await aiosqlite.connect(path, isolation_level=None, timeout=5.0)
        for pragma in _PRAGMAS:
            await conn.execute(f"PRAGMA {pragma}")
        return cls(conn)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; how many rows it changed."""
        cur = await self.conn.execute(sql, tuple(args))
        return cur.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one statement per row; how many rows they changed."""
        cur = await self.conn.executemany(sql, [tuple(r) for r in rows])
        return cur.rowcount

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query, as tuples."""
        return [tuple(r) for r in await self.conn.execute_fetchall(sql, tuple(args))]

    async def close(self) -> None:
        """Close the connection."""
        await self.conn.close()


class LedgerLink:
    """An open, migrated ledger as the gateway uses it: a SQLite path or a PostgreSQL URL."""

    def __init__(self, target: str, dialect: Dialect | None = None) -> None:
        self.target = target
        self.path = target  # the name it had when it was always a file
        self.postgres = is_postgres(target)
        self.dialect = dialect or (POSTGRES if self.postgres else SQLITE)
        self.conn: AsyncConnection | None = None
        self.closed = False
        # one transaction at a time on the one connection: the ledger task and the
        # egress router both use it, and their statements must not interleave
        self.lock = asyncio.Lock()
        # proxy.pool_low when fewer egress than this are active (0: never)
        self.pool_low = 0

    async def open(self) -> None:
        """Create or migrate the ledger, then open the gateway's connection."""
        await asyncio.to_thread(migrate_file, self.target)
        self.conn = await self._connect()

    async def _connect(self) -> AsyncConnection:
        if self.postgres:
            from .postgres import connect_async

            return await connect_async(self.target)
        return await AsyncSqlite.connect(self.target)

    async def _conn(self) -> AsyncConnection:
        """The connection, opened again if the last one was lost (call with the lock)."""
        if self.closed:
            raise RuntimeError("the ledger link is closed")
        if self.conn is not None and self.conn.broken:
            with contextlib.suppress(Exception):
                await self.conn.close()
            self.conn = None
        if self.conn is None:
            self.conn = await self._connect()
        return self.conn

    async def close(self) -> None:
        """Close the connection (pending batches must be written first)."""
        self.closed = True
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
            self.conn = None

    async def _rollback(self, c: AsyncConnection) -> None:
        if not c.broken:  # a lost connection has nothing left to roll back
            await c.execute("ROLLBACK")

    async def version(self) -> int:
        """The ledger's configuration version (bumped by every operator change)."""
        async with self.lock:
            return await self._version(await self._conn())

    async def _version(self, c: AsyncConnection) -> int:
        rows = await c.fetchall(self.dialect.sql(_VERSION))
        return int(rows[0][0]) if rows else 0

    async def snapshot(self) -> tuple[list[Any], list[Any], list[Any], int]:
        """Accounts, live credentials, policy rules and the version they belong to."""
        accounts, creds, rules, version, _ = await self._read(workers=False)
        return accounts, creds, rules, version

    async def allowed_ips(self) -> list[tuple[int, str]]:
        """The allow-listed client addresses, ``(credential_id, cidr)`` (for
        ``Runtime.apply_allowed_ips``; read after each snapshot: a change between the two
        reads bumps the version, and the next refresh reads both again)."""
        async with self.lock:
            c = await self._conn()
            rows = await c.fetchall(self.dialect.sql(_ALLOWED_IPS))
        return [(int(r[0]), str(r[1])) for r in rows]

    async def snapshot_shared(self) -> tuple[list[Any], list[Any], list[Any], int, list[Any]]:
        """:meth:`snapshot` and, read in the same transaction, the ``worker_usage`` rows
        ``(worker, credential_id, account_id, bytes, trial_bytes)`` (for
        ``Runtime.apply_snapshot``'s
        *worker_usage* when the hot state is shared): the balances and what each worker
        had flushed must come from one state of the ledger for the credit to be exact."""
        return await self._read(workers=True)

    async def _read(self, workers: bool) -> tuple[list[Any], list[Any], list[Any], int, list[Any]]:
        sql = self.dialect.sql
        async with self.lock:
            c = await self._conn()
            await c.execute(self.dialect.begin_read)
            try:
                version = await self._version(c)
                accounts = await c.fetchall(sql(_ACCOUNTS))
                creds = await c.fetchall(sql(_CREDENTIALS))
                rules = await c.fetchall(sql(_RULES))
                rows = await c.fetchall(sql(_WORKER_USAGE)) if workers else []
            finally:
                if not c.broken:
                    await c.execute("COMMIT")
        return accounts, creds, rules, version, rows

    async def write(self, batch: UsageBatch) -> bool:
        """Write one batch of usage in a single transaction (all of it or none), once.

        False when the ledger already holds a batch with this one's id (written before,
        its answer lost): nothing is written again.

        A batch stamped with a worker (``batch.worker``: the hot state is shared) also
        adds its credentials' bytes, and the trial bytes among them, to that worker's
        ``worker_usage`` rows, in the same transaction: a snapshot then never sees the
        usage without the flushed bytes.
        """
        async with self.lock:
            return await self._write(batch)

    async def forget_workers(self, workers: list[str]) -> None:
        """Delete the ``worker_usage`` rows of workers that are gone (see the reaper in
        :mod:`datorus_core.hotstate.redis_state` for when that is safe)."""
        async with self.lock:
            c = await self._conn()
            await c.execute(self.dialect.begin_write)
            try:
                await c.executemany(self.dialect.sql(_FORGET_WORKER), [(w,) for w in workers])
                await c.execute("COMMIT")
            except BaseException:
                await self._rollback(c)
                raise

    async def _write(self, batch: UsageBatch) -> bool:
        c, sql = await self._conn(), self.dialect.sql
        await c.execute(self.dialect.begin_write)
        try:
            if not await c.execute(sql(_BATCH), (batch.id, batch.worker, int(time.time()))):
                await c.execute("ROLLBACK")  # written before: its answer was lost
                return False
            # rows in key order: two gateways writing at once lock the rows they share
            # (balances, per-day rows) in the same order, so neither waits on the other
            # in a circle
            await self._insert(c, _USAGE, [(a, *v) for a, v in sorted(batch.accounts.items())])
            await self._insert(c, _DAILY, [(*k, *v) for k, v in sorted(batch.daily.items())])
            await self._insert(c, _CREDENTIAL_BYTES, sorted(batch.credentials.items()))
            if batch.worker is not None:
                await self._insert(c, _WORKER_BYTES, _worker_rows(batch))
            await self._insert(c, _RECEIPTS, clean_receipts(batch.receipts))
            await c.execute("COMMIT")
        except BaseException:
            await self._rollback(c)
            raise
        return True

    async def _insert(self, c: AsyncConnection, rows_sql: Rows, rows: Sequence[Any]) -> None:
        """Insert *rows* (tuples in *rows_sql*'s parameter order), in order: one statement
        of arrays on PostgreSQL, one statement per row on SQLite."""
        if not rows:
            return
        if self.dialect is POSTGRES:
            columns = [list(col) for col in zip(*rows, strict=True)]
            # the arrays travel in binary (psycopg's %b): its text arrays quote-check
            # every element in Python, a third of the writer's CPU per event
            statement = self.dialect.sql(rows_sql.arrays()).replace("%s::", "%b::")
            await c.execute(statement, columns)
        else:
            await c.executemany(self.dialect.sql(rows_sql.one()), rows)

    async def secret(self, name: str) -> str:
        """The ledger's secret *name* (as ``ledger.api.secret``: made the first time)."""
        sql = self.dialect.sql
        async with self.lock:
            c = await self._conn()
            await c.execute(sql(_SECRET_ADD), (name, secrets.token_hex(32)))
            rows = await c.fetchall(sql(_SECRET), (name,))
        return str(rows[0][0])

    async def record_denials(self, rows: list[tuple[Any, ...]]) -> None:
        """Append acceptable-use denials for the operator."""
        async with self.lock:
            c = await self._conn()
            await c.executemany(self.dialect.sql(_DENIALS), rows)

    async def pool(self, now: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The egress rows (``egress.egress_from_row``) and the leases live at *now*
        (``live.Lease.from_row``), read together."""
        sql = self.dialect.sql
        async with self.lock:
            c = await self._conn()
            await c.execute(self.dialect.begin_read)
            try:
                rows = await c.fetchall(sql(POOL_SQL))
                live = await c.fetchall(sql(ACTIVE_SQL), (now,))
            finally:
                if not c.broken:
                    await c.execute("COMMIT")
        return rows, live

    async def store_checks(self, checks: Sequence[CheckWrite]) -> None:
        """Record checks of egress (a batch, in one transaction): each checker's run in
        ``egress_checks`` (the last 500 per egress kept) and ``checker_runs``, and each
        egress's new status, score and findings."""
        if not checks:
            return
        sql = self.dialect.sql
        now = iso_utc()
        rows: list[tuple[Any, ...]] = []
        runs: list[tuple[Any, ...]] = []
        egress: list[tuple[Any, ...]] = []
        for w in checks:
            at = w.at or now
            for r in w.runs:
                rows.append(  # a checker that raised shows as a failed run of the egress
                    (
                        r.checker,
                        r.stage,
                        int(r.passed and r.error is None),
                        r.latency_ms,
                        r.exit_ip,
                        r.detail or r.error,
                        at,
                        w.egress_id,
                    )
                )
                failed = r.error is None and not r.passed
                runs.append(
                    (
                        r.checker,
                        int(failed),
                        int(r.error is not None),
                        at,
                        at if failed else None,
                        r.detail if failed else None,
                        at if r.error is not None else None,
                        r.error,
                    )
                )
            egress.append(
                (
                    w.score,
                    w.uptime_pct,
                    w.latency_ms,
                    w.exit_ip,
                    w.anonymity,
                    w.country.lower() if w.country else None,
                    w.status,
                    w.fail_streak,
                    at,
                    0,  # the batch's number, set below inside the transaction
                    w.egress_id,
                )
            )
        ids = sorted({w.egress_id for w in checks})
        trims = [(eid, eid) for eid in ids]
        async with self.lock:
            c = await self._conn()
            await c.execute(self.dialect.begin_write)
            try:
                marks = ",".join("?" * len(ids))
                before = {
                    r[0]: (r[1], r[2])
                    for r in await c.fetchall(
                        sql(f"SELECT id, status, url FROM egress WHERE id IN ({marks})"
                            " ORDER BY id {for_update}"),
                        ids,
                    )
                }  # fmt: skip
                seq = int((await c.fetchall(sql(_CHECK_SEQ_NEXT)))[0][0])
                egress = [(*e[:-2], seq, e[-1]) for e in egress]
                for statement, params in (
                    (_CHECK_ROW, rows),
                    (_CHECKER_RUN, runs),
                    (_CHECK_EGRESS, egress),
                    (_CHECK_TRIM, trims),
                ):
                    if params:
                        await c.executemany(sql(statement), params)
                news = _status_events(before, checks)
                news += await self._pool_mark(c)
                await self._events(c, news)
                await c.execute("COMMIT")
            except BaseException:
                await self._rollback(c)
                raise

    async def _pool_mark(self, c: AsyncConnection) -> list[Notice]:
        """``proxy.pool_low`` when the active egress just fell below the threshold (its mark
        in ``event_marks`` says it was not low); the mark follows the pool both ways."""
        if self.pool_low <= 0:
            return []
        sql = self.dialect.sql
        active = int((await c.fetchall(sql(_ACTIVE_COUNT)))[0][0])
        low = active < self.pool_low
        rows = await c.fetchall(sql(_MARK), ("pool_low",))
        was = bool(rows) and rows[0][0] == "low"
        if low == was:
            return []
        await c.execute(sql(_SET_MARK), ("pool_low", "low" if low else "ok"))
        if not low:
            return []
        return [Notice("proxy.pool_low", None, {"active": active, "threshold": self.pool_low})]

    async def _events(self, c: AsyncConnection, notices: Sequence[Notice]) -> None:
        """Insert *notices* as events, the last statements of the caller's transaction
        (on PostgreSQL under the events lock, so ids commit in order)."""
        if not notices:
            return
        lock = events_lock_sql(self.dialect)
        if lock is not None:
            await c.execute(lock)
        sql = self.dialect.sql
        for n in notices:
            data = encode_event(n.data)
            if n.per_topup:
                await c.execute(sql(_INSERT_PER_TOPUP), (n.type, n.account_id, data, n.dedupe,
                                                         n.account_id))  # fmt: skip
            else:
                await c.execute(sql(EVENT_INSERT), (n.type, n.account_id, data, n.dedupe))

    async def write_events(self, notices: Sequence[Notice]) -> None:
        """Write events the gateway noticed (the proxy path's: ``credits.exhausted``...) in
        one transaction; one with a dedupe key already in the ledger is skipped."""
        async with self.lock:
            c = await self._conn()
            await c.execute(self.dialect.begin_write)
            try:
                await self._events(c, notices)
                await c.execute("COMMIT")
            except BaseException:
                await self._rollback(c)
                raise

    async def check_seq(self) -> int:
        """The number of the last batch of checks written (0: none yet)."""
        async with self.lock:
            rows = await (await self._conn()).fetchall(self.dialect.sql(_CHECK_SEQ))
        return int(rows[0][0]) if rows else 0

    async def checked_since(self, seq: int) -> list[tuple[Any, ...]]:
        """The egress that checks wrote after batch *seq*, oldest batch first: rows
        ``(id, status, fail_streak, score, avg_latency_ms, exit_ip, country, check_seq)``
        (at most :data:`CHECKED_ROWS_MAX`; the last row's ``check_seq`` is where to go on)."""
        async with self.lock:
            c = await self._conn()
            return await c.fetchall(self.dialect.sql(_CHECKED_SINCE), (seq, CHECKED_ROWS_MAX))

    async def waiting_events(self) -> dict[str, int]:
        """Events waiting for delivery, by queue: ``mail`` is the outbox's messages not
        sent (queued, failed, or kept for the operator when no SMTP server is set);
        ``deliveries`` the webhook and notifier deliveries pending (issue 18's outbox)."""
        async with self.lock:
            c = await self._conn()
            rows = await c.fetchall(self.dialect.sql(_MAIL_WAITING))
            hooks = await c.fetchall(self.dialect.sql(_DELIVERIES_WAITING))
        return {
            "mail": int(rows[0][0]) if rows else 0,
            "deliveries": int(hooks[0][0]) if hooks else 0,
        }

    async def prune_receipts(self, days: int) -> int:
        """Delete receipts of requests older than *days* (and the ids of usage batches
        written more than :data:`BATCH_ID_DAYS` ago); returns how many receipts went."""
        now = time.time()
        cutoff = request_id_floor(int((now - days * 86400) * 1000))
        async with self.lock:
            c = await self._conn()
            gone = await c.execute(self.dialect.sql(_PRUNE), (cutoff,))
            await c.execute(self.dialect.sql(_PRUNE_BATCHES), (int(now) - BATCH_ID_DAYS * 86400,))
        return gone


def _status_events(
    before: dict[int, tuple[str, str]], checks: Sequence[CheckWrite]
) -> list[Notice]:
    """``proxy.dead`` for an active egress its checks left dead, ``proxy.recovered`` for a
    dead one they left active (a new proxy failing its first checks is no news)."""
    out: list[Notice] = []
    for w in checks:
        old = before.get(w.egress_id)
        if old is None or old[0] == w.status:
            continue
        kind = {("active", "dead"): "proxy.dead", ("dead", "active"): "proxy.recovered"}.get(
            (old[0], w.status)
        )
        if kind is not None:
            detail = next((r.detail or r.error for r in w.runs if not r.passed), None)
            out.append(
                Notice(kind, None, {"proxy_id": str(w.egress_id), "url": _shown_url(old[1]),
                                    "detail": detail})
            )  # fmt: skip
            before[w.egress_id] = (w.status, old[1])
    return out


def _shown_url(url: str) -> str:
    """An egress URL without its credentials."""
    try:
        return parse_egress_url(url).customer_url()
    except ValueError:
        return "?"


def _worker_rows(batch: UsageBatch) -> list[tuple[str | None, int, int, int, int]]:
    """``worker_usage`` increments of a stamped batch: (worker, credential, account,
    bytes, trial bytes), by credential.

    A batch's credentials all appear in its per-day rows, which name their account and
    carry the trial bytes charged.
    """
    owner: dict[int, int] = {}
    trial: dict[int, int] = {}
    for (aid, cid, _), row in batch.daily.items():
        owner[cid] = aid
        trial[cid] = trial.get(cid, 0) + row[3]
    return [
        (batch.worker, cid, owner[cid], n, trial[cid])
        for cid, n in sorted(batch.credentials.items())
    ]
