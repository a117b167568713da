"""Background checks of the egress pool: the checker plugins, in the pool worker.

:class:`CheckRunner` runs in the pool worker process (``datorus_core.pool_worker``),
never on a gateway's event loop. Its tick (every 0.2 s) starts the checks that are
due (every ``egress_check_seconds`` per egress, at most ``egress_check_concurrency``
at once, each a task of its own), applies each result to its copy of the egress (the
status: ``datorus_core.egress_status``; score, latency, exit IP, a country when it had
none) and writes results to the ledger in batches (one transaction for up to 500
checks, each batch numbered: ``LedgerLink.store_checks``); the gateways read what a
batch changed from there (``addons/egress.py``). Due checks come off a heap, so a tick
costs what is due, not the size of the pool; results waiting for the ledger are capped
(the oldest go first).

What a check runs is ``datorus_core.checkers.pipeline.run_check`` over the installed
checkers; its judge is ``egress_check_url``, by default the gateway's own ``GET
/judge`` at ``public_url`` (``datorus_core.judge.default_judge_url``), signed so its
rate limit does not apply. The gateway's own addresses (a transparent proxy passes
them on) are learnt by fetching the judge directly every few minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .checkers.base import CheckContext
from .checkers.judge_check import HttpAnonymity
from .checkers.pipeline import CheckReport, run_check
from .checkers.registry import installed_checkers
from .egress import Egress, Pool, parse_egress_url
from .egress_status import change
from .judge import check_token, default_judge_url
from .ledger.egress import CheckRun, CheckWrite
from .ledger.gateway import LedgerLink

log = logging.getLogger("datorus")

_BATCH = 500  # checks written in one transaction
_PENDING_MAX = 50_000  # results waiting for the ledger at most (the oldest go first)
_OWN_SECONDS = 300.0  # how often the gateway's own address is learnt again
_CTX_SECONDS = 5.0  # how long one check context (judge URL, token) is reused
_OWN_RETRY = 10.0  # seconds before the gateway's own address is asked for again after a miss


@dataclass(slots=True)
class _Ctx:
    ctx: CheckContext
    at: float


class CheckRunner:
    """Schedules, runs and records the egress checks (one runner per ledger: the pool
    worker that holds the claim)."""

    def __init__(self, settings: Mapping[str, Any], link: LedgerLink | None) -> None:
        self.settings = settings
        self.link = link
        self.registry = installed_checkers()
        self.checking: set[int] = set()
        self.next_check: dict[int, float] = {}  # egress id -> when its next check is due
        self.due: list[tuple[float, int]] = []  # heap of (due, id); stale entries skipped
        self.pending: list[CheckWrite] = []
        self.tasks: set[asyncio.Task] = set()
        self.flushing: asyncio.Task | None = None
        self.own: frozenset[str] = frozenset()
        self.own_at = -_OWN_SECONDS
        self.learning: asyncio.Task | None = None
        self.secret: str | None = None
        self.cached: _Ctx | None = None

    # -- the tick ----------------------------------------------------------------------

    def tick(self, pool: Pool, rng: random.Random) -> None:
        """Start due checks, write results."""
        self._schedule(pool, time.monotonic(), rng)
        self._flush_soon()

    def sync(self, pool: Pool, rng: random.Random) -> None:
        """After a reload: schedule the first check of new egress (spread over a second,
        so a big pool does not burst), forget those no longer in *pool*."""
        now = time.monotonic()
        for eid in [k for k in self.next_check if k not in pool.by_id]:
            del self.next_check[eid]
        for eid in pool.by_id:
            if eid not in self.next_check:
                self._at(eid, now + rng.random())

    def _at(self, eid: int, due: float) -> None:
        self.next_check[eid] = due
        heapq.heappush(self.due, (due, eid))

    def _schedule(self, pool: Pool, now: float, rng: random.Random) -> None:
        s = self.settings
        period = s.get("egress_check_seconds", 30)
        limit = s.get("egress_check_concurrency", 50)
        while self.due and self.due[0][0] <= now and len(self.checking) < limit:
            due, eid = heapq.heappop(self.due)
            if self.next_check.get(eid) != due:
                continue  # stale: rescheduled or removed since
            self._at(eid, now + period)
            e = pool.by_id.get(eid)
            if e is None or not e.enabled or eid in self.checking:
                continue  # a disabled egress is looked at again a period later
            self.checking.add(eid)
            task = asyncio.get_running_loop().create_task(self._check(pool, e))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    # -- one check ---------------------------------------------------------------------

    async def _check(self, pool: Pool, e: Egress) -> None:
        try:
            ctx = await self.context()
            report = await run_check(e.spec, self.registry, ctx)
            current = pool.by_id.get(e.id)  # a reload meanwhile made a new record of it
            if current is not None and current.spec == e.spec:
                e = current
            self._apply(e, report)
        except Exception as x:
            log.warning("datorus: health check of egress %s failed to run: %s", e.id, x)
        finally:
            self.checking.discard(e.id)

    def _apply(self, e: Egress, report: CheckReport) -> None:
        s = self.settings
        before = e.record_check(
            report.passed, report.latency_ms, time.monotonic(), s.get("egress_dead_after", 3)
        )
        if report.exit_ip:
            e.exit_ip = report.exit_ip
        country = report.country.lower() if report.country else None
        if country and not e.country:
            e.country = country
        event = change(before, e.health)
        if event is not None:
            log.info(
                "datorus: egress %s %s -> %s (%s)", e.id, before.status, e.status, report.detail
            )
        runs = tuple(
            CheckRun(
                r.name,
                r.stage,
                r.outcome.passed,
                r.outcome.latency_ms,
                r.outcome.exit_ip,
                r.outcome.detail,
                r.error,
            )
            for r in report.ran
            if r.counted or r.error is not None
        )
        self.pending.append(
            CheckWrite(
                e.id,
                runs,
                e.status,
                e.health.streak,
                e.score,
                round(e.uptime * 100, 2),
                e.latency_ms,
                report.exit_ip,
                report.anonymity,
                country,
            )
        )
        if len(self.pending) > _PENDING_MAX:
            del self.pending[: len(self.pending) - _PENDING_MAX]

    # -- what a check is given ---------------------------------------------------------

    async def context(self) -> CheckContext:
        """The judge, timeout and own addresses checks use now (reused a few seconds)."""
        now = time.monotonic()
        if self.cached is not None and now - self.cached.at < _CTX_SECONDS:
            return self.cached.ctx
        s = self.settings
        token = None
        if not s.get("egress_check_url"):  # our own judge: sign the checks
            link = self.link
            if self.secret is None and link is not None:
                self.secret = await link.secret("judge")
            if self.secret is not None:
                token = check_token(self.secret, time.time())
        url = default_judge_url(s, token)
        timeout = float(s.get("egress_check_timeout", 10))
        if url and now - self.own_at >= _OWN_SECONDS and self.learning is None:
            self.learning = asyncio.get_running_loop().create_task(self._learn_own(url, timeout))
        ctx = CheckContext(url, timeout, self.own)
        self.cached = _Ctx(ctx, now)
        return ctx

    async def _learn_own(self, url: str, timeout: float) -> None:
        """The gateway's own address as the judge sees it, fetched directly."""
        try:
            out = await HttpAnonymity().check(
                parse_egress_url("direct://"), CheckContext(url, timeout)
            )
            if out.exit_ip:
                if out.exit_ip not in self.own:
                    log.info("datorus: the judge sees this gateway as %s", out.exit_ip)
                self.own = frozenset({out.exit_ip})
                self.cached = None
                self.own_at = time.monotonic()
            else:
                shown = url.split("?", 1)[0]  # never the check token
                log.warning("datorus: the judge at %s is not answering: %s", shown, out.detail)
                self.own_at = time.monotonic() - _OWN_SECONDS + _OWN_RETRY
        finally:
            self.learning = None

    # -- writing -----------------------------------------------------------------------

    def _flush_soon(self) -> None:
        if not self.pending or (self.flushing is not None and not self.flushing.done()):
            return
        link = self.link
        if link is None:
            return
        batch, self.pending = self.pending[:_BATCH], self.pending[_BATCH:]
        self.flushing = asyncio.get_running_loop().create_task(self._flush(link, batch))

    @staticmethod
    async def _flush(link: LedgerLink, batch: list[CheckWrite]) -> None:
        try:
            await link.store_checks(batch)
        except Exception as x:  # results are not money: the next checks write again
            log.warning("datorus: %d egress check results not written: %s", len(batch), x)

    async def stop(self) -> None:
        """Cancel the checks under way; write what is pending (a few seconds at most)."""
        for task in list(self.tasks) + [t for t in (self.learning,) if t is not None]:
            task.cancel()
        with contextlib.suppress(Exception):
            if self.flushing is not None:
                await asyncio.wait_for(self.flushing, 2)
            link = self.link
            if self.pending and link is not None:
                await asyncio.wait_for(link.store_checks(self.pending[:_BATCH]), 2)
