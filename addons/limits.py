"""Rate limits per credential (GCRA) and the cap on open tunnels per account.

A CONNECT counts as one request. Open tunnels are CONNECT tunnels and upgraded
(WebSocket) connections alike. Every authenticated answer carries
``X-Datorus-RateLimit-Limit`` (requests per second), ``-Remaining`` (requests left
in the burst) and ``-Reset`` (Unix time when the burst is full again).
"""

from __future__ import annotations

import math
import time
from typing import Any

from mitmproxy import http

from datorus_core.envelope import DatorusError
from datorus_core.hotstate.base import Take
from datorus_core.hotstate.local import LocalHotState
from datorus_core.runtime import CredentialState

from .context import ROUTE, FlowCtx, Gateway, flow_ctx


def rate_headers(cred: CredentialState, v: Any) -> tuple[tuple[str, str], ...]:
    """The three rate-limit headers for *cred* after the limiter's verdict *v*."""
    return (
        ("X-Datorus-RateLimit-Limit", str(cred.account.rps)),
        ("X-Datorus-RateLimit-Remaining", str(v.remaining)),
        ("X-Datorus-RateLimit-Reset", str(math.ceil(time.time() + v.reset_after))),
    )


class RateLimits:
    """Apply the per-credential request rate and the per-account tunnel cap.

    Both are counted by the gateway's hot state (``gw.hot``), in one step: a tunnel
    takes its slot only when the rate lets it through. In one process that step
    never suspends; shared between workers it is one round trip.
    """

    name = "datorus_limits"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def requestheaders(self, flow: http.HTTPFlow):
        # an upgrade (WebSocket) becomes a tunnel once answered: it counts against the cap
        return self._take(flow, tunnel="upgrade" in flow.request.headers)

    def http_connect(self, flow: http.HTTPFlow):
        return self._take(flow, tunnel=True)

    def _take(self, flow: http.HTTPFlow, tunnel: bool):
        fc = flow_ctx(flow)
        if flow.response is not None or fc is None or fc.cred is None:
            return None
        key = fc.client_id if tunnel else None
        hot = self.gw.hot
        if isinstance(hot, LocalHotState):
            self._judge(flow, fc, hot.take_now(fc.cred, key, time.monotonic()))
            return None
        return self._take_shared(flow, fc, key)

    async def _take_shared(self, flow: http.HTTPFlow, fc: FlowCtx, key: str | None) -> None:
        """The shared state's take, which also reads the request's sticky session in the
        same round trip: routing (``addons/egress.py``) uses it if nothing waited between."""
        assert fc.cred is not None
        route = flow.metadata.get(ROUTE)
        sid = None if route is None else route.session_id
        t = await self.gw.hot.take(fc.cred, key, time.monotonic(), sid)
        if t.session_read and sid is not None:
            fc.session_pin = (sid, t.session, time.monotonic())
        self._judge(flow, fc, t)

    def _judge(self, flow: http.HTTPFlow, fc: FlowCtx, t: Take) -> None:
        """Answer 429 if the hot state's count says so; else note the slot taken."""
        cred = fc.cred
        assert cred is not None
        v = t.verdict
        fc.rl_headers = rate_headers(cred, v)
        if not v.allowed:
            retry = v.retry_after_seconds
            self.gw.reject(
                flow,
                fc,
                DatorusError(
                    "RATE_LIMITED",
                    details={
                        "limit": "requests_per_second",
                        "rps": cred.account.rps,
                        "burst": cred.account.burst,
                        "retryAfterSeconds": retry,
                    },
                    headers={"Retry-After": str(retry)},
                ),
            )
            return
        if t.open_tunnels is None:
            return
        if not t.tunnel:
            acc = cred.account
            self.gw.reject(
                flow,
                fc,
                DatorusError(
                    "RATE_LIMITED",
                    message="Too many open tunnels for this account.",
                    details={
                        "limit": "open_tunnels",
                        "maxTunnels": acc.max_tunnels,
                        "openTunnels": t.open_tunnels,
                    },
                    headers={"Retry-After": "1"},
                ),
            )
            return
        fc.tunnel_slot = True
