"""Event delivery beside the gateway (issue 18): a process of its own, supervised here.

Once the ledger is open, :class:`EventDelivery` starts ``python -m
datorus_core.delivery`` (see that module for what it does), hands it the gateway's
settings and listening sockets on stdin, restarts it a second after it dies, and stops
it (SIGTERM, then SIGKILL after 5 s) when the gateway stops. Deliveries never share the
proxy's interpreter or event loop; the process leaves by itself when the gateway is
killed. Under ``datorus serve`` only worker 0 starts one, as with the pool worker: one
delivery process per box, and the ledger's per-subscription claims keep several boxes
from delivering the same event twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys

from datorus_core.workers import worker_info

from .context import Gateway
from .failclosed import fatal
from .policy import own_sockets

log = logging.getLogger("datorus")

RESTART_SECONDS = 1.0


class EventDelivery:
    """Run the event delivery process while the gateway runs."""

    name = "datorus_events"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.task: asyncio.Task | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False

    def running(self) -> None:
        if worker_info().index != 0:
            return  # worker 0 of `datorus serve` runs it for the box (claims keep boxes apart)
        self.task = asyncio.get_running_loop().create_task(self._supervise(), name="datorus events")

    async def _supervise(self) -> None:
        await self.gw.ready.wait()
        given = json.dumps(
            {"settings": self.gw.settings, "own": own_sockets(self.gw.settings)}, default=str
        ).encode()
        while not self.stopping:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "datorus_core.delivery", stdin=asyncio.subprocess.PIPE
                )
            except OSError as e:
                fatal(f"cannot start the event delivery process: {e}")
                return
            assert self.proc.stdin is not None
            self.proc.stdin.write(given)
            self.proc.stdin.close()
            rc = await self.proc.wait()
            if self.stopping:
                return
            log.warning("datorus: event delivery process exited (%s); restarting it", rc)
            await asyncio.sleep(RESTART_SECONDS)

    async def done(self) -> None:
        self.stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
