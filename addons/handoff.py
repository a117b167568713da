"""A ``datorus serve`` worker's side of its lifecycle: saying it is ready, handing off.

Inert in a gateway started by hand (no ``DATORUS_WORKER_INDEX``).

- **Ready.** Once mitmproxy listens and the ledger's first snapshot is loaded
  (``Gateway.ready``), the worker writes ``ready`` to the pipe ``DATORUS_READY_FD``
  names. The launcher waits for that line before it hands the old worker of the
  slot off (SIGHUP) or counts the worker as started.
- **Hand-off (SIGUSR1)**, sent by the launcher once the worker's replacement is ready:
  the worker closes its listening sockets at once (the kernel gives new connections
  to the other workers), keeps serving what arrives on the connections it has, every
  answer with ``Connection: close`` so clients reconnect elsewhere
  (``addons/relay.py``, ``Gateway.error_response``), and exits as soon as its client
  connections are gone, at the latest after ``drain_seconds``; the exit is the clean
  stop of ``LedgerTask.done``, which flushes the usage batch. Nothing is refused:
  unlike SIGTERM's drain, no request gets ``503``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

from mitmproxy import ctx

from datorus_core.workers import READY_FD_ENV, worker_info

from . import patches
from .context import Gateway
from .failclosed import fatal

log = logging.getLogger("datorus")

HANDOFF_SIGNAL = signal.SIGUSR1


class WorkerLifecycle:
    """Announce readiness to ``datorus serve`` and hand off on SIGUSR1."""

    name = "datorus_worker"

    def __init__(self, gw: Gateway, open_flows: list[Any]) -> None:
        self.gw = gw
        self.open_flows = open_flows  # callbacks() -> flows under way (LedgerTask's)
        self.tasks: set[asyncio.Task] = set()

    def running(self) -> None:
        info = worker_info()
        if not info.launched:
            return
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(HANDOFF_SIGNAL, self._spawn, self.hand_off)
        self._spawn(self.announce)

    def _spawn(self, job: Any) -> None:
        task = asyncio.get_running_loop().create_task(job())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def announce(self) -> None:
        """Write ``ready`` to the launcher's pipe once listening and loaded."""
        await self.gw.ready.wait()
        if self.gw.runtime.draining:
            return  # stopped before it was ready: nothing to announce
        if not patches.listening_addresses():
            fatal("the proxy is not listening (see the errors above)")
            return
        fd = os.environ.get(READY_FD_ENV)
        if fd:
            with contextlib.suppress(OSError):
                os.write(int(fd), b"ready\n")
                os.close(int(fd))
        info = worker_info()
        log.info("datorus: worker %d of %d ready (pid %d)", info.index, info.count, os.getpid())

    async def hand_off(self) -> None:
        """Stop accepting, serve the connections already open, exit when they are done."""
        gw = self.gw
        if gw.handing_off or gw.runtime.draining:
            return
        gw.handing_off = True
        started = time.monotonic()
        gw.drain_deadline = started + gw.settings.get("drain_seconds", 5)
        await gw.stop_listening()
        api = ctx.master.addons.get("datorus_api")
        if api is not None and getattr(api, "server", None) is not None:
            api.server.should_exit = True  # uvicorn: close the socket, finish what is open
        open_now = patches.open_client_connections()
        log.info("datorus: handing off: %d client connections open", open_now)
        while time.monotonic() < gw.drain_deadline and (
            patches.open_client_connections() or any(n() for n in self.open_flows)
        ):
            await asyncio.sleep(0.05)
        log.info(
            "datorus: handed off in %.2f s; stopping (%d client connections, %d flows open)",
            time.monotonic() - started,
            patches.open_client_connections(),
            sum(n() for n in self.open_flows),
        )
        ctx.master.shutdown()
