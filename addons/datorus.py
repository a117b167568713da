"""Datorus: the addon suite that ``mitmdump -s addons/datorus.py`` loads.

Order matters: for each hook mitmproxy calls these in list order, and each one
skips a flow another has already answered. Auth first, then limits, acceptable
use, metering (admission and counting), then relaying.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addons.api_server import ApiServer  # noqa: E402
from addons.auth import ProxyAuth  # noqa: E402
from addons.context import Gateway  # noqa: E402
from addons.egress import EgressRouter, RouteOptions  # noqa: E402
from addons.errors import ErrorPages  # noqa: E402
from addons.hardening import Hardening  # noqa: E402
from addons.lean import Lean  # noqa: E402
from addons.limits import RateLimits  # noqa: E402
from addons.metering import Metering  # noqa: E402
from addons.options import LedgerTask, Options  # noqa: E402
from addons.policy import AcceptableUse  # noqa: E402
from addons.relay import Relay  # noqa: E402

gateway = Gateway()
_ledger = LedgerTask(gateway)
_policy = AcceptableUse(gateway)
_metering = Metering(gateway)
_ledger.on_snapshot += [_policy.rebuild, _metering.on_snapshot]
_ledger.on_stop.append(_metering.settle_open_flows)
_ledger.open_flows.append(_metering.open_count)

addons = [
    Options(gateway),
    _ledger,
    ErrorPages(gateway),
    Hardening(gateway),
    RouteOptions(),  # before auth: it reads options from the username (issue 5)
    ProxyAuth(gateway),
    RateLimits(gateway),
    _policy,
    _metering,
    Relay(gateway),
    ApiServer(gateway),
]

# -- the egress pool (issue 5): last, once the account is known and the request vetted
_egress = EgressRouter(gateway)
_ledger.on_snapshot.append(_egress.on_snapshot)
addons.append(_egress)

# last: it only acts once, when the gateway runs, and must see every addon above
addons.append(Lean(gateway))
