"""Parsers found as plugins: the ``datorus.parsers`` entry-point group.

Any installed distribution that declares, in its ``pyproject.toml``::

    [project.entry-points."datorus.parsers"]
    pipes = "my_package.module:PipesParser"

adds the parser ``pipes`` with no change to Datorus (a class is instantiated with
no arguments; an instance is used as it is). Datorus's own ``plaintext``, ``json`` and
``csv`` are registered the same way in its ``pyproject.toml``. A plugin that fails to
load, or is no ``Parser``, is left out and listed with the reason (``failures``); it
never stops the gateway.

    >>> reg = installed_parsers()
    >>> {"plaintext", "json", "csv"} <= set(reg.names())
    True
    >>> pick_parser(b"10.0.0.1:3128\\n", "text/plain").name
    'plaintext'
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from typing import Any

from ..envelope import DatorusError, control_free, validation_error
from ..plugins import PluginFailure, load_group, safe_text
from .found import FoundProxy
from .parsers import Content, ParseDefaults, ParseError, Parser

log = logging.getLogger("datorus.sources")

GROUP = "datorus.parsers"
MAX_LIST_BYTES = 10 * 1024 * 1024  # the largest list a source may serve
_DEFAULT_PRIORITY = 50


@dataclass(frozen=True, slots=True)
class ParserPlugin:
    """One loaded parser and where it comes from."""

    name: str
    package: str  # the distribution that registered it
    version: str
    module: str
    parser: Parser

    def info(self) -> dict[str, Any]:
        """What ``GET /stats/plugins`` shows of it."""
        return {
            "name": self.name,
            "type": type(self.parser).__name__,
            "package": self.package,
            "version": self.version,
            "module": self.module,
            "loaded": True,
        }


@dataclass(frozen=True, slots=True)
class ParserRegistry:
    """The parsers found, in the order ``pick_parser`` tries them, and the failures."""

    plugins: tuple[ParserPlugin, ...]
    failures: tuple[PluginFailure, ...] = ()

    def names(self) -> list[str]:
        """The loaded parsers' names, in pick order."""
        return [p.name for p in self.plugins]

    def get(self, name: str) -> ParserPlugin | None:
        """The parser called *name*, if one is loaded."""
        return next((p for p in self.plugins if p.name == name), None)


def _load(ep: EntryPoint) -> Parser:
    obj = ep.load()
    if isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, Parser):
        raise TypeError("it is not a Parser (name, supports(), parse())")
    if obj.name != ep.name:
        raise TypeError("its name differs from its entry point's name")
    return obj


def discover_parsers(eps: Iterable[EntryPoint] | None = None) -> ParserRegistry:
    """Load every parser of the ``datorus.parsers`` group (or of *eps*).

    The first of two with one name wins (distributions in name order); the second is a
    failure. Pick order: each parser's ``priority`` (default 50, lower first), then name.
    """
    found, failures = load_group(GROUP, "parser", _load, eps)
    loaded = [ParserPlugin(p.name, p.package, p.version, p.module, p.obj) for p in found]

    def order(p: ParserPlugin) -> tuple[int, str]:
        prio = getattr(p.parser, "priority", _DEFAULT_PRIORITY)
        return (prio if isinstance(prio, int) else _DEFAULT_PRIORITY, p.name)

    return ParserRegistry(tuple(sorted(loaded, key=order)), tuple(failures))


@functools.cache
def installed_parsers() -> ParserRegistry:
    """The installed parsers, loaded once per process (a new plugin needs a restart)."""
    return discover_parsers()


def pick_parser(
    content: Content,
    content_type: str | None,
    name: str | None = None,
    registry: ParserRegistry | None = None,
) -> Parser:
    """The parser called *name*, else the first whose ``supports()`` is true.

    An unknown name: ``VALIDATION_ERROR`` with ``details.field`` ``parser_name``; none
    fits: ``VALIDATION_ERROR`` with ``details.field`` ``content``.
    """
    reg = registry or installed_parsers()
    if name is not None:
        control_free("parser_name", name)
        plugin = reg.get(name)
        if plugin is None:
            raise validation_error(
                "parser_name",
                "no parser of this name is installed",
                f"Unknown parser; installed: {', '.join(reg.names()) or 'none'}.",
            )
        return plugin.parser
    for plugin in reg.plugins:
        try:
            if plugin.parser.supports(content, content_type):
                return plugin.parser
        except Exception as e:  # a plugin's bug: it does not fit
            log.warning("datorus: parser %r failed in supports(): %s", plugin.name, type(e))
    raise validation_error(
        "content",
        "no installed parser reads this content",
        f"No parser reads this list; installed: {', '.join(reg.names()) or 'none'}.",
    )


@dataclass(frozen=True, slots=True)
class ParseOutcome:
    """What a list named: distinct proxies, entries skipped (bad) and duplicates dropped."""

    proxies: tuple[FoundProxy, ...]
    skipped: int
    duplicates: int
    problems: tuple[str, ...]


def check_size(content: Content, limit: int = MAX_LIST_BYTES) -> None:
    """``VALIDATION_ERROR`` (``details.field`` ``content``) for a list over *limit* bytes.

    >>> check_size(b"x" * 11, limit=10)
    Traceback (most recent call last):
    ...
    datorus_core.envelope.DatorusError: VALIDATION_ERROR: The list is larger than 10 bytes.
    """
    size = len(content) if isinstance(content, bytes) else len(content.encode(errors="replace"))
    if size > limit:
        raise validation_error(
            "content", f"larger than {limit} bytes", f"The list is larger than {limit} bytes."
        )


def parse_list(parser: Parser, content: Content, defaults: ParseDefaults) -> ParseOutcome:
    """Run *parser* on *content*: the size capped, bad entries counted, duplicates dropped.

    Content that is no list at all (the parser's ``ParseError``, or any other exception
    of a plugin): ``VALIDATION_ERROR`` with ``details.field`` ``content``.
    """
    check_size(content)
    try:
        result = parser.parse(content, defaults)
    except DatorusError:
        raise
    except ParseError as e:
        why = safe_text(str(e))
        raise validation_error("content", why, f"Unreadable list: {why}.") from None
    except Exception as e:  # a plugin's bug: its message may hold a line, so not shown
        log.warning("datorus: parser %r failed: %s", parser.name, type(e).__name__)
        why = f"the parser {parser.name} failed ({type(e).__name__})"
        raise validation_error("content", why, f"Unreadable list: {why}.") from None
    skipped = getattr(result, "skipped", 0)
    skipped = skipped if isinstance(skipped, int) else 0
    problems = getattr(result, "problems", [])
    seen: dict[tuple[str, str, int, str | None], FoundProxy] = {}
    duplicates = 0
    for p in result:
        if not isinstance(p, FoundProxy):
            skipped += 1
        elif p.key in seen:
            duplicates += 1
        else:
            seen[p.key] = p
    return ParseOutcome(
        tuple(seen.values()),
        skipped,
        duplicates,
        tuple(safe_text(str(x)) for x in problems[:20]) if isinstance(problems, list) else (),
    )
