"""Parsers of proxy lists: the ``Parser`` protocol and the shipped ``plaintext``, ``json``
and ``csv``.

A parser is any object with a ``name``, ``supports(content, content_type)`` (does this
look like a list I read?) and ``parse(content, defaults)`` (the proxies it names). The
shipped ones are registered as plugins like any third party's (``registry``)::

    >>> found = PlaintextParser().parse(
    ...     "# provider list\\n10.0.0.1:3128\\nsocks5://u:p@[2001:db8::1]:1080\\nnot a proxy\\n",
    ...     ParseDefaults(),
    ... )
    >>> [p.public_url() for p in found]
    ['http://10.0.0.1:3128', 'socks5://u:***@[2001:db8::1]:1080']
    >>> found.skipped, found.problems
    (1, ['line 4: the port is missing'])

A bad line (entry, row) is counted and skipped, never fatal; only content that is not a
list at all (JSON that does not parse, a CSV without a host and port column) raises
``ParseError``. Problems name the line and the reason, never the line's text (it may
carry a password).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import unquote

from .found import PROTOCOLS, FoundProxy, InvalidEntry

MAX_PROBLEMS = 20  # the problems a result keeps (the count goes on)
_SNIFF_CHARS = 64 * 1024  # how much of a list supports() reads
_SNIFF_LINES = 20  # plaintext: how many data lines supports() tries

Content = bytes | str


class ParseError(ValueError):
    """The content is not a list this parser reads at all (not: one bad line)."""


@dataclass(frozen=True, slots=True)
class ParseDefaults:
    """What a source says about the entries that do not say it themselves."""

    protocol: str = "http"
    country: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError("the default protocol must be http, https, socks4 or socks5")


class ParseResult(list[FoundProxy]):
    """The proxies a list names, with how many entries were skipped and why (a few)."""

    def __init__(self, items: Iterable[FoundProxy] = ()) -> None:
        super().__init__(items)
        self.skipped = 0
        self.problems: list[str] = []

    def skip(self, where: str, reason: str) -> None:
        """Count one bad entry at *where* (``line 3``), keeping the first few reasons."""
        self.skipped += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{where}: {reason}")


@runtime_checkable
class Parser(Protocol):
    """A proxy-list parser plugin (entry-point group ``datorus.parsers``).

    ``name`` is the entry point's name. An optional ``priority`` (int, default 50, lower
    first) orders the parsers when one is picked by ``supports()``.
    """

    name: str

    def supports(self, content: Content, content_type: str | None) -> bool:
        """Whether *content* (served with *content_type*) looks like a list this reads."""
        ...

    def parse(self, content: Content, defaults: ParseDefaults) -> list[FoundProxy]:
        """The proxies *content* names; a ``ParseResult`` also says what it skipped."""
        ...


def text_of(content: Content) -> str:
    """*content* as text: bytes are UTF-8 (a BOM dropped, bad bytes replaced)."""
    if isinstance(content, bytes):
        return content.decode("utf-8-sig", errors="replace")
    return content.removeprefix("\ufeff")


def _media_type(content_type: str | None) -> str:
    return (content_type or "").partition(";")[0].strip().lower()


def _port(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        digits = value.strip()
        if digits.isascii() and digits.isdigit() and len(digits) <= 5:
            return int(digits)
    raise InvalidEntry("the port must be 1-65535")


def _host_port(s: str) -> tuple[str, str, str]:
    """``host:port[:more]`` (``[v6]:port[:more]``) as (host, port text, more)."""
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise InvalidEntry("an IPv6 host's bracket is not closed")
        host, after = s[1:end], s[end + 1 :]
        if not after.startswith(":"):
            raise InvalidEntry("the port is missing")
        after = after[1:]
    else:
        host, colon, after = s.partition(":")
        if not colon:
            raise InvalidEntry("the port is missing")
    port_text, _, more = after.partition(":")
    return host, port_text, more


def _at_form(s: str, protocol: str, url: bool, country: str | None) -> FoundProxy:
    cred, _, hp = s.rpartition("@")
    host, port_text, more = _host_port(hp)
    if more:
        raise InvalidEntry("nothing may follow user:pass@host:port")
    user, colon, pw_text = cred.partition(":")
    pw = pw_text if colon else None
    if url:  # a URL's userinfo is percent-encoded
        user, pw = unquote(user), (unquote(pw) if pw is not None else None)
    return FoundProxy(protocol, host, _port(port_text), user, pw, country)


def _colon_form(s: str, protocol: str, country: str | None) -> FoundProxy:
    host, port_text, more = _host_port(s)
    user = pw = None
    if more:
        user, colon, pw = more.partition(":")
        if not colon:
            raise InvalidEntry("host:port:user needs :pass too")
    return FoundProxy(protocol, host, _port(port_text), user, pw, country)


def parse_line(line: str, defaults: ParseDefaults) -> FoundProxy:
    """One plaintext entry: ``host:port``, ``host:port:user:pass``, ``user:pass@host:port``
    or ``scheme://`` before either (IPv6 hosts in brackets).

    >>> parse_line("https://[::1]:8443", ParseDefaults()).url()
    'https://[::1]:8443'
    >>> parse_line("p.example:8080:bob:p@ss:word", ParseDefaults("socks5")).url()
    'socks5://bob:p%40ss%3Aword@p.example:8080'

    Without a scheme, ``host:port:user:pass`` is read first (a password may hold ``@``
    and ``:``) and ``user:pass@host:port`` when that fails; in a URL the userinfo is
    percent-encoded, so its ``@`` always ends it.
    """
    s = line.strip()
    protocol = defaults.protocol
    scheme, sep, rest = s.partition("://")
    if sep and scheme.isalnum():  # not "host:80:user:pa://ss"
        protocol = scheme.lower()
        if protocol not in PROTOCOLS:
            raise InvalidEntry("the scheme must be http, https, socks4 or socks5")
        s = rest.removesuffix("/")
        if "@" in s:
            return _at_form(s, protocol, True, defaults.country)
        return _colon_form(s, protocol, defaults.country)
    try:
        return _colon_form(s, protocol, defaults.country)
    except InvalidEntry:
        if "@" not in s:
            raise
    return _at_form(s, protocol, False, defaults.country)


def _first(fields: Mapping[str, object], *names: str) -> object:
    for n in names:
        v = fields.get(n)
        if v is not None and v != "":
            return v
    return None


def _text(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidEntry(f"the {what} must be text")


def from_fields(fields: Mapping[str, object], defaults: ParseDefaults) -> FoundProxy:
    """One entry given as named fields (a JSON object, a CSV row): ``ip``/``host``,
    ``port``, ``protocol``, ``user``/``username``, ``pass``/``password``, ``country``.

    >>> from_fields({"ip": "10.1.1.1", "port": "80", "country": "fr"}, ParseDefaults()).country
    'FR'
    """
    host = _text(_first(fields, "host", "ip"), "host")
    if host is None:
        raise InvalidEntry("the host is missing")
    port = _first(fields, "port")
    if port is None:
        raise InvalidEntry("the port is missing")
    protocol = _text(_first(fields, "protocol"), "protocol") or defaults.protocol
    user = _text(_first(fields, "username", "user"), "username")
    pw = _text(_first(fields, "password", "pass"), "password")
    country = _text(_first(fields, "country"), "country") or defaults.country
    return FoundProxy(protocol, host.strip(), _port(port), user, pw, country)


def _collect(
    entries: Iterable[tuple[str, object]],
    make: Callable[[object], FoundProxy],
) -> ParseResult:
    out = ParseResult()
    for where, entry in entries:
        try:
            out.append(make(entry))
        except InvalidEntry as e:
            out.skip(where, str(e))
    return out


def _data_lines(text: str) -> Iterable[tuple[str, str]]:
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            yield f"line {n}", s


class PlaintextParser:
    """One proxy a line; ``#`` comments and blank lines skipped (``parse_line``)."""

    name = "plaintext"
    priority = 90  # the most lenient sniffing: tried last

    def supports(self, content: Content, content_type: str | None) -> bool:
        """Any of the first data lines reads as a proxy (a JSON or CSV type: never)."""
        media = _media_type(content_type)
        if media.endswith(("json", "csv")):
            return False
        for i, (_, line) in enumerate(_data_lines(text_of(content[:_SNIFF_CHARS]))):
            if i >= _SNIFF_LINES:
                break
            try:
                parse_line(line, ParseDefaults())
            except InvalidEntry:
                continue
            return True
        return False

    def parse(self, content: Content, defaults: ParseDefaults) -> ParseResult:
        """Every line that names a proxy; the others counted in ``skipped``."""
        return _collect(
            _data_lines(text_of(content)),
            lambda line: parse_line(str(line), defaults),
        )


