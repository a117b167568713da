"""The gateway's connection to the ledger: snapshots in, usage batches out (aiosqlite).

One aiosqlite connection (one worker thread) serves both directions, so a snapshot
and a batch write never interleave: that is what keeps the in-memory balances
equal to the ledger plus the pending batch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiosqlite

from .envelope import request_id_floor
from .ledger.db import migrate_file
from .runtime import UsageBatch

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


class LedgerLink:
    """An open, migrated ledger as the gateway uses it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: aiosqlite.Connection | None = None

    async def open(self) -> None:
        """Create or migrate the ledger, then open the gateway's connection."""
        await asyncio.to_thread(migrate_file, self.path)
        self.conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=5.0)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000"):
            await self.conn.execute(f"PRAGMA {pragma}")

    async def close(self) -> None:
        """Close the connection (pending batches must be written first)."""
        if self.conn is not None:
            await self.conn.close()
            self.conn = None

    async def version(self) -> int:
        """The ledger's configuration version (bumped by every operator change)."""
        assert self.conn is not None
        async with self.conn.execute("SELECT version FROM config_version WHERE id = 1") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def snapshot(self) -> tuple[list[Any], list[Any], list[Any], int]:
        """Accounts, live credentials, policy rules and the version they belong to."""
        assert self.conn is not None
        await self.conn.execute("BEGIN")
        try:
            version = await self.version()
            accounts = list(await self.conn.execute_fetchall(_ACCOUNTS))
            creds = list(await self.conn.execute_fetchall(_CREDENTIALS))
            rules = list(
                await self.conn.execute_fetchall(
                    "SELECT action, target, port FROM policy_rules ORDER BY id"
                )
            )
        finally:
            await self.conn.execute("COMMIT")
        return accounts, creds, rules, version

    async def write(self, batch: UsageBatch) -> None:
        """Write one batch of usage in a single transaction (all of it or none)."""
        assert self.conn is not None
        c = self.conn
        await c.execute("BEGIN IMMEDIATE")
        try:
            if batch.accounts:
                await c.executemany(
                    "INSERT INTO transactions (account_id, kind, nanocents, trial_bytes, bytes,"
                    " requests) VALUES (?, 'usage', ?, ?, ?, ?)",
                    [(aid, *v) for aid, v in batch.accounts.items()],
                )
            if batch.daily:
                await c.executemany(
                    "INSERT INTO usage_daily (account_id, credential_id, day, requests, bytes_up,"
                    " bytes_down, trial_bytes, nanocents) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (account_id, credential_id, day) DO UPDATE SET"
                    " requests = requests + excluded.requests,"
                    " bytes_up = bytes_up + excluded.bytes_up,"
                    " bytes_down = bytes_down + excluded.bytes_down,"
                    " trial_bytes = trial_bytes + excluded.trial_bytes,"
                    " nanocents = nanocents + excluded.nanocents",
                    [(*k, *v) for k, v in batch.daily.items()],
                )
            if batch.credentials:
                await c.executemany(
                    "INSERT INTO credential_usage (credential_id, bytes) VALUES (?, ?)"
                    " ON CONFLICT (credential_id) DO UPDATE SET bytes = bytes + excluded.bytes",
                    list(batch.credentials.items()),
                )
            if batch.receipts:
                await c.executemany(
                    "INSERT OR IGNORE INTO receipts (request_id, account_id, credential_id,"
                    " method, host, port, status, bytes_up, bytes_down, trial_bytes, nanocents,"
                    " started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    batch.receipts,
                )
            await c.execute("COMMIT")
        except BaseException:
            await c.execute("ROLLBACK")
            raise

    async def record_denials(self, rows: list[tuple[Any, ...]]) -> None:
        """Append acceptable-use denials for the operator."""
        assert self.conn is not None
        await self.conn.executemany(
            "INSERT INTO aup_denials (account_id, host, port, rule) VALUES (?, ?, ?, ?)", rows
        )

    async def prune_receipts(self, days: int) -> int:
        """Delete receipts of requests older than *days*; returns how many went."""
        assert self.conn is not None
        cutoff = request_id_floor(int((time.time() - days * 86400) * 1000))
        cur = await self.conn.execute("DELETE FROM receipts WHERE request_id < ?", (cutoff,))
        return cur.rowcount
