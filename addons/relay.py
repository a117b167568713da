"""Relaying: what reaches the target, what comes back, and how long we wait for it.

- Request side: ``Proxy-Authorization``, ``Proxy-Connection``, the other
  hop-by-hop headers and every ``X-Datorus-*`` header are removed before anything
  is sent upstream.
- Response side: ``X-Datorus-Request-Id`` on every response (the CONNECT 200
  included), the rate-limit headers once the credential is known, the session id
  echoed; any ``X-Datorus-*`` header the target itself sent is dropped first.
- Tunnels are passed through as raw TCP: HTTPS is never decrypted. Upgraded
  connections (a WebSocket's ``101``) are relayed as raw TCP too (mitmproxy's
  ``websocket`` option off): frames pass unchanged and no message is buffered whole.
- mitmproxy has no upstream timeout: a timer per flow aborts the upstream
  connection after ``upstream_timeout`` seconds without response headers, and the
  error page then says ``504 GATEWAY_TIMEOUT``. A ``POST /fetch`` of the in-process
  API sets its own (``X-Datorus-Timeout``, vouched for by the process's secret, at
  most ``max_fetch_timeout``).
"""

from __future__ import annotations

import asyncio

from mitmproxy import ctx, http, tcp

from datorus_core.routing import vouched

from . import patches
from .context import FlowCtx, Gateway, flow_ctx
from .egress import ROUTE

_HOP_BY_HOP = ("proxy-authorization", "proxy-connection", "keep-alive", "proxy-authenticate")
_KEEP_IN_CONNECTION = {"close", "keep-alive", "upgrade"}


def strip_request_headers(headers: http.Headers) -> None:
    """Remove hop-by-hop, proxy and ``X-Datorus-*`` headers (in place)."""
    for name in _HOP_BY_HOP:
        if name in headers:
            del headers[name]
    conn = headers.get("connection")
    if conn is not None:
        tokens = [t.strip().lower() for t in conn.split(",") if t.strip()]
        for t in tokens:
            if t not in _KEEP_IN_CONNECTION and t in headers:
                del headers[t]
        kept = [t for t in tokens if t in _KEEP_IN_CONNECTION]
        if kept:
            # mitmproxy compares these tokens case-sensitively: normalise them
            headers["connection"] = ", ".join(kept)
        else:
            del headers["connection"]
    for name in [k for k in headers if k[:10].lower() == "x-datorus-"]:
        del headers[name]


def stamp(headers: http.Headers, fc: FlowCtx) -> None:
    """Put Datorus's reserved headers on an upstream response (or the CONNECT 200)."""
    for name in [k for k in headers if k[:10].lower() == "x-datorus-"]:
        del headers[name]
    headers["X-Datorus-Request-Id"] = fc.request_id
    for k, v in fc.rl_headers:
        headers[k] = v
    if fc.session_id:
        headers["X-Datorus-Session-Id"] = fc.session_id


def close_after(flow: http.HTTPFlow) -> None:
    """Have the client's connection close after this response (a handed-off worker's
    answers: the client reconnects, and the kernel gives it to another worker)."""
    resp = flow.response
    if resp is not None and resp.status_code != 101 and flow.request.http_version != "HTTP/2.0":
        resp.headers["Connection"] = "close"


class Relay:
    """Header hygiene, reserved headers, passthrough tunnels and the upstream timer."""

    name = "datorus_relay"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def running(self) -> None:
        # mitmproxy's block_global (default on) kills every client connection from a
        # public address: right for an open proxy, wrong for a gateway whose customers
        # connect from the internet and authenticate on every request
        if ctx.options.websocket or ctx.options.block_global:
            ctx.options.update(websocket=False, block_global=False)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """An upgraded connection's chunk: relayed as is, only the last one kept (for
        mitmproxy's own log line, which reads it)."""
        del flow.messages[:-1]

    # -- requests ----------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            strip_request_headers(flow.request.headers)

    def request(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is not None and flow.response is None and not fc.answered:
            self._start_timer(fc, flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is not None and flow.response is None:
            self._start_timer(fc, flow)

    # -- responses ---------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.gw.handing_off:
            close_after(flow)
        fc = flow_ctx(flow)
        if fc is None:
            return
        self._stop_timer(fc)
        assert flow.response is not None  # responseheaders: the response has arrived
        if not fc.answered:
            stamp(flow.response.headers, fc)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is None:
            return
        self._stop_timer(fc)
        assert flow.response is not None  # http_connected: the 200 answer is set
        stamp(flow.response.headers, fc)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is not None:
            self._stop_timer(fc)

    def error(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is not None:
            self._stop_timer(fc)

    def next_layer(self, nextlayer) -> None:
        """Inside a CONNECT tunnel: raw TCP passthrough, never TLS interception."""
        if nextlayer.layer is None and patches.inside_connect_tunnel(nextlayer):
            patches.relay_raw_tcp(nextlayer)

    # -- the timer ---------------------------------------------------------------------

    def _timeout(self, flow: http.HTTPFlow) -> int:
        """``upstream_timeout``, or the in-process API's own for this request (POST /fetch)."""
        s = self.gw.settings
        route = flow.metadata.get(ROUTE)
        router = self.gw.router
        if route is not None and route.timeout and router is not None:
            value = vouched(route.timeout, router.pin_secret)
            if value is not None and value.isdigit() and int(value) > 0:
                return min(int(value), s.get("max_fetch_timeout", 120))
        return s["upstream_timeout"]

    def _start_timer(self, fc: FlowCtx, flow: http.HTTPFlow) -> None:
        loop = asyncio.get_running_loop()
        fc.timeout = self._timeout(flow)
        fc.timer = loop.call_later(fc.timeout, self._expire, fc)

    @staticmethod
    def _stop_timer(fc: FlowCtx) -> None:
        if fc.timer is not None:
            fc.timer.cancel()
            fc.timer = None

    def _expire(self, fc: FlowCtx) -> None:
        fc.timer = None
        fc.timed_out = True
        self.gw.abort_upstream(fc.client_id)
