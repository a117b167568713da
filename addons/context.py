"""State the Datorus addons share: the runtime, per-flow context, error responses.

Nothing here is a hook; the addons in this folder translate mitmproxy events into
calls on this object and on ``datorus_core``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import http

from datorus_core.envelope import DatorusError, envelope_json, proxy_status
from datorus_core.hotstate.base import HotState
from datorus_core.hotstate.local import LocalHotState
from datorus_core.metrics import NullMetrics
from datorus_core.runtime import AccountState, CredentialState, Runtime

from . import patches

log = logging.getLogger("datorus")

FORWARD, TUNNEL = 1, 2


class FlowCtx:
    """What Datorus knows about one request or tunnel."""

    __slots__ = (
        "account",
        "client_id",
        "code",
        "cred",
        "cut",
        "done",
        "down",
        "egress",
        "head_sent",
        "host",
        "kind",
        "method",
        "port",
        "request_id",
        "reserved",
        "answered",
        "block",
        "pend_down",
        "pend_up",
        "rl_headers",
        "session_id",
        "session_pin",
        "settled_at",
        "socks",
        "started",
        "status",
        "timed_out",
        "timeout",
        "timer",
        "tunnel_slot",
        "trial_spent",
        "nanocents",
        "up",
        "upload_open",
    )

    def __init__(self, request_id: str, client_id: str, method: str, host: str, port: int) -> None:
        self.request_id = request_id
        self.client_id = client_id
        self.method = method
        self.host = host
        self.port = port
        self.cred: CredentialState | None = None
        self.account: AccountState | None = None
        self.kind = FORWARD
        self.up = 0
        self.down = 0
        self.reserved = 0
        self.block = 0  # tunnels: bytes reserved ahead and not yet used
        self.pend_up = 0  # tunnels: used bytes not yet settled
        self.pend_down = 0
        self.settled_at = 0.0
        self.trial_spent = 0
        self.nanocents = 0
        self.answered = False  # the gateway answered itself (an envelope): never billed
        self.done = False
        self.cut = ""
        self.code = ""  # the Datorus error code the gateway answered with, if it did
        self.head_sent = False  # the response head is on its way to the client
        self.timed_out = False
        self.timeout: int | None = None  # seconds the upstream timer ran (504's timeoutSeconds)
        # shared hot state: (session id, its egress or None, when) as the rate limit's
        # round trip read it, for routing to use instead of asking again
        self.session_pin: tuple[str, int | None, float] | None = None
        self.timer: Any = None
        self.rl_headers: tuple[tuple[str, str], ...] = ()
        self.session_id: str | None = None
        self.egress: Any = None
        self.started = time.time()
        self.status = 0
        self.upload_open = False  # answered while the upload goes on
        self.tunnel_slot = False  # holds one of its account's open-tunnel slots (hot state)
        self.socks = False  # came in through the SOCKS5 entry (a CONNECT it stands for)


KEY = "datorus"
ROUTE = "datorus_route"  # flow.metadata: the egress.Route the client asked for


def flow_ctx(flow: http.HTTPFlow) -> FlowCtx | None:
    """The Datorus context of *flow*, if Datorus has seen it."""
    return flow.metadata.get(KEY)


class Gateway:
    """The one object every Datorus addon holds."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.runtime: Runtime = Runtime(self.settings)
        # rate limits, tunnel slots, failed logins, credit, sessions, news (issue 14);
        # in this process unless datorus_redis_url shares it between workers
        self.hot: HotState = LocalHotState(self.settings)
        self.local_hot = True  # the in-process state: its calls never suspend
        self.ledger: Any = None  # LedgerLink once open
        self.error_stash: dict[str, FlowCtx] = {}
        self.tunnels: dict[str, FlowCtx] = {}
        self.router: Any = None  # the EgressRouter (issue 5), when loaded
        self.ready = asyncio.Event()  # set once the ledger's first snapshot is in
        # handed off by `datorus serve` (addons/handoff.py): answers say Connection: close
        self.handing_off = False
        self.drain_deadline: float | None = None  # monotonic end of a drain under way
        # Prometheus counters (addons/metrics.py puts the real ones in when metrics_port
        # is set); every addon counts through this one attribute
        self.metrics: Any = NullMetrics()
        # events waiting for delivery, by queue, as the ledger task last read them
        self.waiting_events: dict[str, int] = {}

    # -- responses ---------------------------------------------------------------------

    def error_response(self, fc: FlowCtx | None, err: DatorusError) -> http.Response:
        """The envelope response for *err*, with every reserved header it needs.

        Header names are written in one style on every path (``X-Datorus-Request-Id``,
        ``X-Datorus-RateLimit-Limit``, ``Content-Type``...), as on relayed answers and
        the CONNECT 200; *err*'s own headers are written as their names are spelled.
        """
        request_id = fc.request_id if fc else None
        body = envelope_json(err.code, request_id, err.details, err.message)
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"0"),  # set to the body's length by Response.make
            (b"X-Datorus-Request-Id", (request_id or "").encode()),
            (b"Proxy-Status", proxy_status(err.code).encode()),
        ]
        if err.code == "INVALID_CREDENTIAL":
            headers.append((b"Proxy-Authenticate", b'Basic realm="Datorus"'))
        if err.status == 503 and "Retry-After" not in err.headers:
            headers.append((b"Retry-After", b"1"))
        if self.handing_off and "Connection" not in err.headers:
            headers.append((b"Connection", b"close"))
        for k, v in err.headers.items():
            headers.append((k.encode(), str(v).encode()))
        if fc is not None:
            own = {k.lower() for k in err.headers}
            for k, v in fc.rl_headers:
                if not (err.code == "RATE_LIMITED" and k.lower() in own):
                    headers.append((k.encode(), v.encode()))
            if fc.session_id:
                headers.append((b"X-Datorus-Session-Id", fc.session_id.encode()))
            fc.answered = True
            fc.status = err.status
            fc.code = err.code
        resp = http.Response.make(err.status, body, headers)
        if request_id is None:
            # no flow context: make the header agree with the body's fresh id
            import json

            rid = json.loads(body)["error"]["requestId"]
            resp.headers["X-Datorus-Request-Id"] = rid
        return resp

    def reject(self, flow: http.HTTPFlow, fc: FlowCtx | None, err: DatorusError) -> None:
        """Answer *flow* with *err* instead of sending it upstream.

        A tunnel slot the flow took (``RateLimits``) is given back: a refused tunnel
        never opens.
        """
        flow.response = self.error_response(fc, err)
        if fc is not None:
            self.free_tunnel_slot(fc)
        if err.status >= 500 or err.status in (402, 403, 429):
            log.info(
                "%s %s:%s -> %s %s",
                fc.method if fc else "-",
                fc.host if fc else "-",
                fc.port if fc else "-",
                err.status,
                err.code,
            )

    def free_tunnel_slot(self, fc: FlowCtx) -> None:
        """Give back the open-tunnel slot *fc* holds, if any."""
        if fc.tunnel_slot and fc.account is not None:
            fc.tunnel_slot = False
            self.hot.tunnel_closed(fc.account, fc.client_id)

    # -- connections -------------------------------------------------------------------

    async def stop_listening(self) -> None:
        """Close the proxy's listening sockets; connections already open go on (*internal*).

        At the end of a clean stop's drain: a client that reconnects then is refused at
        once and retries, instead of being accepted by a process about to exit and reset.
        """
        try:
            await patches.close_listening_sockets()
        except Exception as e:  # the stop goes on whatever mitmproxy thinks of it
            log.warning("datorus: could not close the listening sockets: %s", e)

    def cut_client(self, client_id: str) -> bool:
        """Close a client connection and everything it opened (*internal*)."""
        return patches.cancel_client_connection(client_id)

    def abort_upstream(self, client_id: str) -> None:
        """Cancel every server connection of a client connection (*internal*)."""
        patches.abort_server_connections(client_id)
