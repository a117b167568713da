"""A third-party Datorus parser: one ``host;port`` a line (``;`` instead of ``:``)."""

from __future__ import annotations

from datorus_core.sources.found import FoundProxy, InvalidEntry
from datorus_core.sources.parsers import Content, ParseDefaults, ParseResult, text_of


class SemicolonParser:
    """``host;port`` lines; blank lines skipped, bad ones counted."""

    name = "semicolon"

    def supports(self, content: Content, content_type: str | None) -> bool:
        """The first non-blank line is ``something;digits``."""
        for line in text_of(content[:4096]).splitlines():
            if line.strip():
                host, sep, port = line.strip().rpartition(";")
                return bool(sep and host and port.isdigit())
        return False

    def parse(self, content: Content, defaults: ParseDefaults) -> ParseResult:
        """Every ``host;port`` line as a proxy of the source's default protocol."""
        out = ParseResult()
        for n, line in enumerate(text_of(content).splitlines(), 1):
            if not line.strip():
                continue
            host, _, port = line.strip().rpartition(";")
            try:
                if not port.isdigit():
                    raise InvalidEntry("the port must be 1-65535")
                out.append(FoundProxy(defaults.protocol, host, int(port), country=defaults.country))
            except InvalidEntry as e:
                out.skip(f"line {n}", str(e))
        return out
