"""The ledger task's snapshot reload as a request sees it while the reload is under way.

A ``datorus serve`` worker listens before its ledger is loaded; requests that come
meanwhile wait for the first snapshot. Every read of a reload is awaited, so requests
are decided between those awaits: none of them may see a half-applied view.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from addons.options import LedgerTask
from datorus_core.runtime import Runtime

SETTINGS = {
    "ledger_grace": 30,
    "flush_events": 2000,
    "price_cents_per_gb": 300,
    "rps": 50,
    "burst": 100,
    "max_tunnels": 10,
    "max_overdraft_cents": 5,
    "min_balance_cents": 1,
}


class SlowLink:
    """A ledger whose every read waits until the test lets it go on."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.reads: list[str] = []

    async def _read(self, what: str) -> None:
        self.reads.append(what)
        await self.go.wait()
        self.go.clear()

    async def snapshot(self):
        await self._read("snapshot")
        accounts = [(1, "active", 300, None, None, None, 10**9, 0, 0)]
        return accounts, [(7, 1, "dtuser", "hash", None, 0)], [], 1

    async def allowed_ips(self):
        await self._read("allowed_ips")
        return [(7, "127.0.0.2/32")]


@pytest.mark.parametrize("reads", [1, 2])
def test_a_request_during_the_first_load_waits_or_is_served_never_503_stale(reads):
    async def run() -> None:
        rt = Runtime(dict(SETTINGS))
        hot = SimpleNamespace(shared=False, snapshot_wanted=False, refresh_wanted=False)
        task = LedgerTask(SimpleNamespace(runtime=rt, hot=hot, settings=SETTINGS))
        link = SlowLink()
        reload = asyncio.create_task(task._reload(link, force=True))
        for n in range(1, reads + 1):  # the reload waits on its reads; requests come meanwhile
            while len(link.reads) < n:
                await asyncio.sleep(0)
            if n < reads:
                link.go.set()
        # a request now: either the ledger is not loaded (it waits: addons/auth.py), or
        # what it is decided on is the whole snapshot, fresh
        assert not rt.loaded or rt.ledger_error(time.monotonic()) is None
        assert not rt.loaded or rt.allowed_credential("127.0.0.2") is not None
        while not reload.done():
            link.go.set()
            await asyncio.sleep(0)
        await reload
        assert rt.loaded and rt.ledger_error(time.monotonic()) is None
        assert rt.allowed_credential("127.0.0.2") is not None

    asyncio.run(run())
