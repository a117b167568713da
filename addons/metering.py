"""Byte metering, admission (402) and cut-off when an account runs dry.

What is billed: the bytes that crossed between the gateway and the target, in both
directions, counted raw at the server connection's socket: for a forward request
the request as the target received it and the response as the target sent it
(start line, headers, body, chunked framing); for a CONNECT tunnel or a WebSocket
the payload both ways. The gateway's own answers (its envelopes) are never billed,
nor a request that failed before the target answered (502/504).

Counting wraps the server connection's reader and writer when it opens
(``server_connected``, *internal*: ``ConnectionHandler.transports``). A client
connection carries one request at a time, so every byte on its server connections
belongs to its current flow. Forward flows *reserve* bytes as they pass and
settle when they end; tunnels and WebSockets settle chunk by chunk. A chunk that
does not fit the allowance (trial, then balance down to the overdraft bound, and
the credential's own cap) is relayed only as far as it fits, and then the flow is
cut at exactly that bound. A forward request that runs dry before its response
reached the client is answered with the 402 (``X-Datorus-Used-Bytes`` = what it
moved); one that runs dry later, and a tunnel, is closed. Bytes moved before a cut
are billed: they reached the target.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import http

from datorus_core.envelope import DatorusError, utc_timestamp

from .context import FORWARD, TUNNEL, FlowCtx, Gateway, flow_ctx

log = logging.getLogger("datorus")


class MeteredReader:
    """A stream reader that reports every chunk read from the target."""

    __slots__ = ("inner", "meter")

    def __init__(self, inner: Any, meter: Metering, client_id: str) -> None:
        self.inner = inner
        self.meter = (meter, client_id)

    async def read(self, n: int = -1) -> bytes:
        data = await self.inner.read(n)
        if data:
            m, cid = self.meter
            fc = m.current.get(cid)
            if fc is not None:
                fit = m.count(fc, 0, len(data))
                if fit < len(data):
                    return data[:fit]
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class MeteredWriter:
    """A stream writer that reports every chunk written to the target."""

    __slots__ = ("inner", "meter")

    def __init__(self, inner: Any, meter: Metering, client_id: str) -> None:
        self.inner = inner
        self.meter = (meter, client_id)

    def write(self, data: bytes) -> None:
        m, cid = self.meter
        fc = m.current.get(cid)
        if fc is not None and data:
            fit = m.count(fc, len(data), 0)
            if fit < len(data):
                data = data[:fit]
                if not data:
                    return
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


SMALL_BODY = 64 * 1024


def small_body_fits(response: http.Response, fc: FlowCtx) -> bool:
    """Whether a response body may be relayed whole instead of streamed.

    Streaming writes the head and each chunk separately: one more send per response.
    A body of known length up to 64 KiB that the account's allowance and the
    credential's cap already cover is held and written with its head (counting is at
    the socket either way).
    """
    cl = response.headers.get("content-length", "")
    if not cl.isdigit() or int(cl) > SMALL_BODY:
        return False
    acc = fc.account
    need = int(cl) + 8192
    return need < acc.allowance - acc.inflight and need < fc.cred.room()


class Metering:
    """Admit, count, settle and cut."""

    name = "datorus_metering"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.current: dict[str, FlowCtx] = {}

    # -- admission ---------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._admit(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        fc = self._admit(flow)
        if fc is not None:
            fc.kind = TUNNEL
            fc.account.tunnels[fc.client_id] = fc

    def _admit(self, flow: http.HTTPFlow) -> FlowCtx | None:
        fc = flow_ctx(flow)
        if flow.response is not None or fc is None or fc.cred is None:
            return None
        try:
            self.gw.runtime.admit(fc.cred)
        except DatorusError as e:
            self.gw.reject(flow, fc, e)
            return None
        self.current[fc.client_id] = fc
        flow.request.stream = True
        return fc

    # -- counting ----------------------------------------------------------------------

    def server_connected(self, data) -> None:
        h = self.gw.handler(data.client.id)
        io = h.transports.get(data.server) if h is not None else None
        if io is None or io.reader is None:
            return
        io.reader = MeteredReader(io.reader, self, data.client.id)
        io.writer = MeteredWriter(io.writer, self, data.client.id)

    def count(self, fc: FlowCtx, up: int, down: int) -> int:
        """Account for *up*/*down* bytes of *fc*; returns how many may pass (the rest is cut)."""
        if fc.done or fc.answered:
            return up + down
        rt = self.gw.runtime
        n = up + down
        acc = fc.account
        if fc.kind == FORWARD:
            fit = rt.reserve(fc.cred, n)
            fc.reserved += fit
        else:
            cred = fc.cred
            fit = min(n, max(0, acc.allowance - acc.inflight), cred.room())
            if acc.status != "active":
                fit = 0
            if fit:
                c = rt.settle(cred, fit if up else 0, fit if down else 0, 0, requests=0)
                fc.trial_spent += c.trial_bytes
                fc.nanocents += c.nanocents
        if up:
            fc.up += fit
        else:
            fc.down += fit
        if fit < n and not fc.cut:
            fc.cut = "balance"
            if fc.kind == FORWARD and not fc.status:
                # nothing of the response reached the client yet: answer with the 402
                asyncio.get_running_loop().call_soon(self.gw.abort_upstream, fc.client_id)
            else:
                asyncio.get_running_loop().call_soon(self.gw.cut_client, fc.client_id)
            log.info(
                "datorus: cut %s %s:%s, account %s ran dry", fc.method, fc.host, fc.port, acc.id
            )
        return fit

    # -- settling ----------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is None or fc.answered or fc.cred is None:
            return
        fc.status = flow.response.status_code
        if not small_body_fits(flow.response, fc):
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is None or fc.cred is None or fc.done:
            return
        if fc.answered:
            self._finish(fc, charge=False)
            return
        fc.status = flow.response.status_code
        if flow.response.status_code == 101:
            # a WebSocket (or other upgrade): from here on it is metered like a tunnel
            self._settle_forward(fc, final=False)
            fc.kind = TUNNEL
            return
        self._finish(fc, charge=True)

    def error(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is None or fc.cred is None or fc.done:
            return
        # bytes that reached the client are billed (a client that aborts a download
        # pays for what it got); a request the gateway answered with 502/504 is not
        self._finish(fc, charge=fc.cut == "balance" or (bool(fc.status) and not fc.answered))

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is not None and fc.cred is not None and not fc.done:
            self._finish(fc, charge=False)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is not None and fc.cred is not None:
            fc.status = 200

    def client_disconnected(self, client) -> None:
        fc = self.current.get(client.id)
        if fc is not None and not fc.done:
            self._finish(fc, charge=fc.kind == TUNNEL or bool(fc.status) or fc.cut == "balance")
        self.current.pop(client.id, None)

    def _settle_forward(self, fc: FlowCtx, final: bool) -> None:
        rt = self.gw.runtime
        c = rt.settle(fc.cred, fc.up, fc.down, fc.reserved, requests=0)
        fc.reserved = 0
        fc.trial_spent += c.trial_bytes
        fc.nanocents += c.nanocents

    def _finish(self, fc: FlowCtx, charge: bool) -> None:
        fc.done = True
        rt = self.gw.runtime
        if self.current.get(fc.client_id) is fc:
            del self.current[fc.client_id]
        if fc.account.tunnels.get(fc.client_id) is fc:
            del fc.account.tunnels[fc.client_id]
        if not charge:
            rt.release(fc.cred, fc.reserved)
            fc.reserved = 0
            return
        if fc.kind == FORWARD:
            self._settle_forward(fc, final=True)
        receipt = (
            fc.request_id,
            fc.account.id,
            fc.cred.id,
            fc.method,
            fc.host,
            fc.port,
            fc.status or (402 if fc.cut == "balance" else 0),
            fc.up,
            fc.down,
            fc.trial_spent,
            fc.nanocents,
            utc_timestamp(fc.started),
            utc_timestamp(time.time()),
        )
        rt.settle(fc.cred, 0, 0, 0, requests=1, receipt=receipt)

    # -- suspension --------------------------------------------------------------------

    def on_snapshot(self, rt) -> None:
        """Close the tunnels of accounts that are no longer active."""
        for acc in rt.accounts.values():
            if acc.status != "active" and acc.tunnels:
                for cid in list(acc.tunnels):
                    fc = acc.tunnels[cid]
                    fc.cut = "suspended"
                    self.gw.cut_client(cid)
