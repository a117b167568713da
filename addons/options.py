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
import time
from collections.abc import Sequence

from mitmproxy import ctx

from datorus_core.ledger.gateway import LedgerLink
from datorus_core.ledger.target import shown
from datorus_core.runtime import MAX_NOTICES
from datorus_core.settings import (
    BY_OPTION,
    SETTINGS,
    SettingsError,
    coerce,
    resolve_defaults,
    validate,
)

from . import patches
from .context import Gateway
from .failclosed import fatal

log = logging.getLogger("datorus")

WAITING_SECONDS = 5.0  # how often the events waiting for delivery are counted (metrics)


class Options:
    """Declare and validate the ``datorus_*`` options."""

    name = "datorus_options"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def load(self, loader) -> None:
        try:
            defaults = resolve_defaults()
            check_command_line(patches.deferred_options())
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
        # a --set datorus_* that no option took (mitmproxy would ignore it silently)
        unknown = [k for k in patches.deferred_options() or {} if k.startswith("datorus_")]
        if unknown:
            fatal(f"unknown setting(s): {', '.join(sorted(unknown))}")


def check_command_line(deferred: dict | None) -> None:
    """Vet the ``--set datorus_*`` values mitmproxy holds until our options exist.

    mitmproxy parses them only after ``load`` registered the options, and a value it
    cannot parse (``datorus_rps=abc``) or one given twice then raises inside its
    script loader, which logs it and goes on without the addon: an open proxy. So
    each one is parsed here first, with a message naming the setting, and replaced by
    its typed value. Raises SettingsError.
    """
    if deferred is None:
        raise SettingsError("cannot read the --set values (mitmproxy internals changed)")
    for name in [k for k in deferred if k.startswith("datorus_")]:
        s = BY_OPTION.get(name)
        if s is None:
            raise SettingsError(
                f"unknown setting {name} (list them with 'datorus settings' or the README)"
            )
        raw = deferred[name]
        values = getattr(raw, "val", raw)
        if not isinstance(values, list):
            continue  # already a typed value
        if s.type in (str, int, bool):
            if len(values) > 1:
                raise SettingsError(
                    f"{name}: given {len(values)} times ({', '.join(map(repr, values))});"
                    " give it once"
                )
            if not values:
                if s.type is not bool:
                    raise SettingsError(f"{name}: needs a value ({name}=VALUE)")
                deferred[name] = True
                continue
            deferred[name] = coerce(s, values[0])
        else:
            deferred[name] = coerce(s, list(values))


