"""The shipped ``tcp_connect`` checker (stage 1): can the egress be reached at all?

An upstream proxy: a TCP connection to it opens within the timeout (its latency is
the connect time). A source address or prefix: the box can bind it. The box's
default route always passes (what it reaches is the judge's to say, in stage 2).
"""

from __future__ import annotations

import asyncio
import socket
import time

from ..egress import EgressSpec, source_for
from .base import CheckContext, CheckOutcome


class TcpConnect:
    """Stage 1: a TCP connect to the upstream proxy, or a bind of the source address."""

    name = "tcp_connect"
    stage = 1
    priority = 0

    async def check(self, egress: EgressSpec, ctx: CheckContext) -> CheckOutcome:
        """Connect to the proxy (or bind the source address) once."""
        if not egress.is_proxy:
            return _bind(egress)
        start = time.monotonic()
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(egress.host, egress.port), ctx.timeout
            )
        except TimeoutError:
            return CheckOutcome(False, f"no connection within {ctx.timeout:g} s")
        except OSError as e:
            return CheckOutcome(False, f"connect failed: {e.strerror or e}")
        latency = (time.monotonic() - start) * 1000
        writer.close()
        return CheckOutcome(True, "TCP connect OK", latency_ms=round(latency, 1))


def _bind(egress: EgressSpec) -> CheckOutcome:
    src = source_for(egress, None)
    if src is None:
        return CheckOutcome(True, "default route")
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((src, 0))
    except OSError as e:
        return CheckOutcome(False, f"cannot bind {src}: {e.strerror or e}")
    return CheckOutcome(True, f"bind {src} OK")