def _json_entries(doc: object) -> list[object] | None:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        for key in ("proxies", "items", "data"):
            if isinstance(doc.get(key), list):
                return list(doc[key])
    return None


class JsonParser:
    """A JSON list (or ``{"proxies"|"items"|"data": [...]}``) of ``host:port`` strings
    (any plaintext form) or of objects with the fields ``from_fields`` reads."""

    name = "json"
    priority = 10

    def supports(self, content: Content, content_type: str | None) -> bool:
        """Served as JSON, or content that parses as such a list."""
        if _media_type(content_type).endswith("json"):
            return True
        text = text_of(content)
        if text.lstrip()[:1] not in ("[", "{"):
            return False
        try:
            return _json_entries(json.loads(text)) is not None
        except ValueError:
            return False

    def parse(self, content: Content, defaults: ParseDefaults) -> ParseResult:
        """Every entry that names a proxy; raises ``ParseError`` when it is no such list."""
        try:
            doc = json.loads(text_of(content))
        except ValueError:
            raise ParseError("the content is not valid JSON") from None
        entries = _json_entries(doc)
        if entries is None:
            raise ParseError('the JSON is neither a list nor {"proxies": [...]}')

        def make(entry: object) -> FoundProxy:
            if isinstance(entry, str):
                return parse_line(entry, defaults)
            if isinstance(entry, dict):
                return from_fields(entry, defaults)
            raise InvalidEntry("an entry must be a string or an object")

        return _collect(((f"entry {i}", e) for i, e in enumerate(entries)), make)