class LedgerTask:
    """Keep the runtime in step with the ledger, and the ledger with the runtime."""

    name = "datorus_ledger"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.task: asyncio.Task | None = None
        self.on_snapshot: list = []  # callbacks(runtime) after each reload
        self.on_stop: list = []  # callbacks() before the final flush at a clean stop
        self.open_flows: list = []  # callbacks() -> how many flows are still under way
        self.stopping = False
        self.read_trouble = Trouble("ledger refresh")
        self.write_trouble = Trouble("usage write")

    def running(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="datorus ledger")

    async def done(self) -> None:
        # drain: mitmproxy keeps serving while its addons finish, so refuse new requests
        # (503, Retry-After) and give those under way drain_seconds to end, while the
        # loop goes on writing their usage
        self.gw.runtime.draining = True
        # behind a balancer: the port stays open (new requests 503) until its health
        # check has taken this node out, else what it sends meanwhile is reset at the close
        linger = 0 if self.gw.handing_off else self.gw.settings.get("drain_listen_seconds", 0)
        listen_until = time.monotonic() + linger
        if self.gw.drain_deadline is None:  # else a hand-off's drain is under way already
            self.gw.drain_deadline = time.monotonic() + self.gw.settings.get("drain_seconds", 5)
        deadline = self.gw.drain_deadline
        while (
            any(n() for n in self.open_flows) and time.monotonic() < deadline
        ) or time.monotonic() < listen_until:
            await asyncio.sleep(0.05)
        await self.gw.stop_listening()
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
        with contextlib.suppress(Exception):
            await self._write_notices()
        # after the final flush, before the ledger closes: a shared hot state gives back
        # the credit this worker holds and removes its fields (and ledger rows)
        with contextlib.suppress(Exception):
            await self.gw.hot.stop()
        if self.gw.ledger is not None:
            await self.gw.ledger.close()

    async def _open(self) -> None:
        """Open the ledger and load the first snapshot, retrying a busy ledger for
        ``startup_wait`` seconds; a ledger that cannot be opened stops the gateway
        (requests wait for it meanwhile: see ``ProxyAuth``)."""
        path = self.gw.settings["db"]
        where = shown(path)  # a URL's password is never logged
        deadline = time.monotonic() + self.gw.settings["startup_wait"]
        while not self.stopping:
            link = LedgerLink(path)
            try:
                await link.open()
                await self._reload(link, force=True)
            except Exception as e:
                with contextlib.suppress(Exception):
                    await link.close()
                if not transient(e) or time.monotonic() >= deadline:
                    fatal(f"datorus_db: cannot open the ledger {where}: {_reason(e)}")
                    return
                log.warning("datorus: ledger %s busy at start (%s); retrying", where, e)
                await asyncio.sleep(0.2)
                continue
            link.pool_low = self.gw.settings.get("event_pool_low", 0)
            self.gw.ledger = link
            self.gw.hot.ledger = link
            self.gw.ready.set()
            log.info("datorus: ledger %s open (%d accounts)", where, len(self.gw.runtime.accounts))
            return

    async def _reload(self, link: LedgerLink, force: bool = False) -> None:
        rt, hot = self.gw.runtime, self.gw.hot
        wanted = hot.snapshot_wanted or hot.refresh_wanted
        if force or wanted or await link.version() != rt.version:
            # everything is read before anything is applied, and applied with no await in
            # between: a request decided meanwhile must never see a half-applied view (a
            # first snapshot marks the runtime loaded; until fresh_at is stamped too, its
            # age counts from 0 and ledger_error answers 503 ledger_stale)
            if hot.shared:
                # the credit shared between workers needs the bytes each one flushed,
                # read with the balances, and what Redis held just before
                hot.refresh_wanted = False
                token = await hot.before_snapshot()
                accounts, creds, rules, version, flushed = await link.snapshot_shared()
                allowed = await link.allowed_ips()
                await hot.seen_version(version)  # before any request is decided on it
                rt.apply_snapshot(accounts, creds, rules, version, worker_usage=flushed)
                hot.adopt(rt, token)
            else:
                accounts, creds, rules, version = await link.snapshot()
                allowed = await link.allowed_ips()
                rt.apply_snapshot(accounts, creds, rules, version)
            rt.apply_allowed_ips(allowed)
            for cb in self.on_snapshot:
                cb(rt)
        rt.fresh_at = time.monotonic()

    async def _flush(self, final: bool = False) -> None:
        """Write the batch whose last write failed, if any, then the batch under way.

        A failed batch is kept whole, with its id, and written again before anything
        else: if its commit went through with only the answer lost, the ledger knows
        the id and skips it, so it is billed once."""
        link, rt = self.gw.ledger, self.gw.runtime
        if link is None:
            return
        while rt.unwritten is not None or rt.batch.events:
            again = rt.unwritten is not None
            batch = rt.take_batch()
            try:
                await link.write(batch)
            except Exception as e:
                self.gw.metrics.flush_failed()
                rt.restore_batch(batch)
                self.write_trouble.failed(f"{e}; {rt.pending_events} usage events kept in memory")
                if final:
                    log.error(
                        "datorus: %d usage events could not be written at stop",
                        rt.pending_events,
                    )
                return
            self.write_trouble.ok()
            self.gw.metrics.flushed(batch.events, time.monotonic() - batch.started)
            if not again:
                return  # the batch under way: what came meanwhile waits for its turn

    async def _loop(self) -> None:
        s = self.gw.settings
        rt = self.gw.runtime
        await self._open()
        tick = min(s["flush_ms"], s["refresh_ms"], 100) / 1000
        next_refresh = 0.0
        next_prune = 0.0  # housekeeping runs at start, then hourly
        next_count = 0.0  # events waiting for delivery, for the metrics (every 5 s)
        while not self.stopping:
            await asyncio.sleep(tick)
            now = time.monotonic()
            b = rt.batch
            if rt.unwritten is not None or (
                b.events
                and (b.events >= s["flush_events"] or now - b.started >= s["flush_ms"] / 1000)
            ):
                await self._flush()
            hot = self.gw.hot
            if now >= next_refresh or hot.snapshot_wanted or hot.refresh_wanted:
                next_refresh = now + s["refresh_ms"] / 1000
                try:
                    await self._reload(self.gw.ledger)
                except Exception as e:
                    self.read_trouble.failed(
                        f"{e}; serving from memory for up to {s['ledger_grace']} s"
                    )
                else:
                    self.read_trouble.ok()
            if rt.notices:
                await self._write_notices()
            if now >= next_count and self.gw.settings.get("metrics_port"):
                next_count = now + WAITING_SECONDS
                try:
                    self.gw.waiting_events = await self.gw.ledger.waiting_events()
                except Exception as e:  # the gauge goes stale; the next tick tries again
                    log.debug("datorus: events waiting not counted: %s", e)
            if now >= next_prune:
                next_prune = now + 3600
                with contextlib.suppress(Exception):
                    await self.gw.ledger.prune_receipts(s["receipt_days"])

    async def _write_notices(self) -> None:
        """Write the events the proxy path noticed; kept for the next tick on failure."""
        rt, link = self.gw.runtime, self.gw.ledger
        if link is None:
            return
        link.pool_low = self.gw.settings.get("event_pool_low", 0)
        notices, rt.notices = rt.notices, []
        try:
            await link.write_events(notices)
        except Exception as e:
            rt.notices[:0] = notices[: max(0, MAX_NOTICES - len(rt.notices))]
            self.write_trouble.failed(f"{e}; {len(notices)} events kept in memory")


