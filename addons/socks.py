"""The SOCKS5 entry: RFC 1928 with RFC 1929 username/password, on ``socks5_port``.

mitmproxy runs it as a second proxy mode in the same process (``socks5@PORT`` beside
the regular mode, added when the gateway runs; under ``datorus serve`` on the sockets
the launcher opened for every worker). Each SOCKS5 request is turned into the CONNECT
it stands for and judged by every Datorus addon exactly as an HTTP client's CONNECT
is (``serve_socks5`` in ``addons/patches.py``): auth (the credentials and username
options of RFC 1929, checked in ``ProxyAuth.socks5_auth``), acceptable use on the
resolved address, rate limits and the open-tunnel cap, metering and billing with a
receipt, egress and sticky sessions, block detection, the upstream timeout, and
suspension closing the tunnel. This addon only translates: the method a client gets
(:func:`datorus_core.socks.choose_method`: "no authentication" only from an
allow-listed address), the CONNECT a request stands for, and the SOCKS5 reply for
the gateway's answer (:func:`datorus_core.socks.reply_for`), whose Datorus code the
log names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from mitmproxy import ctx, http

from datorus_core import listeners, socks
from datorus_core.envelope import utc_timestamp
from datorus_core.metrics import SOCKS5 as SOCKS5_KIND

from . import patches
from .context import Gateway, flow_ctx
from .failclosed import fatal

log = logging.getLogger("datorus")

_LISTEN_WAIT = 10.0  # seconds the SOCKS5 port may take to listen once the gateway runs


class Socks5Entry(patches.SocksGate):
    """Serve ``socks5_port`` and translate between SOCKS5 and the CONNECT path."""

    name = "datorus_socks5"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._undo: patches.Undo | None = None
        self.waiter: asyncio.Task | None = None

    def load(self, loader: Any) -> None:
        self._undo = patches.serve_socks5(self)

    def done(self) -> None:
        if self.waiter is not None:
            self.waiter.cancel()
        if self._undo is not None:
            self._undo()
            self._undo = None

    def running(self) -> None:
        port = self.gw.settings.get("socks5_port", 0)
        if not port:
            return
        spec = f"socks5@{port}"
        if spec not in ctx.options.mode:
            host = ctx.options.listen_host
            # a port taken by another program: mitmproxy would log its own bind error and
            # exit 1 without naming the setting (a serve worker's launcher bound it already)
            if not listeners.shared_by_launcher():
                why = listeners.cannot_listen(host, port)
                if why is not None:
                    fatal(
                        f"datorus_socks5_port: cannot listen on {host or '*'}:{port}:"
                        f" {why.strerror or why}"
                    )
                    return
            # mitmproxy binds the modes it was started with before scripts load: a mode
            # added now is started by its proxy server at once
            ctx.options.update(mode=[*ctx.options.mode, spec])
        self.waiter = asyncio.get_running_loop().create_task(self._listening(port))

    async def _listening(self, port: int) -> None:
        """Stop the gateway if the SOCKS5 port does not listen (fail closed, loudly)."""
        deadline = time.monotonic() + _LISTEN_WAIT
        while time.monotonic() < deadline:
            if any(addr[1] == port for addr in patches.listening_addresses()):
                return
            await asyncio.sleep(0.05)
        host = ctx.options.listen_host or "*"
        fatal(f"datorus_socks5_port: cannot listen on {host}:{port} (in use, or not allowed)")

    # -- the gate (patches.SocksGate) --------------------------------------------------

    def method(self, client: Any, offered: bytes) -> int:
        rt = self.gw.runtime
        peer = client.peername[0] if client.peername else None
        # before the ledger is loaded nobody is known: a no-auth client goes on, and its
        # CONNECT (which waits for the ledger) decides
        listed = not rt.loaded or rt.allowed_credential(peer) is not None
        method = socks.choose_method(offered, listed)
        if method == socks.NO_ACCEPTABLE:
            # no credentials from an address not allow-listed: what a CONNECT without
            # Proxy-Authorization gets, counted as that 407
            self.gw.metrics.answered(SOCKS5_KIND, 407, "INVALID_CREDENTIAL")
        return method

    def unsupported(self, client: Any, reply: int) -> None:
        # a command other than CONNECT (0x07) or an unknown address type (0x08): a request
        # the gateway does not serve, counted as the 400 an unparseable request gets
        self.gw.metrics.answered(SOCKS5_KIND, 400, "VALIDATION_ERROR")

    def connect_head(
        self, client: Any, atyp: int, host: str, port: int, user: str | None, password: str | None
    ) -> bytes | int:
        target = socks.authority(atyp, host, port)
        if target is None:
            log.info("datorus: SOCKS5 request for %r:%d refused: not a host name", host[:80], port)
            self.gw.metrics.answered(SOCKS5_KIND, 400, "VALIDATION_ERROR")  # as a bad CONNECT host
            return socks.HOST_UNREACHABLE
        return socks.connect_head(target, user, password)

    def answered(self, client: Any, status: int, body: bytes) -> int:
        code, reason, request_id = _envelope(body)
        reply = socks.reply_for(status, code, reason)
        if reply != socks.SUCCEEDED:
            peer = client.peername[0] if client.peername else "?"
            log.info(
                "datorus: SOCKS5 CONNECT from %s refused with 0x%02x: %s %s (request %s)%s",
                peer,
                reply,
                status or "-",
                code or "no answer",
                request_id or "-",
                f", {reason[:120]}" if reason else "",
            )
        return reply

    def reply(self, code: int) -> bytes:
        return socks.reply(code)

    # -- the receipt of a refusal --------------------------------------------------------

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        """A refused SOCKS5 request of a known credential leaves a receipt with its Datorus
        code (its client only sees the reply byte): nothing moved, nothing is charged."""
        if getattr(flow.client_conn.proxy_mode, "type_name", "") != "socks5":
            return
        fc = flow_ctx(flow)
        if fc is None or fc.cred is None or fc.account is None or flow.response is None:
            return
        code = _envelope(flow.response.content or b"")[0] or "UPSTREAM_FAILED"
        self.gw.runtime.record_receipt(
            (
                fc.request_id,
                fc.account.id,
                fc.cred.id,
                fc.method,
                fc.host,
                fc.port,
                flow.response.status_code,
                0,
                0,
                0,
                0,
                utc_timestamp(fc.started),
                utc_timestamp(time.time()),
                code,
            )
        )


def _envelope(body: bytes) -> tuple[str, str, str]:
    """``(code, details.reason, requestId)`` of an error envelope ('' where absent)."""
    if not body:
        return "", "", ""
    try:
        err = json.loads(body)["error"]
        details = err.get("details") or {}
        return str(err.get("code", "")), str(details.get("reason", "")), str(err.get("requestId"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", "", ""
