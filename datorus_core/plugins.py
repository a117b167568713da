"""Loading plugins: one entry-point group at a time, the same way for every kind.

Parsers (``datorus.parsers``) and checkers (``datorus.checkers``) are found through
entry points of installed distributions. :func:`load_group` loads one group: entry
points in distribution-name order, a name taken once (the first wins), each object made
and vetted by the kind's own *load* function; whatever fails is left out and kept as a
:class:`PluginFailure` with the reason (a broken plugin never stops the gateway). Each
kind's registry (``datorus_core.sources.registry``, ``datorus_core.checkers.registry``)
then orders what loaded as its use needs.

    >>> found, failed = load_group("datorus.parsers", "parser", lambda ep: ep.load())
    >>> {"plaintext", "json", "csv"} <= {p.name for p in found}, failed
    (True, [])
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .envelope import has_control

__all__ = ["Loaded", "PluginFailure", "load_group", "safe_text"]

log = logging.getLogger("datorus.plugins")

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class Loaded[T]:
    """One plugin that loaded, and where it comes from."""

    name: str
    package: str  # the distribution that registered it
    version: str
    module: str
    obj: T


@dataclass(frozen=True, slots=True)
class PluginFailure:
    """An entry point that did not give a usable plugin, and why."""

    name: str
    package: str
    version: str
    module: str
    error: str

    def info(self) -> dict[str, Any]:
        """What ``GET /stats/plugins`` shows of it."""
        return {
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "module": self.module,
            "loaded": False,
            "error": self.error,
        }


def _origin(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "", ""
    return str(dist.name), str(dist.version)


def safe_text(text: str) -> str:
    """*text* with control characters blanked, at most 200 characters (for a reason shown)."""
    return "".join(c if not has_control(c) else " " for c in text)[:200]


def load_group[T](
    group: str,
    kind: str,
    load: Callable[[EntryPoint], T],
    eps: Iterable[EntryPoint] | None = None,
) -> tuple[list[Loaded[T]], list[PluginFailure]]:
    """Every plugin of entry-point *group* (or of *eps*) that *load* accepts, and the
    failures. *load* makes the object of one entry point and raises to refuse it; *kind*
    names the plugins in the warning logged for each failure."""
    found = list(entry_points(group=group) if eps is None else eps)
    found.sort(key=lambda ep: (_origin(ep)[0].lower(), ep.name))
    loaded: dict[str, Loaded[T]] = {}
    failures: list[PluginFailure] = []
    for ep in found:
        package, version = _origin(ep)

        def fail(why: str, ep: EntryPoint = ep, package: str = package, v: str = version) -> None:
            log.warning("datorus: %s plugin %r from %s not loaded: %s", kind, ep.name, package, why)
            failures.append(PluginFailure(safe_text(ep.name), package, v, ep.module, why))

        if not _NAME.fullmatch(ep.name):
            fail("its name must be 1-64 of a-z, 0-9, _ . - (starting with a letter or digit)")
            continue
        if ep.name in loaded:
            fail(f"the name is taken by {loaded[ep.name].package or 'another plugin'}")
            continue
        try:
            obj = load(ep)
        except Exception as e:  # a broken plugin is reported, never fatal
            fail(safe_text(f"{type(e).__name__}: {e}"))
            continue
        loaded[ep.name] = Loaded(ep.name, package, version, ep.module, obj)
    return list(loaded.values()), failures