# PostgreSQL's codes for what passes by itself: a serialization failure, a deadlock
# (one side is rolled back), a server starting up or shutting down, a lock not had
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P03", "55P03"})


def transient(e: BaseException) -> bool:
    """Whether a ledger error may pass by itself (locked, busy, a server starting up)
    rather than stay."""
    if getattr(e, "sqlstate", None) in _TRANSIENT_SQLSTATES:
        return True
    text = str(e).lower()
    return any(w in text for w in ("locked", "busy", "locking protocol", "the database system is"))


def _reason(e: BaseException) -> str:
    """Why the ledger could not be opened, with what to do for a database that is not
    there (the PostgreSQL database must exist: ``datorus init`` makes only the tables)."""
    text = str(e)
    if "does not exist" in text and "database" in text:
        return f"{text} (create the database first, e.g. with createdb; then 'datorus init')"
    return text


class Trouble:
    """One kind of ledger failure, logged once when it starts and once when it ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.since = 0.0

    def failed(self, detail: str) -> None:
        """Count a failure; log only the first of an episode."""
        if self.count == 0:
            self.since = time.monotonic()
            log.warning("datorus: %s failed: %s", self.what, detail)
        self.count += 1

    def ok(self) -> None:
        """A success: log the end of an episode, if one was going on."""
        if self.count:
            log.warning(
                "datorus: %s recovered after %d failures in %.1f s",
                self.what,
                self.count,
                time.monotonic() - self.since,
            )
            self.count = 0
