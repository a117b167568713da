"""Parsers as plugins (issue 17): the ``datorus.parsers`` entry points, ``pick_parser``
and ``parse_list``.

The installed registry is the real one: Datorus's own three parsers and the test
package ``datorus-parser-example`` (tests/data, installed by ``scripts/install --test``)
found through importlib.metadata. Broken plugins are real entry points that point at
modules and objects which are not parsers.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, version

import pytest

from datorus_core.envelope import DatorusError
from datorus_core.sources.found import FoundProxy
from datorus_core.sources.parsers import ParseDefaults, ParseError, ParseResult, PlaintextParser
from datorus_core.sources.registry import (
    GROUP,
    MAX_LIST_BYTES,
    ParserPlugin,
    ParserRegistry,
    check_size,
    discover_parsers,
    installed_parsers,
    parse_list,
    pick_parser,
)

D = ParseDefaults()


def _ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name, value, GROUP)


def _validation(e: pytest.ExceptionInfo[DatorusError], field: str) -> str:
    assert e.value.code == "VALIDATION_ERROR" and e.value.status == 400
    assert e.value.details is not None and e.value.details["field"] == field
    return str(e.value.details["reason"])


def test_installed_parsers_come_from_entry_points_with_their_package():
    reg = installed_parsers()
    assert reg.failures == ()
    assert reg.names() == ["json", "csv", "semicolon", "plaintext"]  # priority, then name
    info = {p.name: p.info() for p in reg.plugins}
    assert info["plaintext"] == {
        "name": "plaintext",
        "type": "PlaintextParser",
        "package": "datorus",
        "version": version("datorus"),
        "module": "datorus_core.sources.parsers",
        "loaded": True,
    }
    assert info["semicolon"] == {
        "name": "semicolon",
        "type": "SemicolonParser",
        "package": "datorus-parser-example",
        "version": "0.3.1",
        "module": "datorus_parser_example",
        "loaded": True,
    }


def test_a_third_party_parser_is_picked_and_parses():
    parser = pick_parser(b"10.0.0.1;3128\n10.0.0.2;8080\n", None)
    assert parser.name == "semicolon"
    out = parse_list(parser, b"10.0.0.1;3128\nbad;line\n", ParseDefaults("socks5"))
    assert [p.url() for p in out.proxies] == ["socks5://10.0.0.1:3128"] and out.skipped == 1


@pytest.mark.parametrize(
    ("content", "content_type", "name"),
    [
        (b"10.0.0.1:3128\n", None, "plaintext"),
        (b"10.0.0.1:3128\n", "text/plain", "plaintext"),
        (b"[2001:db8::1]:3128\n", None, "plaintext"),
        (b'["10.0.0.1:3128"]', "text/plain", "json"),
        (b'{"proxies": []}', None, "json"),
        (b"whatever", "application/json", "json"),
        (b"ip,port\n10.0.0.1,3128\n", None, "csv"),
        (b"ip,port\n", "text/csv; header=present", "csv"),
    ],
)
def test_pick_parser_by_supports(content, content_type, name):
    assert pick_parser(content, content_type).name == name


def test_pick_parser_by_name_wins_over_supports():
    assert pick_parser(b'["10.0.0.1:3128"]', None, "plaintext").name == "plaintext"


@pytest.mark.parametrize("name", ["nope", "", "PLAINTEXT", "plain\r\ntext"])
def test_an_unknown_parser_name_is_a_validation_error(name):
    with pytest.raises(DatorusError) as e:
        pick_parser(b"10.0.0.1:3128\n", None, name)
    _validation(e, "parser_name")
    assert "\n" not in e.value.message


@pytest.mark.parametrize(
    "content", [b"", b"<html><body>502 Bad Gateway</body></html>", b'{"error": "x"}', b"\x00" * 9]
)
def test_content_no_parser_reads_is_a_validation_error(content):
    with pytest.raises(DatorusError) as e:
        pick_parser(content, "text/html")
    assert _validation(e, "content") == "no installed parser reads this content"
    assert "plaintext" in e.value.message


def test_broken_plugins_are_listed_with_their_reason_and_never_fatal():
    reg = discover_parsers(
        [
            _ep("plaintext", "datorus_core.sources.parsers:PlaintextParser"),
            _ep("missing", "datorus_no_such_module:Parser"),
            _ep("notaparser", "json:JSONDecoder"),
            _ep("needsargs", "datorus_core.sources.found:FoundProxy"),
            _ep("othername", "datorus_core.sources.parsers:CsvParser"),
            _ep("Bad Name", "datorus_core.sources.parsers:JsonParser"),
            _ep("plaintext", "datorus_core.sources.parsers:JsonParser"),
        ]
    )
    assert reg.names() == ["plaintext"]
    assert isinstance(reg.plugins[0].parser, PlaintextParser)
    why = {f.name: f.error for f in reg.failures}
    assert why["missing"].startswith("ModuleNotFoundError")
    assert why["notaparser"] == "TypeError: it is not a Parser (name, supports(), parse())"
    assert why["needsargs"].startswith("TypeError")
    assert why["othername"] == "TypeError: its name differs from its entry point's name"
    assert why["Bad Name"].startswith("its name must be")
    assert why["plaintext"] == "the name is taken by another plugin"
    assert [f.info()["loaded"] for f in reg.failures] == [False] * 6


class _Exploding:
    name = "exploding"
    priority = 0

    def supports(self, content, content_type):
        raise RuntimeError("boom")

    def parse(self, content, defaults):
        raise RuntimeError("line 1 was user:hunter2@10.0.0.1:80")


class _Sloppy:
    name = "sloppy"

    def supports(self, content, content_type):
        return True

    def parse(self, content, defaults):
        p = FoundProxy("http", "10.0.0.1", 80)
        return [p, "10.0.0.2:80", p, FoundProxy("http", "10.0.0.1", 80, "u", "p")]


def _registry(*parsers) -> ParserRegistry:
    return ParserRegistry(tuple(ParserPlugin(p.name, "t", "1", "m", p) for p in parsers))


def test_a_plugin_failing_in_supports_does_not_fit():
    reg = _registry(_Exploding(), PlaintextParser())
    assert pick_parser(b"10.0.0.1:80\n", None, registry=reg).name == "plaintext"


def test_a_plugin_failing_in_parse_is_an_unreadable_list_without_its_message():
    with pytest.raises(DatorusError) as e:
        parse_list(_Exploding(), b"x", D)
    assert _validation(e, "content") == "the parser exploding failed (RuntimeError)"
    assert "hunter2" not in e.value.message


def test_parse_list_drops_duplicates_and_counts_what_is_no_found_proxy():
    out = parse_list(_Sloppy(), b"x", D)
    assert [p.username for p in out.proxies] == [None, "u"]
    assert (out.skipped, out.duplicates) == (1, 1)


def test_parse_list_keeps_the_parsers_counts():
    out = parse_list(PlaintextParser(), b"10.0.0.1:80\nx\n10.0.0.1:80\n", D)
    assert (len(out.proxies), out.skipped, out.duplicates) == (1, 1, 1)
    assert out.problems == ("line 2: the port is missing",)


def test_an_unreadable_list_is_a_validation_error_naming_why():
    json_parser = installed_parsers().get("json")
    assert json_parser is not None
    with pytest.raises(DatorusError) as e:
        parse_list(json_parser.parser, b"[1, 2", D)
    assert _validation(e, "content") == "the content is not valid JSON"


def test_the_size_cap():
    check_size(b"x" * 10, limit=10)
    check_size("é" * 5, limit=10)
    with pytest.raises(DatorusError) as e:
        check_size("é" * 6, limit=10)  # 12 bytes in UTF-8
    assert _validation(e, "content") == "larger than 10 bytes"
    big = b"10.0.0.1:80\n" * (MAX_LIST_BYTES // 12 + 1)
    with pytest.raises(DatorusError) as e:
        parse_list(PlaintextParser(), big, D)
    _validation(e, "content")


def test_parse_result_keeps_a_few_problems_and_counts_them_all():
    r = ParseResult()
    for n in range(100):
        r.skip(f"line {n}", "bad")
    assert r.skipped == 100 and len(r.problems) == 20
    with pytest.raises(ParseError):
        installed_parsers().get("csv").parser.parse(b"a,b\n", D)  # type: ignore[union-attr]
