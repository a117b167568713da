"""Checkers found as plugins: the ``datorus.checkers`` entry-point group.

Any installed distribution that declares, in its ``pyproject.toml``::

    [project.entry-points."datorus.checkers"]
    blacklist = "my_package.module:BlacklistChecker"

adds the checker ``blacklist`` with no change to Datorus (a class is instantiated with
no arguments; an instance is used as it is). Datorus's own ``tcp_connect`` and
``http_anonymity`` are registered the same way in its ``pyproject.toml``. A plugin that
fails to load, or is no ``Checker`` (``name``, an int ``stage`` >= 1 and ``priority``,
an async ``check``), is left out and listed with the reason; it never stops the
gateway. Loading is :func:`datorus_core.plugins.load_group`'s, as for the parsers.

    >>> reg = installed_checkers()
    >>> [(p.name, p.stage) for p in reg.plugins][:2]
    [('tcp_connect', 1), ('http_anonymity', 2)]
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from typing import Any

from ..plugins import PluginFailure, load_group
from .base import Checker

log = logging.getLogger("datorus.checkers")

GROUP = "datorus.checkers"
MAX_STAGE = 99


@dataclass(frozen=True, slots=True)
class CheckerPlugin:
    """One loaded checker and where it comes from."""

    name: str
    package: str  # the distribution that registered it
    version: str
    module: str
    checker: Checker

    @property
    def stage(self) -> int:
        """Its stage (1 first)."""
        return int(self.checker.stage)

    @property
    def priority(self) -> int:
        """Its order within the stage (lower first)."""
        return int(self.checker.priority)

    def info(self) -> dict[str, Any]:
        """What ``GET /stats/plugins`` shows of it (before its health)."""
        return {
            "name": self.name,
            "type": type(self.checker).__name__,
            "stage": self.stage,
            "priority": self.priority,
            "package": self.package,
            "version": self.version,
            "module": self.module,
            "loaded": True,
        }


@dataclass(frozen=True, slots=True)
class CheckerRegistry:
    """The checkers found, in the order a check runs them, and the failures."""

    plugins: tuple[CheckerPlugin, ...]
    failures: tuple[PluginFailure, ...] = ()

    def names(self) -> list[str]:
        """The loaded checkers' names, in run order."""
        return [p.name for p in self.plugins]

    def get(self, name: str) -> CheckerPlugin | None:
        """The checker called *name*, if one is loaded."""
        return next((p for p in self.plugins if p.name == name), None)

    @property
    def last_stage(self) -> int:
        """The highest stage of any loaded checker (0 for none)."""
        return max((p.stage for p in self.plugins), default=0)


def _load(ep: EntryPoint) -> Checker:
    obj = ep.load()
    if isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, Checker):
        raise TypeError("it is not a Checker (name, stage, priority, async check())")
    if obj.name != ep.name:
        raise TypeError("its name differs from its entry point's name")
    for attr in ("stage", "priority"):
        value = getattr(obj, attr)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"its {attr} is not an int")
    if not 1 <= obj.stage <= MAX_STAGE:
        raise TypeError(f"its stage must be 1-{MAX_STAGE}")
    if not inspect.iscoroutinefunction(obj.check):
        raise TypeError("its check() is not a coroutine function (async def)")
    return obj


def discover_checkers(eps: Iterable[EntryPoint] | None = None) -> CheckerRegistry:
    """Load every checker of the ``datorus.checkers`` group (or of *eps*).

    The first of two with one name wins (distributions in name order); the second is a
    failure. Run order: stage, then priority (lower first), then name.
    """
    found, failures = load_group(GROUP, "checker", _load, eps)
    loaded = [CheckerPlugin(p.name, p.package, p.version, p.module, p.obj) for p in found]
    order = sorted(loaded, key=lambda p: (p.stage, p.priority, p.name))
    return CheckerRegistry(tuple(order), tuple(failures))


@functools.cache
def installed_checkers() -> CheckerRegistry:
    """The installed checkers, loaded once per process (a new plugin needs a restart)."""
    return discover_checkers()
