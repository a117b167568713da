"""The hot state shared between ``datorus serve``'s workers, when ``datorus_redis_url`` is set.

Without it the gateway keeps its hot state in the process
(:class:`~datorus_core.hotstate.local.LocalHotState`, the embedded default). With it,
every worker reaches the same Redis (:class:`~datorus_core.hotstate.redis_state.RedisHotState`):
rate limits, tunnel slots, failed logins, byte credit and sticky sessions are then
the gateway's as a whole, and blocks and leases one worker learns of reach the others.
More than one worker without a Redis URL is refused at start (the workers would each
apply every limit in full).
"""

from __future__ import annotations

import logging

from datorus_core.hotstate.base import Listener
from datorus_core.workers import worker_info

from .context import Gateway
from .failclosed import fatal

log = logging.getLogger("datorus")


class SharedState:
    """Choose the hot state at start, connect it when the gateway runs."""

    name = "datorus_shared"

    def __init__(self, gw: Gateway, listener: Listener) -> None:
        self.gw = gw
        self.listener = listener

    def configure(self, updated: set[str]) -> None:
        if "datorus_redis_url" not in updated or self.gw.hot.shared:
            return
        url = self.gw.settings.get("redis_url") or ""
        info = worker_info()
        if not url:
            if info.count > 1:
                fatal(
                    f"{info.count} workers need datorus_redis_url to share their state"
                    " (--set datorus_redis_url=redis://127.0.0.1:6379/0)"
                )
            return
        from datorus_core.hotstate.redis_state import RedisHotState

        self.gw.hot = RedisHotState(self.gw.settings, url, workers=info.count)
        log.info("datorus: hot state shared through %s (%d workers)", _public(url), info.count)

    async def running(self) -> None:
        await self.gw.hot.start(self.listener)


def _public(url: str) -> str:
    """*url* without its password, for the log."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"
