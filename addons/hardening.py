"""Limits on what a client (or a target) can make the gateway hold: head size, time to send it.

- **Head size.** mitmproxy buffers an HTTP/1 request or response head until its
  blank line with no bound at all (``_http1`` says ``FIXME: protect against header
  size DoS``). This addon bounds both sides (*internal*: ``bound_request_heads`` and
  ``bound_response_heads`` in ``addons/patches.py``): a client head over
  ``MAX_HEAD_BYTES`` (start line, fields and the blank line, however they are split
  and however slowly they come) gets ``400 VALIDATION_ERROR`` and the connection is
  closed; a target's gets ``502 UPSTREAM_FAILED``. The size is checked before
  mitmproxy parses a head, not after: a head that ends in the read which takes it
  past the limit is refused too, never forwarded. More than ``MAX_HEADERS`` request
  header fields, control characters in a value or an unknown HTTP version is a
  ``400`` too (:func:`malformed`, called by ``ProxyAuth``, the first hook to see a
  request).
- **Bodies nobody wants.** When the gateway answers a request itself before its body
  arrived (407, 402, 403, 429...), mitmproxy would still buffer the whole body before
  answering: the body is dropped as it comes instead. A client that sends more than
  ``MAX_PIPELINED_BYTES`` while its request is being answered is disconnected
  (``drop_answered_request_bodies`` and ``bound_pipelined_bytes`` in ``patches.py``).
- **Slow clients.** A client must finish its request head within ``header_timeout``
  seconds of connecting (slowloris), and an idle kept-alive connection is closed
  after ``keepalive_timeout`` seconds. mitmproxy is one event loop, so a slow client
  never blocks others; these timers bound the memory and sockets it can hold.
"""

from __future__ import annotations

import asyncio
import re
import time

from mitmproxy import http

from . import patches
from .context import FORWARD, Gateway, flow_ctx

MAX_HEADERS = 100
_SWEEP_SECONDS = 0.5
MAX_HEAD_BYTES = 64 * 1024
MAX_PIPELINED_BYTES = 1024 * 1024
_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1", "HTTP/2.0"})
# RFC 9110 5.5: no control characters in a field value (HTAB is allowed). Values are
# checked joined by LF (which no parsed value can hold), names joined by NUL: two regex
# scans per request instead of two per field.
_BAD_VALUES = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
_TOKENS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:\x00[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def malformed(req: http.Request) -> tuple[str, str] | None:
    """``(field, reason)`` if a parsed request head is still not acceptable, else None.

    mitmproxy's parser accepts some heads that must not be relayed: unknown HTTP
    versions, control characters in header values, too many fields.
    """
    if req.http_version not in _VERSIONS:
        return "version", f"unsupported HTTP version {req.http_version[:20]!r}"
    fields = req.headers.fields
    if len(fields) > MAX_HEADERS:
        return "headers", f"more than {MAX_HEADERS} fields"
    if not fields:
        return None
    names = b"\x00".join([f[0] for f in fields])
    values = b"\n".join([f[1] for f in fields])
    if _TOKENS.fullmatch(names) is not None and _BAD_VALUES.search(values) is None:
        return None
    for name, value in fields:  # the rare bad request: say which field
        if _BAD_VALUE.search(value) is not None or _TOKEN.fullmatch(name) is None:
            return "headers", f"invalid header field {name[:40].decode('latin-1')!r}"
    return None


class Hardening:
    """Bound head sizes and the time a client may take to send a request head."""

    name = "datorus_hardening"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        # client id -> monotonic deadline; one sweep a half second closes the late ones
        # (cheaper per request than an asyncio timer armed and cancelled each time)
        self.deadlines: dict[str, float] = {}
        self.sweeper: asyncio.Task | None = None
        self._undo: list[patches.Undo] = []

    def load(self, loader) -> None:
        # deliberate patches of mitmproxy's methods (see the module docstring)
        self._undo = [
            patches.bound_request_heads(MAX_HEAD_BYTES),
            patches.bound_response_heads(MAX_HEAD_BYTES),
            patches.bound_pipelined_bytes(MAX_PIPELINED_BYTES),
            patches.drop_answered_request_bodies(),
        ]

    def running(self) -> None:
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def done(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        for undo in self._undo:
            undo()
        self._undo = []

    # -- timers ------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            now = time.monotonic()
            late = [cid for cid, t in self.deadlines.items() if t <= now]
            for cid in late:
                del self.deadlines[cid]
                self.gw.cut_client(cid)

    def _arm(self, client_id: str, seconds: float) -> None:
        self.deadlines[client_id] = time.monotonic() + seconds

    def _disarm(self, client_id: str) -> None:
        self.deadlines.pop(client_id, None)

    # -- hooks -------------------------------------------------------------------------

    def client_connected(self, client) -> None:
        self._arm(client.id, self.gw.settings["header_timeout"])

    def client_disconnected(self, client) -> None:
        self._disarm(client.id)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn.id)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn.id)

    def response(self, flow: http.HTTPFlow) -> None:
        # the connection may now sit idle until the client's next request (unless its
        # upload still goes on); an upgraded one (101) and a tunnel are not idle
        if flow.request.timestamp_end is not None:
            self._idle(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.timestamp_end is not None:
            self._idle(flow)  # the upload ended after its response

    def _idle(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.status_code != 101:
            fc = flow_ctx(flow)
            if fc is None or fc.kind == FORWARD:
                self._arm(flow.client_conn.id, self.gw.settings["keepalive_timeout"])
