"""The pool worker: egress checks and scheduled scrapes, in a process of their own.

Checking thousands of proxies and reading their lists costs CPU; on a gateway's event
loop it slowed the requests it serves (issue 17's benchmark: forward req/s -49%,
p99 at c1 +11.7 ms while 10,000 proxies were checked). So a gateway starts this
process beside itself (``addons/pool_worker.py``; under ``datorus serve``, worker 0
does) and the gateways only read the results from the ledger.

One pool worker per ledger works at a time: each holds the ledger's ``pool`` claim
(``ledger.claims``, :data:`CLAIM_TTL` seconds, renewed every :data:`RENEW_SECONDS`)
while it runs :class:`~.checking.CheckRunner` over the egress pool (reloaded when the
ledger's ``config_version`` moves) and the sources' schedules (``source_concurrency``
scrapes at once, each claimed per source: ``scraping.Scraper``). The others wait and
take the claim when it lapses or is given back, so with ``datorus serve --workers N``
or several gateways on one PostgreSQL ledger nothing is checked twice. A worker whose
gateway has no judge waits :data:`NO_JUDGE_DEFER_SECONDS` before its first try on a
PostgreSQL ledger, so a node that grades anonymity gets the pool when both start
together (a SQLite ledger is one box's: its worker checks at once).

It is started as ``python -m datorus_core.pool_worker`` with the gateway's settings as
one JSON line on its standard input, which then stays open: when the gateway goes (its
end of the pipe closes, even if it was killed), the worker stops, writes the checks it
holds and gives its claim back. SIGTERM and SIGINT stop it the same way. It runs at a
lower CPU priority (nice :data:`NICENESS`): on a busy box the proxy's processes come
first and the checks take longer. Its log lines
go to the standard output it inherits, as the gateway's own do (the gateway's log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .checking import CheckRunner
from .egress import Pool, egress_from_row
from .judge import default_judge_url
from .ledger import Ledger, connect
from .ledger import claims as ledger_claims
from .ledger import sources as ledger_sources
from .ledger.gateway import LedgerLink
from .ledger.target import is_postgres
from .scraping import Scraper, new_owner
from .sources.screen import found_proxy_policy

log = logging.getLogger("datorus")

T = TypeVar("T")
CLAIM_TTL = 15  # seconds a claim lasts unless renewed
RENEW_SECONDS = 5.0  # how often the holder renews it
RETRY_SECONDS = 2.0  # how often a waiting worker tries to take it
# a worker whose gateway has no judge (no REST API, public_url or egress_check_url: a
# node behind a balancer, say) tries only after this long, so one that can grade
# anonymity and find exit IPs gets the pool first; it takes over when none holds it
NO_JUDGE_DEFER_SECONDS = 10.0
TICK_SECONDS = 0.2  # the checks' tick
VERSION_SECONDS = 0.5  # how often the pool is looked at for operator changes
SOURCES_SECONDS = 1.0  # how often due sources are looked for


class _Thread:
    """A ledger connection used from one thread of its own (a blocking call never holds
    the event loop)."""

    def __init__(self, target: str, name: str) -> None:
        self.target = target
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.db: Ledger | None = None

    def _call(self, fn: Callable[[Ledger], T]) -> T:
        if self.db is None or self.db.broken:
            self.db = Ledger(connect(self.target))
        return fn(self.db)

    async def run(self, fn: Callable[[Ledger], T]) -> T:
        """Run *fn* on this thread's connection and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._call, fn)

    async def close(self) -> None:
        """Close the connection, then the thread."""
        if self.db is not None:
            with contextlib.suppress(Exception):
                await self.run(lambda d: d.close())
        self.pool.shutdown(wait=False)


