"""The ledger's service claims and numbered check batches, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from datorus_core.ledger import claims as ledger_claims
from datorus_core.ledger import egress as ledger_egress
from datorus_core.ledger import open_ledger
from datorus_core.ledger.gateway import LedgerLink


def test_one_owner_holds_a_claim_until_it_lapses_or_is_given_back(ledger_target):
    db = open_ledger(ledger_target)
    claim = ledger_claims.claim
    assert claim(db, "pool", "a", 1000, 15)
    assert not claim(db, "pool", "b", 1001, 15)
    assert claim(db, "pool", "a", 1010, 15)  # renewed: until 1025
    assert not claim(db, "pool", "b", 1024, 15)
    held = ledger_claims.holder(db, "pool", 1024)
    assert held is not None and (held["owner"], held["expires_at"], held["claimed_at"]) == (
        "a",
        1025,
        1000,
    )
    assert claim(db, "pool", "b", 1025, 15)  # lapsed: taken
    assert not ledger_claims.release(db, "pool", "a")  # not a's to give back
    assert ledger_claims.release(db, "pool", "b")
    assert ledger_claims.holder(db, "pool", 1026) is None
    assert claim(db, "other", "a", 1026, 15)  # claims are per name


def test_racing_claimants_get_one_winner(ledger_target):
    open_ledger(ledger_target).close()  # migrated once, before the race

    def take(owner: str) -> bool:
        d = open_ledger(ledger_target)
        try:
            return ledger_claims.claim(d, "pool", owner, 5000, 15)
        finally:
            d.close()

    with ThreadPoolExecutor(8) as ex:
        won = list(ex.map(take, [f"w{i}" for i in range(8)]))
    assert won.count(True) == 1


def test_each_check_batch_is_numbered_and_read_back_since_a_number(ledger_target):
    db = open_ledger(ledger_target)
    ids = [ledger_egress.add_egress(db, f"http://127.0.0.1:{3000 + i}")["id"] for i in range(3)]
    version = db.config_version()

    def write(eid: int, status: str) -> ledger_egress.CheckWrite:
        run = ledger_egress.CheckRun("tcp_connect", 1, status == "active")
        return ledger_egress.CheckWrite(eid, (run,), status, 0, 0.5, 100.0, 12.0, "192.0.2.9")

    async def main() -> tuple[int, list, list, int]:
        link = LedgerLink(ledger_target)
        await link.open()
        try:
            start = await link.check_seq()
            await link.store_checks([write(ids[0], "active"), write(ids[1], "dead")])
            first = await link.checked_since(start)
            await link.store_checks([write(ids[2], "active")])
            second = await link.checked_since(first[-1][-1])
            return start, first, second, await link.check_seq()
        finally:
            await link.close()

    start, first, second, last = asyncio.run(main())
    assert start == 0 and last == 2
    assert [(r[0], r[1], r[5], r[7]) for r in first] == [
        (ids[0], "active", "192.0.2.9", 1),
        (ids[1], "dead", "192.0.2.9", 1),
    ]
    assert [(r[0], r[1], r[7]) for r in second] == [(ids[2], "active", 2)]
    assert db.config_version() == version  # checks are no operator change: no full reload
