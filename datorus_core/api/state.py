"""What the API's routes share: :class:`ApiState` (on ``app.state.api``) and the version.

Routes reach it through ``deps.State``; ``app.create_app`` builds it. It lives apart
from ``app.py`` so that the routes import it without importing the application that
includes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from ..live import LiveRouting
from .store import Store
from .stripe_pay import Payments
from .throttle import ApiThrottle, rules_from

try:
    VERSION = metadata.version("datorus")
except metadata.PackageNotFoundError:  # running from a bare checkout
    VERSION = "0.0.0"


@dataclass
class ApiState:
    """What the routes share: the ledger, the settings, Stripe, and (in the gateway) its runtime."""

    store: Store
    settings: dict[str, Any]
    payments: Payments
    runtime: Any = None  # datorus_core.runtime.Runtime when served by the gateway
    # the gateway's live routing state (pool, blocks, leases, sessions), when it serves us
    router: LiveRouting | None = None
    # what /health says of the gateway's hot state (in process, or Redis and this worker)
    hot_status: Callable[[], dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    throttle: ApiThrottle = field(default_factory=lambda: ApiThrottle(rules_from({})))
