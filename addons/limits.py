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
from datorus_core.runtime import CredentialState

from .context import Gateway, flow_ctx


def rate_headers(cred: CredentialState, v: Any) -> tuple[tuple[str, str], ...]:
    """The three rate-limit headers for *cred* after the limiter's verdict *v*."""
    return (
        ("X-Datorus-RateLimit-Limit", str(cred.account.rps)),
        ("X-Datorus-RateLimit-Remaining", str(v.remaining)),
        ("X-Datorus-RateLimit-Reset", str(math.ceil(time.time() + v.reset_after))),
    )


class RateLimits:
    """Apply the per-credential request rate and the per-account tunnel cap."""

    name = "datorus_limits"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # an upgrade (WebSocket) becomes a tunnel once answered: it counts against the cap
        self._take(flow, tunnel="upgrade" in flow.request.headers)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._take(flow, tunnel=True)

    def _take(self, flow: http.HTTPFlow, tunnel: bool) -> None:
        fc = flow_ctx(flow)
        if flow.response is not None or fc is None or fc.cred is None:
            return
        cred = fc.cred
        # every credential in the runtime view gets its limiter when the snapshot loads it
        assert cred.limiter is not None
        v = cred.limiter.take(time.monotonic())
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
        if tunnel:
            acc = cred.account
            if len(acc.tunnels) >= acc.max_tunnels:
                self.gw.reject(
                    flow,
                    fc,
                    DatorusError(
                        "RATE_LIMITED",
                        message="Too many open tunnels for this account.",
                        details={
                            "limit": "open_tunnels",
                            "maxTunnels": acc.max_tunnels,
                            "openTunnels": len(acc.tunnels),
                        },
                        headers={"Retry-After": "1"},
                    ),
                )
