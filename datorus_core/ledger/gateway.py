"""The gateway's connection to the ledger: snapshots in, usage batches out (aiosqlite).

One aiosqlite connection (one worker thread) serves both directions, so a snapshot
and a batch write never interleave: that is what keeps the in-memory balances
equal to the ledger plus the pending batch. This is the only way the gateway's event
loop reaches the ledger; its statements are rendered by the same
:class:`~.dialect.Dialect` as the synchronous handle's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiosqlite

from ..envelope import request_id_floor
from ..runtime import UsageBatch
from .db import migrate_file
from .dialect import SQLITE, Dialect
from .egress import POOL_SQL
from .leases import ACTIVE_SQL

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
_VERSION = "SELECT version FROM config_version WHERE id = 1"
_USAGE = (
    "INSERT INTO transactions (account_id, kind, nanocents, trial_bytes, bytes, requests)"
    " VALUES (?, 'usage', ?, ?, ?, ?)"
)
_DAILY = (
    "INSERT INTO usage_daily (account_id, credential_id, day, requests, bytes_up,"
    " bytes_down, trial_bytes, nanocents) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (account_id, credential_id, day) DO UPDATE SET"
    " requests = usage_daily.requests + excluded.requests,"
    " bytes_up = usage_daily.bytes_up + excluded.bytes_up,"
    " bytes_down = usage_daily.bytes_down + excluded.bytes_down,"
    " trial_bytes = usage_daily.trial_bytes + excluded.trial_bytes,"
    " nanocents = usage_daily.nanocents + excluded.nanocents"
)
_CREDENTIAL_BYTES = (
    "INSERT INTO credential_usage (credential_id, bytes) VALUES (?, ?)"
    " ON CONFLICT (credential_id) DO UPDATE SET bytes = credential_usage.bytes + excluded.bytes"
)
_RECEIPTS = (
    "INSERT {or_ignore} INTO receipts (request_id, account_id, credential_id, method, host,"
    " port, status, bytes_up, bytes_down, trial_bytes, nanocents, started_at, finished_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) {on_conflict_ignore}"
)
_CHECK_ROW = (
    "INSERT INTO egress_checks (egress_id, checker_name, stage, passed, latency_ms,"
    " exit_ip, detail) SELECT id, 'gateway', ?, ?, ?, ?, ? FROM egress WHERE id = ?"
)
_CHECK_SCORE = (
    "UPDATE egress SET score = ?, uptime_pct = ?, avg_latency_ms = ?,"
    " exit_ip = COALESCE(?, exit_ip), anonymity = COALESCE(?, anonymity),"
    " last_checked_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE id = ?"
)
_CHECK_TRIM = (  # the last 500 checks of each egress are kept
    "DELETE FROM egress_checks WHERE egress_id = ? AND id <= ("
    " SELECT id FROM egress_checks WHERE egress_id = ? ORDER BY id DESC"
    " LIMIT 1 OFFSET 500)"
)
_WORKER_USAGE = "SELECT worker, credential_id, account_id, bytes, trial_bytes FROM worker_usage"
_WORKER_BYTES = (
    "INSERT INTO worker_usage (worker, credential_id, account_id, bytes, trial_bytes)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (worker, credential_id) DO UPDATE SET"
    " bytes = worker_usage.bytes + excluded.bytes,"
    " trial_bytes = worker_usage.trial_bytes + excluded.trial_bytes"
)
_FORGET_WORKER = "DELETE FROM worker_usage WHERE worker = ?"
_DENIALS = "INSERT INTO aup_denials (account_id, host, port, rule) VALUES (?, ?, ?, ?)"
_PRUNE = "DELETE FROM receipts WHERE request_id < ?"
# the gateway's connection leaves foreign_keys off, as it always has
_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000")


class LedgerLink:
    """An open, migrated ledger as the gateway uses it."""

    def __init__(self, path: str, dialect: Dialect = SQLITE) -> None:
        self.path = path
        self.dialect = dialect
        self.conn: aiosqlite.Connection | None = None
        # one transaction at a time on the one connection: the ledger task and the
        # egress router both use it, and their statements must not interleave
        self.lock = asyncio.Lock()

    async def open(self) -> None:
        """Create or migrate the ledger, then open the gateway's connection."""
        await asyncio.to_thread(migrate_file, self.path)
        self.conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=5.0)
        for pragma in _PRAGMAS:
            await self.conn.execute(f"PRAGMA {pragma}")

    async def close(self) -> None:
        """Close the connection (pending batches must be written first)."""
        if self.conn is not None:
            await self.conn.close()
            self.conn = None

    async def version(self) -> int:
        """The ledger's configuration version (bumped by every operator change)."""
        assert self.conn is not None
        async with self.conn.execute(self.dialect.sql(_VERSION)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def snapshot(self) -> tuple[list[Any], list[Any], list[Any], int]:
        """Accounts, live credentials, policy rules and the version they belong to."""
        accounts, creds, rules, version, _ = await self._read(workers=False)
        return accounts, creds, rules, version

    async def snapshot_shared(self) -> tuple[list[Any], list[Any], list[Any], int, list[Any]]:
        """:meth:`snapshot` and, read in the same transaction, the ``worker_usage`` rows
        ``(worker, credential_id, account_id, bytes, trial_bytes)`` (for
        ``Runtime.apply_snapshot``'s
        *worker_usage* when the hot state is shared): the balances and what each worker
        had flushed must come from one state of the ledger for the credit to be exact."""
        return await self._read(workers=True)

    async def _read(self, workers: bool) -> tuple[list[Any], list[Any], list[Any], int, list[Any]]:
        assert self.conn is not None
        sql = self.dialect.sql
        async with self.lock:
            await self.conn.execute(self.dialect.begin_read)
            try:
                version = await self.version()
                accounts = list(await self.conn.execute_fetchall(sql(_ACCOUNTS)))
                creds = list(await self.conn.execute_fetchall(sql(_CREDENTIALS)))
                rules = list(await self.conn.execute_fetchall(sql(_RULES)))
                rows = list(await self.conn.execute_fetchall(sql(_WORKER_USAGE))) if workers else []
            finally:
                await self.conn.execute("COMMIT")
        return accounts, creds, rules, version, rows

    async def write(self, batch: UsageBatch) -> None:
        """Write one batch of usage in a single transaction (all of it or none).

        A batch stamped with a worker (``batch.worker``: the hot state is shared) also
        adds its credentials' bytes, and the trial bytes among them, to that worker's
        ``worker_usage`` rows, in the same transaction: a snapshot then never sees the
        usage without the flushed bytes.
        """
        async with self.lock:
            await self._write(batch)

    async def forget_workers(self, workers: list[str]) -> None:
        """Delete the ``worker_usage`` rows of workers that are gone (see the reaper in
        :mod:`datorus_core.hotstate.redis_state` for when that is safe)."""
        assert self.conn is not None
        c = self.conn
        async with self.lock:
            await c.execute(self.dialect.begin_write)
            try:
                await c.executemany(self.dialect.sql(_FORGET_WORKER), [(w,) for w in workers])
                await c.execute("COMMIT")
            except BaseException:
                await c.execute("ROLLBACK")
                raise

    async def _write(self, batch: UsageBatch) -> None:
        assert self.conn is not None
        c, sql = self.conn, self.dialect.sql
        await c.execute(self.dialect.begin_write)
        try:
            if batch.accounts:
                await c.executemany(sql(_USAGE), [(aid, *v) for aid, v in batch.accounts.items()])
            if batch.daily:
                await c.executemany(sql(_DAILY), [(*k, *v) for k, v in batch.daily.items()])
            if batch.credentials:
                await c.executemany(sql(_CREDENTIAL_BYTES), list(batch.credentials.items()))
                if batch.worker is not None:
                    await c.executemany(sql(_WORKER_BYTES), _worker_rows(batch))
            if batch.receipts:
                await c.executemany(sql(_RECEIPTS), batch.receipts)
            await c.execute("COMMIT")
        except BaseException:
            await c.execute("ROLLBACK")
            raise

    async def record_denials(self, rows: list[tuple[Any, ...]]) -> None:
        """Append acceptable-use denials for the operator."""
        assert self.conn is not None
        async with self.lock:
            await self.conn.executemany(self.dialect.sql(_DENIALS), rows)

    async def pool(self, now: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The egress rows (``egress.egress_from_row``) and the leases live at *now*
        (``live.Lease.from_row``), read together."""
        assert self.conn is not None
        sql = self.dialect.sql
        async with self.lock:
            await self.conn.execute(self.dialect.begin_read)
            try:
                rows = [tuple(r) for r in await self.conn.execute_fetchall(sql(POOL_SQL))]
                live = await self.conn.execute_fetchall(sql(ACTIVE_SQL), (now,))
            finally:
                await self.conn.execute("COMMIT")
        return rows, [tuple(r) for r in live]

    async def store_check(
        self, egress_id: int, check: Any, score: float, uptime_pct: float, latency_ms: Any
    ) -> None:
        """Record one health check of an egress (*check*: an ``egress_io`` result) and its
        new score, keeping its last 500 checks."""
        assert self.conn is not None
        c, sql = self.conn, self.dialect.sql
        r = check
        async with self.lock:
            await c.execute(self.dialect.begin_write)
            try:
                await c.execute(
                    sql(_CHECK_ROW),
                    (r.stage, int(r.ok), r.latency_ms, r.exit_ip, r.detail, egress_id),
                )
                await c.execute(
                    sql(_CHECK_SCORE),
                    (score, uptime_pct, latency_ms, r.exit_ip, r.anonymity, egress_id),
                )
                await c.execute(sql(_CHECK_TRIM), (egress_id, egress_id))
                await c.execute("COMMIT")
            except BaseException:
                await c.execute("ROLLBACK")
                raise

    async def prune_receipts(self, days: int) -> int:
        """Delete receipts of requests older than *days*; returns how many went."""
        assert self.conn is not None
        cutoff = request_id_floor(int((time.time() - days * 86400) * 1000))
        async with self.lock:
            cur = await self.conn.execute(self.dialect.sql(_PRUNE), (cutoff,))
        return cur.rowcount


def _worker_rows(batch: UsageBatch) -> list[tuple[str | None, int, int, int, int]]:
    """``worker_usage`` increments of a stamped batch: (worker, credential, account,
    bytes, trial bytes).

    A batch's credentials all appear in its per-day rows, which name their account and
    carry the trial bytes charged.
    """
    owner: dict[int, int] = {}
    trial: dict[int, int] = {}
    for (aid, cid, _), row in batch.daily.items():
        owner[cid] = aid
        trial[cid] = trial.get(cid, 0) + row[3]
    return [(batch.worker, cid, owner[cid], n, trial[cid]) for cid, n in batch.credentials.items()]
