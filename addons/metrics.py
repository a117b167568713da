"""Prometheus metrics: count answers as they leave, read the state once a second, serve.

The counting is increments only (``datorus_core.metrics.Metrics``): an answer counted
in ``response`` / ``http_connected`` / ``http_connect_error`` (and, for the error pages
mitmproxy writes itself, in ``addons/errors.py``), bytes where metering settles them,
ledger batches where they are written. Nothing here does I/O on a request's path.

With ``metrics_port`` 0 the gateway holds :class:`NullMetrics` and serves nothing.
Alone, the gateway serves ``/metrics`` on a thread of its own; as a worker of
``datorus serve`` it serves nothing and writes its state snapshot beside its
prometheus_client files in the launcher's directory instead (see
``datorus_core/metrics.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from typing import Any

from mitmproxy import http

from datorus_core import egress as eg
from datorus_core import metrics as m
from datorus_core.workers import LAUNCHER_ENV

from .context import TUNNEL, FlowCtx, Gateway, flow_ctx
from .failclosed import fatal

log = logging.getLogger("datorus")

STATE_SECONDS = 1.0  # how often the state gauges are read
SLICE = 256  # egress read between two turns of the event loop


def answer_kind(status: int) -> str:
    """What the ``response`` hook's flow was: a WebSocket (101) or a forward request.

    CONNECT flows never reach ``response``; an upgrade refused is a forward answer.
    """
    return m.WEBSOCKET if status == 101 else m.FORWARD


class MetricsAddon:
    """Count answers, keep the state gauges fresh and serve ``/metrics``."""

    name = "datorus_metrics"

    def __init__(self, gw: Gateway, metering: Any) -> None:
        self.gw = gw
        self.metering = metering
        self.metrics: m.Metrics | None = None
        self.server: m.MetricsServer | None = None
        self.state: m.StateCollector | None = None
        self.directory: str | None = None  # a worker of `datorus serve`: where to write
        self.task: asyncio.Task | None = None

    def running(self) -> None:
        s = self.gw.settings
        port = s.get("metrics_port", 0)
        launched = bool(os.environ.get(LAUNCHER_ENV))
        if not port or (launched and not os.environ.get(m.MULTIPROC_ENV)):
            self.gw.metrics = m.NullMetrics()
            return
        metrics = m.Metrics()
        metrics.prime()
        if launched:
            # the launcher serves every worker's metrics from its directory
            self.directory = os.environ[m.MULTIPROC_ENV]
        else:
            self.state = m.StateCollector()
            metrics.registry.register(self.state)
            try:
                self.server = m.MetricsServer(s["metrics_host"], port, metrics.registry)
            except OSError as e:
                fatal(f"metrics cannot listen on {s['metrics_host']}:{port}: {e}")
                return
            log.info("datorus: metrics on http://%s:%d/metrics", s["metrics_host"], port)
        self.metrics = metrics
        self.gw.metrics = metrics
        if self.gw.hot.shared:
            from datorus_core.hotstate.redis_state import RedisHotState

            if isinstance(self.gw.hot, RedisHotState):
                self.gw.hot.rtt_observer = metrics.round_trip
        self.task = asyncio.get_running_loop().create_task(
            self._keep_state(), name="datorus metrics"
        )

    async def done(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            self.task = None
            if self.directory is not None:
                # the last word of a worker going (a reload, a stop): what it refused in
                # its last second outlives it too (datorus_core.metrics.forget_worker)
                with contextlib.suppress(Exception):
                    snap = await self.snapshot()
                    await asyncio.to_thread(m.write_state, self.directory, os.getpid(), snap)
        if self.server is not None:
            await asyncio.to_thread(self.server.close)
            self.server = None

    # -- answers -----------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is not None and not fc.answered and flow.response is not None:
            kind = answer_kind(flow.response.status_code)
            self.gw.metrics.first_byte(kind, time.time() - fc.started)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            return
        fc = flow_ctx(flow)
        kind = answer_kind(flow.response.status_code)
        metrics = self.gw.metrics
        if fc is None:
            metrics.answered(kind, flow.response.status_code)
        else:
            account = fc.account.id if fc.account is not None else None
            metrics.answered(kind, flow.response.status_code, fc.code, account)
        if fc is not None:
            metrics.took(kind, time.time() - fc.started)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        metrics = self.gw.metrics
        kind = tunnel_kind(fc)
        metrics.answered(kind, 200)
        if fc is not None:
            seconds = time.time() - fc.started
            metrics.took(kind, seconds)
            metrics.first_byte(kind, seconds)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        status = flow.response.status_code if flow.response is not None else 502
        if fc is None:
            self.gw.metrics.answered(m.TUNNEL, status)
        else:
            account = fc.account.id if fc.account is not None else None
            self.gw.metrics.answered(tunnel_kind(fc), status, fc.code, account)

    # -- state ---------------------------------------------------------------------------

    async def snapshot(self) -> m.StateSnapshot:
        """Read the state gauges off the gateway (on its loop, between two events).

        The egress walk yields to the loop every ``SLICE`` egress, so a pool of 10,000
        found proxies never holds a request up for the whole walk.
        """
        snap = m.StateSnapshot(at=m.now())
        gw = self.gw
        open_by_kind: Counter[str] = Counter({m.TUNNEL: 0, m.WEBSOCKET: 0, m.SOCKS5: 0})
        for fc in list(self.metering.current.values()):
            if fc.kind == TUNNEL and not fc.done:
                open_by_kind[tunnel_kind(fc) if fc.method == "CONNECT" else m.WEBSOCKET] += 1
        for kind, n in sorted(open_by_kind.items()):
            snap.set("datorus_open_tunnels", n, kind)
        router = gw.router
        if router is not None:
            mono = time.monotonic()
            states: Counter[str] = Counter(
                {"active": 0, "unchecked": 0, "dead": 0, "backoff": 0, "disabled": 0}
            )
            blocked: Counter[str] = Counter()
            for i, e in enumerate(list(router.pool.by_id.values()), 1):
                if i % SLICE == 0:
                    await asyncio.sleep(0)
                if not e.enabled:
                    states["disabled"] += 1
                elif e.status == "active" and mono < e.down_until:
                    states["backoff"] += 1
                else:
                    states[e.status] += 1
                for domain, h in list(e.domains.items()):
                    if h.state(mono) != eg.OK:
                        blocked[domain] += 1
            for state, n in sorted(states.items()):
                snap.set("datorus_egress", n, state)
            for domain, n in m.top_domains(blocked):
                snap.set("datorus_blocked_domains", n, domain)
        if self.metrics is not None:
            refused = self.metrics.accounts_refused_at(time.monotonic(), snap.at)
            for account, when in refused:
                snap.set("datorus_accounts_refused_for_money", when, str(account))
        rt = gw.runtime
        pending = rt.pending_events
        snap.set("datorus_ledger_events_pending", pending)
        oldest = [b.started for b in (rt.batch, rt.unwritten) if b is not None and b.events]
        snap.set(
            "datorus_ledger_pending_age_seconds",
            max(0.0, time.monotonic() - min(oldest)) if oldest else 0.0,
        )
        for queue, n in sorted(gw.waiting_events.items()):
            snap.set("datorus_events_waiting", n, queue)
        return snap

    async def _keep_state(self) -> None:
        pid = os.getpid()
        failing = False
        while True:
            try:
                snap = await self.snapshot()
                if self.state is not None:
                    self.state.snapshot = snap
                elif self.directory is not None:
                    await asyncio.to_thread(m.write_state, self.directory, pid, snap)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # metrics must never take the gateway down
                if not failing:  # once per episode, not once a second
                    log.warning("datorus: metrics state not read: %s", e)
                failing = True
            else:
                if failing:
                    log.warning("datorus: metrics state read again")
                failing = False
            await asyncio.sleep(STATE_SECONDS)


def tunnel_kind(fc: FlowCtx | None) -> str:
    """The metrics kind of a CONNECT: ``socks5`` when it came through the SOCKS5 entry."""
    return m.SOCKS5 if fc is not None and fc.socks else m.TUNNEL
