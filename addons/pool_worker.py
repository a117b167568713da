"""Start the pool worker (egress checks, scheduled scrapes) beside the gateway.

The work itself is ``datorus_core.pool_worker``, a process of its own, so checking and
scraping never take the event loop that relays requests. This addon starts it once the
ledger is open, gives it the gateway's settings as one JSON line on its standard input
(never on its command line: the ledger URL may hold a password) and keeps that pipe
open: when the gateway goes, however it goes, the worker sees the pipe close and stops.
A worker that exits by itself is started again after a back-off (1 s, doubling to a
minute). Under ``datorus serve`` only worker 0 starts one (a replacement worker 0
starts its own); the ledger's ``pool`` claim lets one worker per ledger check, whatever
the number of gateways.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time

from datorus_core.workers import worker_info

from .context import Gateway

log = logging.getLogger("datorus")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BACKOFF_MAX = 60.0
_STOP_SECONDS = 5.0  # how long the worker may take to write its checks and go


class PoolWorkerProcess:
    """Keep one ``datorus_core.pool_worker`` process running beside this gateway."""

    name = "datorus_pool_worker"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.task: asyncio.Task | None = None
        self.proc: asyncio.subprocess.Process | None = None

    def running(self) -> None:
        if worker_info().index != 0:
            return  # worker 0 of `datorus serve` starts it for the box
        self.task = asyncio.get_running_loop().create_task(self._keep(), name="datorus pool")

    async def _start(self) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "datorus_core.pool_worker",
            stdin=asyncio.subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(self.gw.settings, default=list).encode() + b"\n")
        await proc.stdin.drain()
        return proc

    async def _keep(self) -> None:
        await self.gw.ready.wait()  # the ledger is open and migrated
        backoff = 1.0
        while True:
            started = time.monotonic()
            try:
                self.proc = await self._start()
                code = await self.proc.wait()
            except OSError as e:
                code = None
                log.warning("datorus: the pool worker could not be started: %s", e)
            if time.monotonic() - started > _BACKOFF_MAX:
                backoff = 1.0  # it ran a while: this is no crash loop
            log.warning(
                "datorus: the pool worker exited (%s); starting it again in %g s", code, backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def done(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            proc.stdin.close()  # the worker writes what it holds and gives its claim back
        try:
            await asyncio.wait_for(proc.wait(), _STOP_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 2)
