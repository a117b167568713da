"""Every error leaves as the canonical envelope, never as mitmproxy's HTML page.

mitmproxy writes its own error pages deep in the HTTP/1 server layer (*internal*):
``_http1.make_error_response`` for unparseable requests and
``Http1Server.send(ResponseProtocolError)`` for upstream failures. This addon
replaces both (``replace_parse_error_page`` and ``replace_upstream_error_page`` in
``addons/patches.py``, which name the tests that guard them). The ``error`` hook runs
before the page is written, so it leaves the flow's context in a stash keyed by client
connection, and the page then carries that flow's request id, rate-limit headers and
the right code (504 when our timer fired, 502 otherwise).
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http

from datorus_core.envelope import DatorusError
from datorus_core.metrics import FORWARD
from datorus_core.runtime import Runtime, state_unavailable

from . import patches
from .context import FlowCtx, Gateway, flow_ctx
from .patches import ErrorCode

log = logging.getLogger("datorus")


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
    if fc is not None and fc.cut == "credit":
        # a worker's byte credit ran out while the shared state was out of reach
        return state_unavailable(fc.up + fc.down)
    if fc is not None and fc.cut == "ledger":
        return DatorusError("SERVICE_UNAVAILABLE", headers={"Retry-After": "1"})
    if patches.client_error(code) or (code is None and 400 <= status < 500):
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
        self._undo: list[patches.Undo] = []

    def load(self, loader) -> None:
        gw = self.gw

        def parse_error_page(status: int, message: str) -> http.Response:
            err = error_for(status, message, None, None)
            resp = gw.error_response(None, err)
            resp.headers["Connection"] = "close"
            gw.metrics.answered(FORWARD, err.status, err.code)
            return resp

        def upstream_error_page(
            client_id: str, status: int | None, message: str, code: ErrorCode
        ) -> http.Response | None:
            fc = gw.error_stash.pop(client_id, None)
            if status is None:
                return None
            err = error_for(status, message, fc, code, gw.runtime)
            resp = gw.error_response(fc, err)
            resp.headers["Connection"] = "close"
            # no response hook sees this page: count it here
            if fc is None:
                gw.metrics.answered(FORWARD, err.status, err.code)
            else:
                account = fc.account.id if fc.account is not None else None
                gw.metrics.answered(FORWARD, err.status, err.code, account)
                gw.metrics.took(FORWARD, time.time() - fc.started)
            return resp

        # deliberate patches of mitmproxy's error pages (see the module docstring)
        self._undo = [
            patches.replace_upstream_error_page(upstream_error_page),
            patches.replace_parse_error_page(parse_error_page),
        ]

    def done(self) -> None:
        for undo in self._undo:
            undo()
        self._undo = []

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
