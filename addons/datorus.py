"""Datorus: the addon suite that ``mitmdump -s addons/datorus.py`` loads.

Order matters: for each hook mitmproxy calls these in list order, and each one
skips a flow another has already answered. Auth first, then limits, acceptable
use, metering (admission and counting), then relaying.

Nothing here may fail quietly: mitmproxy goes on relaying without a script that
raised while loading, so an import error or a failing ``load``/``configure``/
``running`` stops the process instead (``addons/failclosed.py``).
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _assemble() -> list:
    from addons.api_server import ApiServer
    from addons.auth import ProxyAuth
    from addons.context import Gateway
    from addons.egress import EgressRouter, RouteOptions
    from addons.errors import ErrorPages
    from addons.events import EventDelivery
    from addons.failclosed import StartCheck, guard
    from addons.handoff import WorkerLifecycle
    from addons.hardening import Hardening
    from addons.lean import Lean
    from addons.limits import RateLimits
    from addons.metering import Metering
    from addons.metrics import MetricsAddon
    from addons.options import LedgerTask, Options
    from addons.policy import AcceptableUse
    from addons.pool_worker import PoolWorkerProcess
    from addons.relay import Relay
    from addons.shared import SharedState
    from addons.socks import Socks5Entry

    gateway = Gateway()
    ledger = LedgerTask(gateway)
    policy = AcceptableUse(gateway)
    metering = Metering(gateway)
    egress = EgressRouter(gateway)  # the egress pool (issue 5)
    ledger.on_snapshot += [policy.rebuild, metering.on_snapshot, egress.on_snapshot]
    ledger.on_stop.append(metering.settle_open_flows)
    ledger.open_flows.append(metering.open_count)
    check = StartCheck()
    suite = [
        Options(gateway),
        SharedState(gateway, egress),  # the hot state: in process, or Redis (issue 15)
        ledger,
        ErrorPages(gateway),
        Hardening(gateway),
        RouteOptions(),  # before auth: it reads options from the username (issue 5)
        ProxyAuth(gateway),
        RateLimits(gateway),
        policy,
        metering,
        Relay(gateway),
        Socks5Entry(gateway),  # SOCKS5 requests judged as the CONNECTs they stand for
        ApiServer(gateway),
        egress,  # last of the traffic addons: the account is known and the request vetted
        PoolWorkerProcess(gateway),  # egress checks and scheduled scrapes, in a process
        EventDelivery(gateway),  # webhooks and notifiers from the outbox, a process (issue 18)
        # Prometheus (issue 20): after the traffic addons, so it counts the final answers
        MetricsAddon(gateway, metering),
        WorkerLifecycle(gateway, ledger.open_flows),  # ready/hand-off under `datorus serve`
        Lean(gateway),  # it acts once, when the gateway runs, and must see every addon above
        check,  # last: it sees load and configure only if every addon above got through
    ]
    check.expect_start()
    return guard(suite)


try:
    addons = _assemble()
except Exception as _e:  # an open proxy is worse than no proxy
    from addons.failclosed import fatal

    fatal(f"the Datorus addons could not be loaded: {type(_e).__name__}: {_e}")
