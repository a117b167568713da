"""Byte metering, admission (402) and cut-off when an account runs dry.

What is billed: the bytes that crossed between the gateway and the target, in both
directions, counted raw at the server connection's socket: for a forward request
the request as the target received it and the response as the target sent it
(start line, headers, body, chunked framing); for a CONNECT tunnel or a WebSocket
the payload both ways. The gateway's own answers (its envelopes) are never billed,
nor a request that failed before the target answered (502/504). Whether a flow that
ends is billed is decided in ``datorus_core/billing.py``; ``flow_outcome`` below is
the one place that turns mitmproxy's view of its end into billing's record.

Counting wraps the server connection's reader and writer when it opens
(``server_connected``, *internal*: ``patches.wrap_server_streams``). A client
connection carries one request at a time, so every byte on its server connections
belongs to its current flow. Forward flows *reserve* bytes as they pass and
settle when they end; tunnels and WebSockets settle chunk by chunk. A chunk that
does not fit the allowance (trial, then balance down to the overdraft bound, and
the credential's own cap) is relayed only as far as it fits, and then the flow is
cut at exactly that bound. A forward request that runs dry before its response
reached the client (a response held whole has not) is answered with the 402
(``X-Datorus-Used-Bytes`` = what it moved); one that runs dry later, and a tunnel, is
closed. Bytes moved before a cut are billed: they reached the target.

With the hot state shared between ``datorus serve``'s workers, a worker reserves only
the byte credit it holds: it claims more at admission, before a read from the target
that the credit cannot cover, and for a write to the target that it cannot cover (the
write is kept back until the claim answers: :class:`MeteredWriter`). A request this
worker's own view refuses is looked at again on the gateway's (``_claim_and_admit``).
While the shared state is out of reach no claim succeeds: a request that needs more
than the credit held is cut the same way, and answered with the 503 (``reason``
``state_unavailable``, with ``X-Datorus-Used-Bytes``) instead of the 402 (``Cut.CREDIT``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from mitmproxy import http

from datorus_core.billing import (
    Bill,
    Cut,
    Ending,
    ErrorKind,
    FlowOutcome,
    allowance_covers,
    answers_cut,
    bill,
)
from datorus_core.envelope import DatorusError, utc_timestamp
from datorus_core.metrics import FORWARD as FORWARD_KIND
from datorus_core.metrics import SOCKS5 as SOCKS5_KIND
from datorus_core.metrics import TUNNEL as TUNNEL_KIND
from datorus_core.metrics import WEBSOCKET as WEBSOCKET_KIND
from datorus_core.runtime import state_unavailable

from . import patches
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
                if m.gw.hot.shared and not (fc.done or fc.answered):
                    await m.top_up(fc, len(data))
                fit = m.count(fc, 0, len(data))
                if fit < len(data):
                    return data[:fit]
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class MeteredWriter:
    """A stream writer that reports every chunk written to the target.

    With a shared hot state, a chunk the credit held cannot cover is kept back (with
    every chunk after it, in order) while a claim is made, then written as far as the
    claim covers: mitmproxy writes without waiting, often several chunks at once (a
    body it buffered while the request was admitted). Its ``drain``, awaited after every
    chunk it reads, waits for what is kept back, so it reads no further meanwhile.
    """

    __slots__ = ("backlog", "inner", "meter", "writing")

    def __init__(self, inner: Any, meter: Metering, client_id: str) -> None:
        self.inner = inner
        self.meter = (meter, client_id)
        self.backlog: list[bytes] = []
        self.writing: asyncio.Task | None = None  # writes the backlog once claimed

    def write(self, data: bytes) -> None:
        if self.backlog:
            self.backlog.append(data)  # behind what waits for credit
            return
        m, cid = self.meter
        fc = m.current.get(cid)
        if fc is not None and data:
            if m.must_wait(fc, len(data)):
                self.backlog.append(data)
                loop = asyncio.get_running_loop()
                self.writing = loop.create_task(self._write_backlog(fc))
                return
            fit = m.count(fc, len(data), 0)
            if fit < len(data):
                data = data[:fit]
                if not data:
                    return
        self.inner.write(data)

    async def _write_backlog(self, fc: FlowCtx) -> None:
        """Claim for each chunk kept back and write it, as far as the credit goes."""
        m, cid = self.meter
        try:
            while self.backlog:
                data = self.backlog[0]
                if fc.done or m.current.get(cid) is not fc or self.inner.is_closing():
                    return  # the flow ended meanwhile: what waited never reaches the target
                await m.top_up(fc, len(data))
                if fc.done or self.inner.is_closing():
                    return
                fit = m.count(fc, len(data), 0)
                if fit:
                    self.inner.write(data[:fit])
                if fit < len(data):
                    return  # cut at the bound (count did it)
                self.backlog.pop(0)
        finally:
            self.backlog.clear()
            self.writing = None

    def drain(self) -> Awaitable[None]:
        """Wait for what is kept back (see the class), then drain (with nothing kept
        back, the stream's own drain: no extra step per chunk)."""
        if self.writing is None:
            return self.inner.drain()
        return self._drain_after(self.writing)

    async def _drain_after(self, writing: asyncio.Task) -> None:
        await asyncio.shield(writing)
        await self.inner.drain()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


SMALL_BODY = 64 * 1024
CREDIT_LOW = 256 * 1024  # shared hot state: claim more credit below this many bytes
CHUNK = 128 * 1024  # more than one read or write of mitmproxy moves (64 KiB and framing)
STATE_DOWN = state_unavailable()
TUNNEL_BLOCK = 1 << 20  # bytes a tunnel reserves ahead
TUNNEL_SETTLE_SECONDS = 0.5  # a long tunnel's usage reaches the batch at least this often


def small_body_fits(response: http.Response, fc: FlowCtx) -> bool:
    """Whether a response body may be relayed whole instead of streamed.

    Streaming writes the head and each chunk separately: one more send per response.
    A body of known length up to 64 KiB that the account's allowance and the
    credential's cap already cover is held and written with its head (counting is at
    the socket either way).
    """
    cl = response.headers.get("content-length", "")
    return cl.isdigit() and int(cl) <= SMALL_BODY and allowance_covers(fc, int(cl))


def flow_outcome(fc: FlowCtx, ending: Ending, flow: http.HTTPFlow | None = None) -> FlowOutcome:
    """The plain record of how *fc* ended, for ``billing.bill`` to decide on.

    The one place mitmproxy's view of a flow's end becomes billing's: *ending* is the
    hook that finished it, and from *flow* (in the ``error`` hook) come whether the
    client connection had closed and what mitmproxy's error message says.
    """
    msg = flow.error.msg if flow is not None and flow.error else ""
    if msg.startswith("Client disconnected"):
        error = ErrorKind.CLIENT_DISCONNECTED
    elif "without sending complete message body" in msg:
        error = ErrorKind.INCOMPLETE_BODY
    else:
        error = ErrorKind.OTHER if msg else ErrorKind.NONE
    return FlowOutcome(
        ending=ending,
        tunnel=fc.kind == TUNNEL,
        status=fc.status,
        up=fc.up,
        down=fc.down,
        answered=fc.answered,
        cut=Cut(fc.cut),
        client_closed=ending is Ending.DISCONNECTED
        or (flow is not None and flow.client_conn.timestamp_end is not None),
        timed_out=fc.timed_out,
        error=error,
    )


class Metering:
    """Admit, count, settle and cut."""

    name = "datorus_metering"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.current: dict[str, FlowCtx] = {}
        self.writers: dict[str, MeteredWriter] = {}  # client id -> its server writer
        self.claiming: set[int] = set()  # credentials with a background claim under way
        self.settler: asyncio.Task | None = None

    def running(self) -> None:
        if self.settler is None:
            self.settler = asyncio.get_running_loop().create_task(self._settle_idle_tunnels())

    def open_count(self) -> int:
        """How many requests and tunnels are under way (a stopping gateway waits for them)."""
        return sum(1 for fc in self.current.values() if not fc.done)

    def settle_open_flows(self) -> None:
        """Finish every flow still open at a clean stop, billing what it moved, and close it.

        The ledger task calls this before its final flush, once the drain time is over:
        a download or tunnel cut by the stop is billed for the bytes that crossed, with
        its receipt, and closed so that nothing more crosses unbilled.
        """
        if self.settler is not None:
            self.settler.cancel()
            self.settler = None
        for fc in list(self.current.values()):
            if not fc.done and not fc.answered:
                self._finish(fc, Ending.STOPPED)
                self.gw.cut_client(fc.client_id)

    async def _settle_idle_tunnels(self) -> None:
        """Settle what open tunnels used, also those that went quiet since their last chunk."""
        while True:
            await asyncio.sleep(TUNNEL_SETTLE_SECONDS)
            for fc in list(self.current.values()):
                if fc.kind == TUNNEL and not fc.done and (fc.pend_up or fc.pend_down):
                    self._settle_tunnel(fc, release=False)

    # -- admission ---------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow):
        # a WebSocket holds a tunnel slot from the moment it is admitted (parallel
        # upgrades cannot pass the cap together); _finish frees it if no 101 comes
        return self._admit(flow, TUNNEL if "upgrade" in flow.request.headers else 0)

    def http_connect(self, flow: http.HTTPFlow):
        return self._admit(flow, TUNNEL)

    def _admit(self, flow: http.HTTPFlow, tunnel: int):
        """Admit *flow* (402/403/503 if not); a coroutine when credit must be claimed first.

        With the hot state shared between workers, this process may reserve only the
        credit it holds: below ``CREDIT_LOW`` it claims more, once the request passed
        every other check (a refused request claims nothing).
        """
        fc = flow_ctx(flow)
        if flow.response is not None or fc is None or fc.cred is None:
            return None
        hot = self.gw.hot
        try:
            self.gw.runtime.admit(fc.cred)
        except DatorusError as e:
            if hot.shared and e.status == 402:
                # this worker's view may be behind the gateway's: decide on a fresh one
                return self._claim_and_admit(flow, fc, tunnel, e)
            self.gw.reject(flow, fc, e)
            return None
        if hot.shared and hot.credit(fc.cred) < CREDIT_LOW:
            return self._claim_and_admit(flow, fc, tunnel, None)
        self._admitted(flow, fc, tunnel)
        return None

    async def _claim_and_admit(
        self, flow: http.HTTPFlow, fc: FlowCtx, tunnel: int, refused: DatorusError | None
    ) -> None:
        """Shared hot state: claim credit (enough for a first chunk), then admit.

        A request this worker's view *refused* (402) is looked at again first: with the
        newest configuration any worker has read (a top-up), and, when the ledger still
        shows trial bytes, with the trial credit a claim brings (other workers may hold
        it). The 402 that remains is decided on what the claim saw of the others.
        """
        cred = fc.cred
        assert cred is not None
        acc = cred.account
        hot, rt = self.gw.hot, self.gw.runtime
        if refused is not None:
            await hot.catch_up(rt)
            refused = _refusal(rt, cred)
            if refused is None:
                if hot.credit(cred) >= CREDIT_LOW:
                    self._admitted(flow, fc, tunnel)
                    return
            elif acc.ledger_trial <= 0 or (cred.max_bytes is not None and cred.room() <= 0):
                self.gw.reject(flow, fc, refused)
                return
        await hot.claim(cred, CREDIT_LOW, need=CHUNK, trial=refused is not None)
        refused = _refusal(rt, cred)
        if refused is not None:
            self.gw.reject(flow, fc, refused)
            return
        if hot.credit(cred) <= 0:
            # the account's credit is spent on other workers, or the shared state is out
            # of reach: say which
            err = rt.dry_error(cred, 0) if hot.reachable() else STATE_DOWN
            self.gw.reject(flow, fc, err)
            return
        self._admitted(flow, fc, tunnel)

    def _admitted(self, flow: http.HTTPFlow, fc: FlowCtx, tunnel: int) -> None:
        self.current[fc.client_id] = fc
        flow.request.stream = True
        if flow.request.method == "CONNECT":
            fc.kind = TUNNEL
        if tunnel:
            # an open tunnel of its account: closed on suspension (the slot is the hot state's)
            fc.account.tunnels[fc.client_id] = fc

    # -- counting ----------------------------------------------------------------------

    def server_connected(self, data) -> None:
        cid = data.client.id

        def writer(w: Any) -> MeteredWriter:
            mw = self.writers[cid] = MeteredWriter(w, self, cid)
            return mw

        patches.wrap_server_streams(cid, data.server, lambda r: MeteredReader(r, self, cid), writer)

    async def top_up(self, fc: FlowCtx, nbytes: int) -> None:
        """Shared hot state: claim credit before a chunk that the credit held cannot cover."""
        assert fc.cred is not None
        hot = self.gw.hot
        if hot.credit(fc.cred) < max(nbytes, CREDIT_LOW) and fc.block < nbytes:
            await hot.claim(fc.cred, max(nbytes, CREDIT_LOW), need=nbytes - fc.block)

    def must_wait(self, fc: FlowCtx, nbytes: int) -> bool:
        """Shared hot state: whether a write of *nbytes* must wait for a claim (neither
        a tunnel's block nor the credit held covers it)."""
        if not self.gw.hot.shared or fc.done or fc.answered or fc.cut or fc.cred is None:
            return False
        return fc.block < nbytes and self.gw.hot.credit(fc.cred) + fc.block < nbytes

    def _claim_soon(self, fc: FlowCtx) -> None:
        """Claim credit in the background when what is held runs low (one claim at a time)."""
        cred = fc.cred
        assert cred is not None
        if cred.id in self.claiming or self.gw.hot.credit(cred) >= CREDIT_LOW:
            return
        self.claiming.add(cred.id)
        task = asyncio.get_running_loop().create_task(self.gw.hot.claim(cred, CREDIT_LOW))
        task.add_done_callback(lambda _t: self.claiming.discard(cred.id))

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
        elif fc.block >= n:
            # a tunnel chunk within the block reserved ahead: counting is a subtraction
            fc.block -= n
            fit = n
            if up:
                fc.pend_up += n
            else:
                fc.pend_down += n
            if time.monotonic() - fc.settled_at > TUNNEL_SETTLE_SECONDS:
                self._settle_tunnel(fc, release=False)
        else:
            fit = self._refill(fc, up, down)
        if up:
            fc.up += fit
            if self.gw.hot.shared:
                self._claim_soon(fc)  # writes cannot wait: claim ahead of the next one
        else:
            fc.down += fit
        if fit < n and not fc.cut:
            # with the shared state out of reach no more credit could be claimed: the
            # account may not be dry at all, so the answer is the 503, not the 402
            fc.cut = Cut.BALANCE if self.gw.hot.reachable() else Cut.CREDIT
            if answers_cut(fc.kind == TUNNEL, fc.head_sent):
                # nothing of the response reached the client yet (a head held with its
                # body included): answer with the 402 or 503 instead
                fc.status = 0
                asyncio.get_running_loop().call_soon(self.gw.abort_upstream, fc.client_id)
            else:
                asyncio.get_running_loop().call_soon(self.gw.cut_client, fc.client_id)
            log.info(
                "datorus: cut %s %s:%s, account %s %s",
                fc.method,
                fc.host,
                fc.port,
                acc.id,
                "ran dry" if fc.cut == Cut.BALANCE else "out of byte credit (no shared state)",
            )
        return fit

    def _refill(self, fc: FlowCtx, up: int, down: int) -> int:
        """Settle a tunnel's used bytes and reserve the next block; returns what fits now.

        Tunnels reserve ``TUNNEL_BLOCK`` bytes ahead (or what the allowance and the
        credential's cap still hold, if less), so a chunk usually costs a subtraction;
        the block is settled when used up, every ``TUNNEL_SETTLE_SECONDS`` and at the
        end, and what is left of it is released then. The bound is exact: a tunnel
        that cannot reserve its whole chunk gets only what fits, and is cut.
        """
        rt = self.gw.runtime
        n = up + down
        self._settle_tunnel(fc, release=True)
        got = rt.reserve(fc.cred, max(n, TUNNEL_BLOCK)) if fc.account.status == "active" else 0
        fit = min(n, got)
        fc.reserved = got
        fc.block = got - fit
        if up:
            fc.pend_up += fit
        else:
            fc.pend_down += fit
        return fit

    def _settle_tunnel(self, fc: FlowCtx, release: bool) -> None:
        """Charge a tunnel's used bytes; with *release*, give back the unused block too."""
        used = fc.pend_up + fc.pend_down
        fc.settled_at = time.monotonic()
        if used:
            kind = WEBSOCKET_KIND if fc.method != "CONNECT" else TUNNEL_KIND
            self.gw.metrics.moved(SOCKS5_KIND if fc.socks else kind, fc.pend_up, fc.pend_down)
        if not used and not (release and fc.reserved):
            return
        reserved = fc.reserved if release else used
        c = self.gw.runtime.settle(fc.cred, fc.pend_up, fc.pend_down, reserved, requests=0)
        fc.trial_spent += c.trial_bytes
        fc.nanocents += c.nanocents
        fc.reserved -= reserved
        if release:
            fc.block = 0
        fc.pend_up = fc.pend_down = 0

    # -- settling ----------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is None or fc.answered or fc.cred is None:
            return
        if fc.cut:
            return  # cut as the head came in: the client gets the 402 or 503 instead
        fc.status = flow.response.status_code
        if not small_body_fits(flow.response, fc):
            flow.response.stream = True
            fc.head_sent = True  # streamed: the head leaves now, the body as it comes

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        fc = flow_ctx(flow)
        if fc is None or fc.cred is None or fc.done:
            return None
        if fc.answered:
            self._finish(fc, Ending.COMPLETED)
            return None
        fc.status = flow.response.status_code
        fc.head_sent = True  # a response held whole leaves after this hook
        if flow.response.status_code == 101:
            # a WebSocket (or other upgrade): from here on it is metered like a tunnel
            self.gw.metrics.moved(WEBSOCKET_KIND, fc.up, fc.down)
            self._settle_forward(fc, fc.up, fc.down)
            fc.kind = TUNNEL
            # an open tunnel of its account: counted against max_tunnels, closed on suspension
            fc.account.tunnels[fc.client_id] = fc
            if fc.account.status != "active":  # suspended while the upgrade was under way
                fc.cut = Cut.SUSPENDED
                asyncio.get_running_loop().call_soon(self.gw.cut_client, fc.client_id)
            return None
        if flow.request.timestamp_end is None:
            # the target answered before the upload ended, and mitmproxy goes on relaying
            # it: the flow is finished (and billed) when the request ends
            fc.upload_open = True
            return None
        return self._complete(fc)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        fc = flow_ctx(flow)
        if fc is not None and fc.upload_open and not fc.done:
            return self._complete(fc)
        return None

    def _complete(self, fc: FlowCtx) -> Awaitable[None] | None:
        """Finish *fc* as completed; a coroutine when writes of it still wait for credit
        (see :class:`MeteredWriter`): the flow is billed once they are written."""
        w = self.writers.get(fc.client_id)
        if w is None or w.writing is None:
            self._finish(fc, Ending.COMPLETED)
            return None
        return self._complete_after(fc, w.writing)

    async def _complete_after(self, fc: FlowCtx, writing: asyncio.Task) -> None:
        await asyncio.wait([writing])
        if not fc.done:
            self._finish(fc, Ending.COMPLETED)

    def error(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is None or fc.cred is None or fc.done:
            return
        self._finish(fc, Ending.FAILED, flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is not None and fc.cred is not None and not fc.done:
            self._finish(fc, Ending.CONNECT_FAILED)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is not None and fc.cred is not None:
            fc.status = 200

    def client_disconnected(self, client) -> None:
        fc = self.current.get(client.id)
        if fc is not None and not fc.done:
            self._finish(fc, Ending.DISCONNECTED)
        self.current.pop(client.id, None)
        self.writers.pop(client.id, None)

    def _settle_forward(self, fc: FlowCtx, up: int, down: int) -> None:
        rt = self.gw.runtime
        c = rt.settle(fc.cred, up, down, fc.reserved, requests=0)
        fc.reserved = 0
        fc.trial_spent += c.trial_bytes
        fc.nanocents += c.nanocents

    def _finish(self, fc: FlowCtx, ending: Ending, flow: http.HTTPFlow | None = None) -> None:
        """End *fc*: settle or release its bytes as ``billing.bill`` decides, with its receipt."""
        b: Bill = bill(flow_outcome(fc, ending, flow))
        fc.done = True
        if fc.kind == FORWARD:  # the bytes billed; a tunnel's are counted as they are settled
            self.gw.metrics.moved(FORWARD_KIND, b.up, b.down)
        rt = self.gw.runtime
        if self.current.get(fc.client_id) is fc:
            del self.current[fc.client_id]
        self.gw.free_tunnel_slot(fc)
        if fc.account.tunnels.get(fc.client_id) is fc:
            del fc.account.tunnels[fc.client_id]
        if fc.kind == TUNNEL:
            # a tunnel's used bytes always reached the other side: settle them, and
            # give back the rest of its block
            self._settle_tunnel(fc, release=True)
        if not b.charged:
            rt.release(fc.cred, fc.reserved)
            fc.reserved = 0
            return
        if fc.kind == FORWARD:
            self._settle_forward(fc, b.up, b.down)
        receipt = (
            fc.request_id,
            fc.account.id,
            fc.cred.id,
            fc.method,
            fc.host,
            fc.port,
            b.status,
            b.up,
            b.down,
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
                    if fc is None:  # a slot taken, its flow not yet admitted
                        continue
                    fc.cut = Cut.SUSPENDED
                    self.gw.cut_client(cid)


def _refusal(rt: Any, cred: Any) -> DatorusError | None:
    """The error ``Runtime.admit`` refuses *cred*'s next request with, or None."""
    try:
        rt.admit(cred)
    except DatorusError as e:
        return e
    return None
