"""Fail closed: a Datorus gateway that did not load completely must never relay.

mitmproxy keeps serving when a script or one of its addons raises while loading
(it logs the error and goes on without the addon), which for a proxy that
authenticates in an addon means an open proxy. So every Datorus addon's
``load``, ``configure`` and ``running`` is wrapped: any exception stops the
process with a message naming what failed. ``expect_start`` checks, once
mitmproxy has finished loading the script, that the addons were really
registered and configured, and stops the process otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("datorus")

LIFECYCLE = ("load", "configure", "running")


def fatal(message: str) -> None:
    """Stop start-up: say why on stderr and in the log, then exit non-zero."""
    log.error("datorus: %s", message)
    print(f"datorus: fatal: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def _describe(addon: Any, hook: str, exc: BaseException) -> str:
    name = getattr(addon, "name", type(addon).__name__)
    return f"{name}.{hook} failed: {type(exc).__name__}: {exc}"


def _wrap(addon: Any, hook: str, func: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def run_async(*args: Any) -> Any:
            try:
                return await func(*args)
            except Exception as e:
                fatal(_describe(addon, hook, e))

        return run_async

    @functools.wraps(func)
    def run(*args: Any) -> Any:
        try:
            return func(*args)
        except Exception as e:
            fatal(_describe(addon, hook, e))

    return run


def guard(addons: list[Any]) -> list[Any]:
    """Make every lifecycle hook of *addons* stop the process instead of raising."""
    for addon in addons:
        for hook in LIFECYCLE:
            func = getattr(addon, hook, None)
            if callable(func):
                setattr(addon, hook, _wrap(addon, hook, func))
    return addons


class StartCheck:
    """The last addon of the suite: it sees ``load`` and ``configure`` only if all did."""

    name = "datorus_startcheck"

    def __init__(self) -> None:
        self.loaded = False
        self.configured = False

    def load(self, loader: Any) -> None:
        self.loaded = True

    def configure(self, updated: set[str]) -> None:
        self.configured = True

    def expect_start(self, within: float = 30.0) -> None:
        """After the script finishes loading, stop the process unless the suite is live.

        mitmproxy loads a script synchronously inside one task step, so a callback
        scheduled now runs right after registration and the first ``configure``.
        Without a running loop (not expected), a timer thread does the same check.
        """

        def check() -> None:
            if not (self.loaded and self.configured):
                fatal(
                    "the Datorus addons did not load (see the error above); "
                    "refusing to run an open proxy"
                )

        try:
            asyncio.get_running_loop().call_soon(check)
        except RuntimeError:
            timer = threading.Timer(within, check)
            timer.daemon = True
            timer.start()
