"""Datorus settings as mitmproxy options, and the ledger's background task.

``Options`` declares every ``datorus_*`` option with the value from ``mitm.conf``
or ``DATORUS_*`` as its default, so ``--set`` wins over both. A bad value, or an
unknown ``--set datorus_*`` name (mitmproxy would silently ignore it), stops the
gateway at start-up with a clear message: a proxy must never run half-configured.

``LedgerTask`` owns the ledger connection: it loads the snapshot at start, polls
for operator changes every ``refresh_ms``, writes usage batches every ``flush_ms``
(or sooner when ``flush_events`` pile up) and flushes everything on a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence

from mitmproxy import ctx

from datorus_core.ledger_sync import LedgerLink
from datorus_core.settings import BY_OPTION, SETTINGS, SettingsError, resolve_defaults, validate

from .context import Gateway

log = logging.getLogger("datorus")


def fatal(message: str) -> None:
    """Stop start-up: say why on stderr and in the log, then exit non-zero."""
    log.error("datorus: %s", message)
    print(f"datorus: fatal: {message}", file=sys.stderr, flush=True)
    os._exit(2)


class Options:
    """Declare and validate the ``datorus_*`` options."""

    name = "datorus_options"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def load(self, loader) -> None:
        try:
            defaults = resolve_defaults()
        except SettingsError as e:
            fatal(str(e))
            return
        for s in SETTINGS:
            typ = (
                Sequence[str]
                if s.type is not str and s.type is not int and s.type is not bool
                else s.type
            )
            loader.add_option(s.option, typ, defaults[s.name], s.help)

    def configure(self, updated: set[str]) -> None:
        for name in updated:
            s = BY_OPTION.get(name)
            if s is None:
                continue
            value = getattr(ctx.options, name)
            try:
                validate(s, value)
            except SettingsError as e:
                fatal(str(e))
            self.gw.settings[s.name] = list(value) if isinstance(value, list | tuple) else value

    def running(self) -> None:
        unknown = [k for k in getattr(ctx.options, "_deferred", {}) if k.startswith("datorus_")]
        if unknown:
            fatal(f"unknown setting(s): {', '.join(sorted(unknown))}")


class LedgerTask:
    """Keep the runtime in step with the ledger, and the ledger with the runtime."""

    name = "datorus_ledger"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.task: asyncio.Task | None = None
        self.failures = 0
        self.last_prune = 0.0
        self.on_snapshot: list = []  # callbacks(runtime) after each reload
        self.on_stop: list = []  # callbacks() before the final flush at a clean stop
        self.open_flows: list = []  # callbacks() -> how many flows are still under way
        self.stopping = False

    def running(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="datorus ledger")

    async def done(self) -> None:
        # drain: mitmproxy keeps serving while its addons finish, so refuse new requests
        # (503, Retry-After) and give those under way drain_seconds to end, while the
        # loop goes on writing their usage
        self.gw.runtime.draining = True
        deadline = time.monotonic() + self.gw.settings.get("drain_seconds", 5)
        while any(n() for n in self.open_flows) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # let the loop finish what it is doing (a write cancelled mid-transaction would
        # lose its batch) and stop at its next tick; cancel only if it hangs
        self.stopping = True
        if self.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.task), timeout=10)
            except (TimeoutError, Exception):
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.task
        for cb in self.on_stop:
            cb()
        await self._flush(final=True)
        if self.gw.ledger is not None:
            await self.gw.ledger.close()

    async def _open(self) -> bool:
        path = self.gw.settings["db"]
        link = LedgerLink(path)
        try:
            await link.open()
            await self._reload(link, force=True)
        except Exception as e:
            with contextlib.suppress(Exception):
                await link.close()
            self.gw.runtime.ledger_ok = False
            log.warning("datorus: ledger %s unavailable: %s", path, e)
            return False
        self.gw.ledger = link
        self.gw.runtime.ledger_ok = True
        log.info("datorus: ledger %s open (%d accounts)", path, len(self.gw.runtime.accounts))
        return True

    async def _reload(self, link: LedgerLink, force: bool = False) -> None:
        rt = self.gw.runtime
        if not force and await link.version() == rt.version:
            return
        accounts, creds, rules, version = await link.snapshot()
        rt.apply_snapshot(accounts, creds, rules, version)
        for cb in self.on_snapshot:
            cb(rt)

    async def _flush(self, final: bool = False) -> None:
        link, rt = self.gw.ledger, self.gw.runtime
        if link is None or not rt.batch.events:
            return
        batch = rt.take_batch()
        try:
            await link.write(batch)
        except Exception as e:
            rt.restore_batch(batch)
            self.failures += 1
            rt.ledger_ok = rt.batch.events < 50 * self.gw.settings["flush_events"]
            log.warning("datorus: usage write failed (%s); %d events kept", e, rt.batch.events)
            if final:
                log.error("datorus: %d usage events could not be written at stop", rt.batch.events)
        else:
            self.failures = 0
            rt.ledger_ok = True

    async def _loop(self) -> None:
        s = self.gw.settings
        rt = self.gw.runtime
        while self.gw.ledger is None and not self.stopping:
            if await self._open():
                break
            await asyncio.sleep(1.0)
        tick = min(s["flush_ms"], s["refresh_ms"], 100) / 1000
        next_refresh = 0.0
        while not self.stopping:
            await asyncio.sleep(tick)
            now = time.monotonic()
            b = rt.batch
            if b.events and (
                b.events >= s["flush_events"] or now - b.started >= s["flush_ms"] / 1000
            ):
                await self._flush()
            if now >= next_refresh:
                next_refresh = now + s["refresh_ms"] / 1000
                try:
                    await self._reload(self.gw.ledger)
                    if self.failures == 0:
                        rt.ledger_ok = True
                except Exception as e:
                    rt.ledger_ok = False
                    log.warning("datorus: ledger refresh failed: %s", e)
            if now - self.last_prune > 3600:
                self.last_prune = now
                with contextlib.suppress(Exception):
                    await self.gw.ledger.prune_receipts(s["receipt_days"])
