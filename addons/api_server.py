"""Serve the REST API from the gateway process, as a task in mitmproxy's event loop.

The API listens on ``api_host:api_port`` (0: off); under ``datorus serve`` every worker
serves it on the same port (``SO_REUSEPORT``, see ``datorus_core.listeners``), so it
stays up while the workers restart one at a time. Its socket is bound at start-up,
so a port in use stops the gateway with a clear message instead of running without
its API. Requests that touch SQLite, SMTP or Stripe run in worker threads; the
event loop only parses HTTP and reads the live rate-limit state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from mitmproxy import ctx

from datorus_core import listeners
from datorus_core.api import create_app

from .context import Gateway
from .failclosed import fatal

log = logging.getLogger("datorus")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: mitmproxy owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on *host*:*port* (IPv4 or IPv6 literal or name)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def listen(host: str, port: int) -> list[socket.socket]:
    """The API's listening sockets: under ``datorus serve``, the ones every worker shares
    (``SO_REUSEPORT``, opened by the launcher); else one of its own."""
    if listeners.shared_by_launcher():
        socks = listeners.take(host, port) or listeners.open_shared(host, port)
        for sock in socks:
            sock.setblocking(False)
        return socks
    return [bind(host, port)]


def own_proxy_url() -> str:
    """The gateway's own proxy port as a URL this process can reach (for POST /fetch)."""
    host = ctx.options.listen_host or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{ctx.options.listen_port or 8080}/"


class ApiServer:
    """Start the REST API when the gateway runs; stop it when the gateway stops."""

    name = "datorus_api"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.server: _EmbeddedServer | None = None
        self.task: asyncio.Task | None = None

    def running(self) -> None:
        s = self.gw.settings
        if not s.get("api_port"):
            return
        try:
            socks = listen(s["api_host"], s["api_port"])
        except OSError as e:
            fatal(f"REST API cannot listen on {s['api_host']}:{s['api_port']}: {e}")
            return
        try:
            app = create_app(
                s,
                runtime=self.gw.runtime,
                router=self.gw.router,
                proxy_url=own_proxy_url(),
                hot_status=lambda: self.gw.hot.status(),
            )
        except Exception as e:
            for sock in socks:
                sock.close()
            fatal(f"REST API cannot open the ledger {s['db']}: {e}")
            return
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=5
        )
        self.server = _EmbeddedServer(config)
        self.task = asyncio.get_running_loop().create_task(
            self.server.serve(sockets=socks), name="datorus api"
        )
        log.info("datorus: REST API on http://%s:%d", s["api_host"], s["api_port"])

    async def done(self) -> None:
        if self.server is None or self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
            await asyncio.wait_for(self.task, 10)