_HOST_COLUMNS = {"host", "ip"}


def _csv_dialect(header: str) -> str | None:
    """The delimiter that splits *header* into columns naming a host and a port."""
    for delimiter in (",", ";", "\t"):
        names = {c.strip().lower() for c in next(csv.reader([header], delimiter=delimiter), [])}
        if names & _HOST_COLUMNS and "port" in names:
            return delimiter
    return None


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line
    return ""


def _from_header(text: str) -> tuple[str, int]:
    """*text* from its first non-blank line, and how many lines came before it."""
    lines = text.splitlines(keepends=True)
    for n, line in enumerate(lines):
        if line.strip():
            return "".join(lines[n:]), n
    return "", 0


class CsvParser:
    """CSV with a header row naming its columns (``ip``/``host`` and ``port`` at least;
    the others as ``from_fields`` reads them), separated by commas, semicolons or tabs."""

    name = "csv"
    priority = 20

    def supports(self, content: Content, content_type: str | None) -> bool:
        """The first line is a header naming a host and a port column."""
        if _media_type(content_type) == "application/json":
            return False
        return _csv_dialect(_first_line(text_of(content[:_SNIFF_CHARS]))) is not None

    def parse(self, content: Content, defaults: ParseDefaults) -> ParseResult:
        """Every row that names a proxy; raises ``ParseError`` without a usable header."""
        text = text_of(content)
        delimiter = _csv_dialect(_first_line(text))
        if delimiter is None:
            raise ParseError("the first line is not a header naming host (or ip) and port")
        body, before = _from_header(text)
        rows = csv.reader(io.StringIO(body), delimiter=delimiter)
        out = ParseResult()
        try:
            header = [c.strip().lower() for c in next(rows)]
            for row in rows:
                if not any(c.strip() for c in row):
                    continue
                where = f"line {before + rows.line_num}"
                if len(row) != len(header):
                    out.skip(where, f"{len(row)} columns where the header has {len(header)}")
                    continue
                try:
                    out.append(from_fields(dict(zip(header, row, strict=True)), defaults))
                except InvalidEntry as e:
                    out.skip(where, str(e))
        except csv.Error:
            raise ParseError(f"the CSV is malformed at line {before + rows.line_num}") from None
        return out