class PoolWorker:
    """Hold the ledger's ``pool`` claim and, while held, check the pool and run the
    sources' schedules."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = settings
        self.owner = new_owner()
        self.stopping = asyncio.Event()
        self.link: LedgerLink | None = None
        self.claims = _Thread(settings["db"], "datorus-claims")
        self.sources_db = _Thread(settings["db"], "datorus-sources")
        self.holding = False
        self.held_until = 0.0  # wall clock: when the claim lapses unless renewed
        self.runner: CheckRunner | None = None
        self.pool = Pool()
        self.version: int | None = None
        self.rng = random.Random()
        self.scrapes: dict[int, asyncio.Task] = {}
        self.judged = default_judge_url(settings) is not None

    # -- the claim ---------------------------------------------------------------------------

    async def _claim(self) -> None:
        now = time.time()
        try:
            held = await self.claims.run(
                lambda d: ledger_claims.claim(
                    d, ledger_claims.POOL, self.owner, int(now), CLAIM_TTL
                )
            )
        except Exception as e:  # the ledger is away: work on while the claim lasts
            held = self.holding and time.time() < self.held_until - RENEW_SECONDS
            log.warning("datorus: pool worker could not renew its claim: %s", e)
        if held:
            self.held_until = now + CLAIM_TTL
            if not self.holding:
                log.info("datorus: pool worker %s checks the pool of this ledger", self.owner)
                if not self.judged:
                    log.warning(
                        "datorus: this gateway has no judge (no REST API, public_url or"
                        " egress_check_url): its checks are TCP only, with no exit IP"
                    )
                self.holding = True
                self.runner = CheckRunner(self.settings, self.link)
                self.version = None  # load the pool now
                with contextlib.suppress(Exception):
                    await self.runner.context()  # the judge's secret made, its URL logged
        elif self.holding:
            log.warning("datorus: pool worker %s lost its claim: it stops checking", self.owner)
            await self._stand_down()

    async def _stand_down(self) -> None:
        """Stop what runs under the claim (checks written, scrapes given back)."""
        self.holding = False
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.stop()
        await self._stop_scrapes()
        self.pool = Pool()

    # -- the checks --------------------------------------------------------------------------

    async def _reload(self) -> None:
        assert self.link is not None and self.runner is not None
        version = await self.link.version()
        if version == self.version:
            return
        rows, _ = await self.link.pool(int(time.time()))
        items = []
        for row in rows:
            try:
                items.append(egress_from_row(row))
            except ValueError as e:
                log.warning("datorus: egress %s has a bad URL (%s): not checked", row[0], e)
        self.pool.replace(items)
        self.runner.sync(self.pool, self.rng)
        self.version = version

    # -- the sources -------------------------------------------------------------------------

    def scraper(self) -> Scraper:
        """The scraper of scheduled runs."""
        s = self.settings
        return Scraper(
            self.sources_db.run,
            self.owner,
            float(s.get("source_timeout", 30)),
            int(s.get("test_schedule_seconds", 0)),
            found_proxy_policy(s),
        )

    async def _sources(self) -> None:
        free = int(self.settings.get("source_concurrency", 2)) - len(self.scrapes)
        if free <= 0:
            return
        now = int(time.time())
        for sid in await self.sources_db.run(lambda d: ledger_sources.due_sources(d, now, free)):
            if sid not in self.scrapes:
                self.scrapes[sid] = asyncio.get_running_loop().create_task(
                    self._scrape(sid), name=f"datorus source {sid}"
                )

    async def _scrape(self, source_id: int) -> Any:
        try:
            return await self.scraper().scrape(source_id, scheduled=True)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("datorus: scheduled scrape of source %s failed to run: %s", source_id, e)
            return None
        finally:
            self.scrapes.pop(source_id, None)

    async def _stop_scrapes(self) -> None:
        tasks = list(self.scrapes.values())
        for t in tasks:
            t.cancel()  # a cancelled scrape gives its source's claim back
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Work until :attr:`stopping` is set; then write what is held, give the claim back."""
        self.link = LedgerLink(self.settings["db"])
        self.link.pool_low = int(self.settings.get("event_pool_low", 0))  # proxy.pool_low
        await self.link.open()
        next_version = next_sources = 0.0
        # only a PostgreSQL ledger has gateways on other boxes, with other judges, to
        # defer to; on a SQLite file every gateway is on this box: check at once
        defer = not self.judged and is_postgres(str(self.settings["db"]))
        next_claim = time.monotonic() + NO_JUDGE_DEFER_SECONDS if defer else 0.0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_claim:
                    await self._claim()
                    next_claim = now + (RENEW_SECONDS if self.holding else RETRY_SECONDS)
                if self.holding and self.runner is not None:
                    try:
                        if now >= next_version:
                            next_version = now + VERSION_SECONDS
                            await self._reload()
                        self.runner.tick(self.pool, self.rng)
                        if now >= next_sources:
                            next_sources = now + SOURCES_SECONDS
                            await self._sources()
                    except Exception as e:  # never let the loop die: the next tick tries again
                        log.warning("datorus: pool worker tick failed: %s", e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), TICK_SECONDS)
        finally:
            await self._stand_down()
            with contextlib.suppress(Exception):
                await self.claims.run(
                    lambda d: ledger_claims.release(d, ledger_claims.POOL, self.owner)
                )
            await self.claims.close()
            await self.sources_db.close()
            await self.link.close()


async def _watch_stdin(stop: asyncio.Event) -> None:
    """Set *stop* when standard input closes (the gateway that started us is gone)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    with contextlib.suppress(Exception):
        while await reader.read(4096):
            pass
    stop.set()


async def _main(settings: Mapping[str, Any]) -> None:
    worker = PoolWorker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    watcher = loop.create_task(_watch_stdin(worker.stopping))
    try:
        await worker.run()
    finally:
        watcher.cancel()


NICENESS = 10  # the pool worker yields the CPU to the gateway's processes


def main() -> int:
    """``python -m datorus_core.pool_worker``: settings as one JSON line on stdin."""
    with contextlib.suppress(OSError):
        os.nice(NICENESS)  # checks may wait; requests may not
    logging.basicConfig(  # where and how mitmdump writes the gateway's own lines
        level=logging.INFO,
        format="[%(asctime)s.%(msecs)03d] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    line = sys.stdin.buffer.readline()
    try:
        settings = json.loads(line)
        if not isinstance(settings, dict) or not settings.get("db"):
            raise ValueError("no ledger named")
    except ValueError as e:
        log.error("datorus: pool worker: bad settings on standard input: %s", e)
        return 2
    try:
        asyncio.run(_main(settings))
    except Exception as e:
        log.error("datorus: pool worker stopped: %s: %s", type(e).__name__, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
