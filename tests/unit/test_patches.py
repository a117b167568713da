"""Guards of ``addons/patches.py``: the mitmproxy internal it replaces still has the shape
it was written against (an upgrade that changes it fails here, not in production)."""

from __future__ import annotations

import asyncio
import inspect
import socket

from mitmproxy import version
from mitmproxy.proxy import mode_servers

from addons import patches
from datorus_core import listeners
from datorus_core.workers import LISTEN_FDS_ENV


def test_mitmproxy_is_the_version_the_patch_was_written_for():
    assert version.VERSION == "12.2.3"


def test_mitmproxy_still_opens_tcp_modes_with_start_server_in_listen():
    src = inspect.getsource(mode_servers.AsyncioServerInstance.listen)
    assert "asyncio.start_server(self.handle_stream, host, port)" in src
    assert list(inspect.signature(mode_servers.AsyncioServerInstance.listen).parameters) == [
        "self",
        "host",
        "port",
    ]
    start = inspect.getsource(mode_servers.AsyncioServerInstance._start)
    assert "self._servers = await self.listen(host, port)" in start


def test_install_swaps_listen_and_uninstall_restores_it():
    original = mode_servers.AsyncioServerInstance.listen
    patches.install()
    patches.install()  # idempotent
    try:
        assert mode_servers.AsyncioServerInstance.listen is patches._shared_listen
    finally:
        patches.uninstall()
    assert mode_servers.AsyncioServerInstance.listen is original


def test_a_patched_regular_mode_serves_the_inherited_socket(monkeypatch):
    """The patched listen of a real RegularInstance accepts on the launcher's socket."""
    shared = listeners.open_shared("127.0.0.1", 0)
    port = shared[0].getsockname()[1]
    monkeypatch.setenv(LISTEN_FDS_ENV, listeners.encode([("127.0.0.1", port, shared)]))
    fd = shared[0].fileno()

    class Mode:
        transport_protocol = "tcp"

    class Fake:
        mode = Mode()

        async def handle_stream(self, reader, writer):  # noqa: ANN001
            writer.write(b"hi")
            await writer.drain()
            writer.close()

    async def run() -> bytes:
        patches.install()
        try:
            servers = await mode_servers.AsyncioServerInstance.listen(Fake(), "127.0.0.1", port)
        finally:
            patches.uninstall()
        assert [s.sockets[0].fileno() for s in servers] == [fd]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await reader.read(2)
        writer.close()
        for s in servers:
            s.close()
        return data

    assert shared[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert asyncio.run(run()) == b"hi"
    shared[0].detach()  # the server closed the descriptor it took over
