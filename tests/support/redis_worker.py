"""A gateway worker's shared hot state in a process of its own, for tests that kill it.

``python tests/support/redis_worker.py URL PREFIX DB CLAIM CHARGE TUNNELS``: loads the ledger
DB's snapshot, joins the Redis hot state (short heartbeat and tunnel lease), claims
CLAIM bytes of credit for the first credential, charges CHARGE of them and writes that
usage to the ledger, opens TUNNELS tunnel slots, prints one JSON line and waits to be
killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from datorus_core.hotstate.redis_state import RedisHotState  # noqa: E402
from datorus_core.ledger.gateway import LedgerLink  # noqa: E402
from datorus_core.runtime import Runtime  # noqa: E402

SETTINGS = {
    "price_cents_per_gb": 300,
    "rps": 1000,
    "burst": 1000,
    "max_tunnels": 10,
    "max_overdraft_cents": 0,
    "min_balance_cents": 0,
    "session_ttl": 600,
    "max_sessions": 1000,
    "auth_fail_limit": 5,
    "auth_block_seconds": 30,
}


class Quiet:
    def on_block(self, news: object) -> None:
        pass

    def on_lease(self, news: object) -> None:
        pass


async def main(url: str, prefix: str, db: str, claim: int, charge: int, tunnels: int) -> None:
    link = LedgerLink(db)
    await link.open()
    rt = Runtime(dict(SETTINGS))
    hot = RedisHotState(rt.settings, url, prefix, workers=2)
    hot.heartbeat_ms, hot.heartbeat_seconds = 2000, 0.3
    hot.lease_seconds, hot.renew_seconds = 2, 0.5
    hot.idle_seconds = 3600.0  # holds its credit until it dies
    hot.ledger = link
    await hot.start(Quiet())
    token = await hot.before_snapshot()
    *snap, rows = await link.snapshot_shared()
    rt.apply_snapshot(*snap, worker_usage=rows)
    hot.adopt(rt, token)
    cred = next(iter(rt.by_username.values()))
    while hot.credit(cred) < claim:
        before = hot.credit(cred)
        if await hot.claim(cred, claim - before) == before:
            break
    got = rt.reserve(cred, charge)
    rt.settle(cred, got, 0, got)
    await link.write(rt.take_batch())
    for i in range(tunnels):
        await hot.take(cred, f"t{i}", 0.0)
    print(json.dumps({"worker": hot.worker, "granted": cred.account.granted, "charged": got}))
    sys.stdout.flush()
    await asyncio.Event().wait()


if __name__ == "__main__":
    url, prefix, db, claim, charge, tunnels = sys.argv[1:]
    asyncio.run(main(url, prefix, db, int(claim), int(charge), int(tunnels)))
