"""The one module that holds Datorus's patches of mitmproxy internals for ``datorus serve``.

**Patched:** ``mitmproxy.proxy.mode_servers.AsyncioServerInstance.listen`` (mitmproxy
12.2.3, pinned in pyproject.toml), the method that opens a proxy mode's listening
sockets with ``asyncio.start_server(self.handle_stream, host, port)``.

**Why:** ``datorus serve`` runs several mitmdump workers that accept on one port, and
mitmproxy has no option for ``SO_REUSEPORT`` nor for a socket it did not open itself.
Patched, a TCP mode serves the sockets its launcher opened and handed down
(``datorus_core.listeners``: one ``SO_REUSEPORT`` socket per worker slot, kept by the
launcher, so a restarted worker's queued connections are never reset); for an address
the launcher did not open, it binds its own socket with ``SO_REUSEPORT``. UDP modes,
port 0 and every process not started by ``datorus serve`` keep mitmproxy's own code.

**When:** only in workers, by :func:`install`, which ``addons/serve_worker.py`` calls
before mitmproxy starts: mitmproxy opens its sockets before ``-s`` scripts are loaded,
so an addon would be too late.

**Guarded by:** ``tests/unit/test_patches.py`` (mitmproxy's ``listen`` still has the
shape this patch replaces) and ``tests/e2e/test_serve.py`` (two workers accept on one
port; a rolling restart refuses nothing).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from datorus_core import listeners

log = logging.getLogger("datorus")

_installed: dict[str, Any] = {}


async def _shared_listen(self: Any, host: str, port: int) -> list[Any]:
    """``AsyncioServerInstance.listen`` for a ``datorus serve`` worker."""
    original = _installed["listen"]
    if self.mode.transport_protocol != "tcp" or not port:
        return await original(self, host, port)
    socks = listeners.take(host, port)
    if socks:
        return [await asyncio.start_server(self.handle_stream, sock=s) for s in socks]
    log.info("datorus: %s:%d was not opened by datorus serve; binding it here", host, port)
    return [await asyncio.start_server(self.handle_stream, host or None, port, reuse_port=True)]


def install() -> None:
    """Make mitmproxy's TCP proxy modes listen on the launcher's shared sockets (idempotent)."""
    from mitmproxy.proxy import mode_servers

    cls = mode_servers.AsyncioServerInstance
    if "listen" not in _installed:
        _installed["listen"] = cls.listen
        cls.listen = _shared_listen  # type: ignore[method-assign]  # the patch itself


def uninstall() -> None:
    """Restore mitmproxy's own ``listen``."""
    from mitmproxy.proxy import mode_servers

    if "listen" in _installed:
        mode_servers.AsyncioServerInstance.listen = _installed.pop("listen")  # type: ignore[method-assign]
