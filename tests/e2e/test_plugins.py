"""``GET /stats/plugins`` on a real gateway's API lists the parsers it finds through the
``datorus.parsers`` entry points (issue 17): Datorus's own, registered like any plugin,
and the test package's ``semicolon`` parser (tests/data/datorus-parser-example, installed
by ``scripts/install --test``), which no file of Datorus names.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
from api_helpers import assert_api_error
from support.processes import Gateway, GatewaySetup

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {
    name: {
        "name": name,
        "type": cls,
        "package": "datorus",
        "version": version("datorus"),
        "module": "datorus_core.sources.parsers",
        "loaded": True,
    }
    for name, cls in (
        ("plaintext", "PlaintextParser"),
        ("json", "JsonParser"),
        ("csv", "CsvParser"),
    )
}


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    def ready(g: Gateway) -> None:
        g.acc, g.user, g.pw = g.customer()
        g.key = g.cli("key", "create", str(g.acc))["key"]

    return GatewaySetup(api=True, ready=ready)


def _plugins(g: Gateway, key: str | None = None) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.get(g.api_url + "/stats/plugins", headers=auth, timeout=10)


def test_stats_plugins_lists_the_parsers_found_through_entry_points(gw):
    r = _plugins(gw, gw.key)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    parsers = {p["name"]: p for p in r.json()["parsers"]}
    assert set(parsers) == {"plaintext", "json", "csv", "semicolon"}
    for name, entry in SHIPPED.items():
        assert parsers[name] == entry
    assert parsers["semicolon"] == {
        "name": "semicolon",
        "type": "SemicolonParser",
        "package": "datorus-parser-example",
        "version": "0.3.1",
        "module": "datorus_parser_example",
        "loaded": True,
    }


def test_stats_plugins_lists_the_notifiers_with_no_health_before_any_delivery(gw):
    notifiers = {n["name"]: n for n in _plugins(gw, gw.key).json()["notifiers"]}
    assert set(notifiers) == {"smtp", "webhook"}
    for name, n in notifiers.items():
        assert n["package"] == "datorus" and n["module"] == f"datorus_core.notifiers.{name}"
        assert n["loaded"] is True and n["healthy"] is None  # nothing measured it yet
        assert n["subscriptions"] == 0 and n["last_success_at"] is None
        assert n["deliveries"] == {"pending": 0, "delivered": 0, "failed": 0}


def test_the_third_party_parser_needs_no_change_to_datorus():
    ours = [*sorted((ROOT / "datorus_core").rglob("*.py")), ROOT / "pyproject.toml"]
    names = ("datorus_parser_example", "datorus-parser-example", "SemicolonParser", '"semicolon"')
    assert not [p for p in ours if any(n in p.read_text() for n in names)]


def test_stats_plugins_keeps_its_checkers(gw):
    checkers = _plugins(gw, gw.key).json()["checkers"]
    assert [(c["name"], c["stage"]) for c in checkers] == [
        ("tcp_connect", 1),
        ("http_anonymity", 2),
    ]


@pytest.mark.parametrize("key", [None, "pp_" + "x" * 48])
def test_stats_plugins_needs_an_api_key(gw, key):
    err = assert_api_error(_plugins(gw, key), 401, "INVALID_CREDENTIAL")
    assert err["details"] is None or isinstance(err["details"], dict)
