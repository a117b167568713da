"""Scheduled scrapes of proxy-list sources, in the background of the gateway (issue 17).

:class:`SourceScheduler` looks once a second for sources whose ``next_run_at`` has come
and scrapes them (``datorus_core.scraping``), at most ``source_concurrency`` at a time.
Nothing of it is on the request path: the ledger is reached from a thread of its own
(its own connection, as the API's threads have theirs), lists are read in worker
threads, and the event loop only awaits them and the download.

With several workers (``datorus serve``) or gateways on one PostgreSQL ledger, each
runs this loop and each due run is claimed in the ledger with one conditional UPDATE
(``ledger.sources.claim``): exactly one process wins it. After a run the next one is
set from the schedule and the current time, so runs missed while no gateway ran are
not replayed in a burst. At a stop, scrapes under way are cancelled and give their
claims back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from datorus_core.ledger import Ledger, connect
from datorus_core.ledger import sources as ledger_sources
from datorus_core.scraping import Scraper, new_owner

from .context import Gateway
from .options import Trouble

log = logging.getLogger("datorus")

T = TypeVar("T")
TICK_SECONDS = 1.0


class SourceScheduler:
    """Run each source's scheduled scrape, once among every process on the ledger."""

    name = "datorus_sources"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.task: asyncio.Task | None = None
        self.scrapes: dict[int, asyncio.Task] = {}
        self.owner = new_owner()
        self.trouble = Trouble("source schedule")
        self._pool: ThreadPoolExecutor | None = None
        self._db: Ledger | None = None

    def running(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="datorus-sources")
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="datorus sources")

    async def done(self) -> None:
        tasks = [t for t in (self.task, *self.scrapes.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._pool is not None:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    await self.db(lambda d: d.close())
            self._pool.shutdown(wait=False)

    # -- the ledger, from this addon's own thread ------------------------------------------

    def _call(self, fn: Callable[[Ledger], T]) -> T:
        if self._db is None or self._db.broken:
            self._db = Ledger(connect(self.gw.settings["db"]))
        return fn(self._db)

    async def db(self, fn: Callable[[Ledger], T]) -> T:
        """Run *fn* on this addon's ledger connection, in its thread."""
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn)

    def scraper(self) -> Scraper:
        """The scraper of scheduled runs, with the settings in force now."""
        s = self.gw.settings
        return Scraper(
            self.db,
            self.owner,
            float(s.get("source_timeout", 30)),
            int(s.get("test_schedule_seconds", 0)),
        )

    # -- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        await self.gw.ready.wait()  # the ledger is open and migrated
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self.tick()
            except Exception as e:  # never let the loop die: the next tick tries again
                self.trouble.failed(str(e))
            else:
                self.trouble.ok()

    async def tick(self) -> None:
        """Start the scrapes that are due, as many as ``source_concurrency`` allows."""
        free = int(self.gw.settings.get("source_concurrency", 2)) - len(self.scrapes)
        if free <= 0:
            return
        now = int(time.time())
        for sid in await self.db(lambda d: ledger_sources.due_sources(d, now, free)):
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
