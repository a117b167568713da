"""Every error leaves as the canonical envelope, never as mitmproxy's HTML page.

mitmproxy writes its own error pages deep in the HTTP/1 server layer (*internal*):
``_http1.make_error_response`` for unparseable requests and
``Http1Server.send(ResponseProtocolError)`` for upstream failures. This addon
replaces both. The ``error`` hook runs before the page is written, so it leaves
the flow's context in a stash keyed by client connection, and the page then
carries that flow's request id, rate-limit headers and the right code (504 when
our timer fired, 502 otherwise). tests/e2e/test_errors.py guards these internals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import ErrorCode, ResponseProtocolError

from datorus_core.envelope import DatorusError
from datorus_core.runtime import Runtime

from .context import FlowCtx, Gateway, flow_ctx

log = logging.getLogger("datorus")

_CLIENT_ERRORS = {
    ErrorCode.GENERIC_CLIENT_ERROR,
    ErrorCode.REQUEST_VALIDATION_FAILED,
    ErrorCode.DESTINATION_UNKNOWN,
    ErrorCode.REQUEST_TOO_LARGE,
    ErrorCode.HTTP_1_1_REQUIRED,
}


def error_for(
    status: int,
    message: str,
    fc: FlowCtx | None,
    code: ErrorCode | None,
    runtime: Runtime | None = None,
) -> DatorusError:
    """Map a mitmproxy error (status, message, ErrorCode) to a Datorus error."""
    if fc is not None and fc.timed_out:
        timeout = fc.timeout
        if timeout is None and runtime is not None:
            timeout = runtime.settings.get("upstream_timeout")
        return DatorusError("GATEWAY_TIMEOUT", details={"timeoutSeconds": timeout})
    if fc is not None and fc.cut == "balance" and fc.cred is not None and runtime is not None:
        # a forward request that ran its account dry before its response started
        return runtime.dry_error(fc.cred, fc.up + fc.down)
    if fc is not None and fc.cut == "ledger":
        return DatorusError("SERVICE_UNAVAILABLE", headers={"Retry-After": "1"})
    if code in _CLIENT_ERRORS or (code is None and 400 <= status < 500):
        return DatorusError(
            "VALIDATION_ERROR",
            message="The request could not be parsed.",
            details={"field": "request", "reason": message[:200]},
        )
    if status == 504:
        return DatorusError("GATEWAY_TIMEOUT")
    return DatorusError("UPSTREAM_FAILED", details={"reason": message[:200]})


class ErrorPages:
    """Install the envelope error pages and map upstream failures to codes."""

    name = "datorus_errors"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._orig_send: Callable[..., Any] | None = None
        self._orig_make: Callable[..., bytes] | None = None

    def load(self, loader) -> None:
        gw = self.gw
        orig_send = _http1.Http1Server.send
        self._orig_send, self._orig_make = orig_send, _http1.make_error_response

        def make_error_response(status_code: int, message: str = "") -> bytes:
            err = error_for(status_code, message, None, None)
            resp = gw.error_response(None, err)
            resp.headers["Connection"] = "close"
            from mitmproxy.net.http import http1

            return http1.assemble_response(resp)

        def send_error(self, event: ResponseProtocolError):
            if not (self.conn.state & ConnectionState.CAN_WRITE):
                return
            status = event.code.http_status_code()
            fc = gw.error_stash.pop(self.context.client.id, None)
            if not self.response and status is not None:
                err = error_for(status, event.message, fc, event.code, gw.runtime)
                resp = gw.error_response(fc, err)
                resp.headers["Connection"] = "close"
                from mitmproxy.net.http import http1

                yield commands.SendData(self.conn, http1.assemble_response(resp))
            yield commands.CloseConnection(self.conn)

        def send(self, event):
            if type(event) is ResponseProtocolError:
                return send_error(self, event)
            return orig_send(self, event)

        _http1.Http1Server.send = send  # type: ignore[method-assign]  # deliberate patch
        _http1.make_error_response = make_error_response

    def done(self) -> None:
        if self._orig_send is not None and self._orig_make is not None:  # set together
            _http1.Http1Server.send = self._orig_send  # type: ignore[method-assign]
            _http1.make_error_response = self._orig_make

    # -- hooks -------------------------------------------------------------------------

    def error(self, flow: http.HTTPFlow) -> None:
        """Leave the flow's context for the error page about to be written."""
        fc = flow_ctx(flow)
        if fc is not None:
            self.gw.error_stash[flow.client_conn.id] = fc

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        """A CONNECT that failed upstream: replace mitmproxy's text 502 with the envelope."""
        fc = flow_ctx(flow)
        if fc is None or fc.answered or flow.response is None:
            return
        msg = flow.response.get_text(strict=False) or ""
        status = flow.response.status_code
        err = error_for(status, msg, fc, None, self.gw.runtime)
        flow.response = self.gw.error_response(fc, err)

    def client_disconnected(self, client) -> None:
        self.gw.error_stash.pop(client.id, None)
