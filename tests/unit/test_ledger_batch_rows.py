"""A usage batch of many rows writes the same ledger on SQLite and on PostgreSQL.

The gateway's writer inserts a batch's rows one statement per row on SQLite and one
statement of arrays per table on PostgreSQL (``LedgerLink`` and its ``Rows``). The same
large batch, written to a SQLite file and to a real PostgreSQL database, must leave the
same rows in every table it touches, usage rows in account order, balances equal to
the sum of the transactions, and a duplicated receipt kept once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from datorus_core.envelope import new_request_id
from datorus_core.ledger import Ledger, accounts, open_ledger, usage
from datorus_core.ledger.gateway import LedgerLink
from datorus_core.runtime import UsageBatch

DAY = "2026-01-02"
N = 150


def fill(db: Ledger) -> list[int]:
    """*N* accounts with a trial and a credential each (sharing one hash): their ids."""
    ids = [
        accounts.create_account(db, f"c{i}@example.com", trial_bytes=10_000 + i)["id"]
        for i in range(N)
    ]
    accounts.add_credentials_bulk(db, [(i, f"user{i}", "unused-hash") for i in ids])
    return ids


def big_batch(customers: list[tuple[int, int]], worker: str) -> UsageBatch:
    b = UsageBatch(worker=worker)
    for i, (aid, cid) in enumerate(reversed(customers)):  # not in key order: sorted when written
        b.accounts[aid] = [-300 * i, -(i % 7), 1000 + i, 1 + i % 3]
        b.daily[(aid, cid, DAY)] = [1 + i % 3, 100 + i, 900, i % 7, 300 * i]
        b.credentials[cid] = 1000 + i
        for k in range(2):
            b.receipts.append(
                (new_request_id(), aid, cid, "GET", f"h{k}.example", 80, 200, 100 + i, 900,
                 i % 7, 300 * i, "2026-01-02T03:04:05.000Z", "2026-01-02T03:04:06.000Z")
            )  # fmt: skip
    b.receipts.append(b.receipts[0])  # the same request id twice: kept once
    b.events = len(b.receipts)
    return b


def dump(db: Ledger) -> dict[str, list[tuple[Any, ...]]]:
    queries = {
        "transactions": "SELECT id, account_id, kind, nanocents, trial_bytes, bytes, requests"
        " FROM transactions WHERE kind = 'usage' ORDER BY id",
        "balances": "SELECT * FROM balances ORDER BY account_id",
        "usage_daily": "SELECT * FROM usage_daily ORDER BY account_id, credential_id, day",
        "credential_usage": "SELECT * FROM credential_usage ORDER BY credential_id",
        "receipts": "SELECT * FROM receipts ORDER BY request_id",
        "worker_usage": "SELECT * FROM worker_usage ORDER BY worker, credential_id",
    }
    return {k: [tuple(r.values()) for r in db.query(q)] for k, q in queries.items()}


def write(target: str, batch: UsageBatch) -> dict[str, list[tuple[Any, ...]]]:
    db = open_ledger(target)
    try:
        assert fill(db) == list(range(1, N + 1))

        async def main() -> None:
            link = LedgerLink(target)
            await link.open()
            try:
                assert await link.write(batch)
            finally:
                await link.close()

        asyncio.run(main())
        sums = db.query(
            "SELECT account_id, SUM(nanocents) AS n, SUM(trial_bytes) AS t FROM transactions"
            " GROUP BY account_id ORDER BY account_id"
        )
        balances = db.query("SELECT account_id, nanocents AS n, trial_bytes AS t FROM balances")
        assert sorted(sums, key=lambda r: r["account_id"]) == sorted(
            balances, key=lambda r: r["account_id"]
        )
        assert usage.usage(db, 1)["requests"] == batch.accounts[1][3]
        return dump(db)
    finally:
        db.close()


def test_a_batch_of_many_rows_leaves_the_same_ledger_on_both_backends(
    postgres_url: str, tmp_path: Path
) -> None:
    customers = [(i, i) for i in range(1, N + 1)]  # what fill() makes in a fresh ledger
    batch = big_batch(customers, "w1")
    on_sqlite = write(str(tmp_path / "ledger.db"), batch)
    on_postgres = write(postgres_url, batch)
    assert on_postgres == on_sqlite
    usage_rows = on_sqlite["transactions"]
    assert [r[1] for r in usage_rows] == list(range(1, N + 1))  # written in account order
    assert len(on_sqlite["receipts"]) == 2 * N
    assert len(on_sqlite["worker_usage"]) == N and len(on_sqlite["usage_daily"]) == N
