"""Every list of the REST API pages alike, a wrong method's 404 names every method of
its path, and request bodies are strict (probe 8, items 5, 7, 17 and 21).

A real gateway serving its API on loopback; httpx as the client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import requests
from api_helpers import assert_api_error, bearer
from support.ledger import cli
from support.processes import Gateway, GatewaySetup
from support.waiting import wait_until


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    def ready(g: Gateway) -> None:
        g.op = bearer(cli(g.db, "key", "create", "--operator")["key"])  # type: ignore[attr-defined]

    return GatewaySetup({}, api=True, ready=ready)


def _customer(gw: Gateway) -> tuple[int, dict[str, str]]:
    acc = cli(gw.db, "account", "create", f"l{time.monotonic_ns()}@example.com")
    return acc["id"], bearer(cli(gw.db, "key", "create", str(acc["id"]))["key"])


def _post(gw: Gateway, path: str, h: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{gw.api_url}{path}", json=body, headers=h, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def _webhooks(gw: Gateway, h: dict[str, str]) -> str:
    for n in range(3):
        _post(gw, "/account/webhooks", h, {"url": f"http://127.0.0.1:9/h{n}"})
    return "/account/webhooks"


def _allowed_ips(gw: Gateway, h: dict[str, str]) -> str:
    cred = _post(gw, "/account/credentials", h, {})
    base = f"/account/credentials/{cred['id']}/allowed-ips"
    third = time.monotonic_ns() % 250 + 1  # a range no other test of this ledger lists
    for n in range(1, 4):
        _post(gw, base, h, {"cidr": f"198.18.{third}.{n}/32"})
    return base


def _credentials(gw: Gateway, h: dict[str, str]) -> str:
    for n in range(3):
        _post(gw, "/account/credentials", h, {"label": f"c{n}"})
    return "/account/credentials"


def _keys(gw: Gateway, h: dict[str, str]) -> str:
    for n in range(2):  # and the one the account was made with
        _post(gw, "/auth/keys", h, {"label": f"k{n}"})
    return "/auth/keys"


def _deliveries(gw: Gateway, h: dict[str, str]) -> str:
    hook = _post(gw, "/account/webhooks", h, {"url": "http://127.0.0.1:9/d", "events": "credits.*"})
    aid = httpx.get(f"{gw.api_url}/account", headers=h).json()["id"]
    for cents in (1, 2, 3):
        cli(gw.db, "balance", "add", str(aid), str(cents))
    path = f"/account/webhooks/{hook['id']}/deliveries"
    wait_until(lambda: _get(gw, path, h).json()["total_count"] == 3, what="three deliveries")
    return path


def _proxies(gw: Gateway, h: dict[str, str]) -> str:
    # disabled: no check moves their scores (the order) while the test pages; removed
    # after it (an egress in the pool ends the box's default route for the other tests)
    for n in range(2, 5):
        eid = str(gw.cli("egress", "add", f"direct://127.0.0.{n}")["id"])
        gw.cli("egress", "disable", eid)
        gw.added_egress.append(eid)  # type: ignore[attr-defined]
    return "/proxies?status=disabled"


def _get(gw: Gateway, path: str, h: dict[str, str], **params: Any) -> httpx.Response:
    path, _, query = path.partition("?")
    fixed = dict(q.split("=", 1) for q in query.split("&") if q)
    url = f"{gw.api_url}{path}"
    return httpx.get(url, params={**fixed, **params}, headers=h, timeout=30)


def _walk(gw: Gateway, path: str, h: dict[str, str]) -> list[Any]:
    """Every item of the list at *path*, one per page, following next_cursor."""
    seen: list[Any] = []
    cursor = None
    for _ in range(50):
        page = _get(gw, path, h, limit=1, **({"cursor": cursor} if cursor else {}))
        assert page.status_code == 200, page.text
        body = page.json()
        assert set(body) == {"items", "next_cursor", "total_count"}
        assert len(body["items"]) <= 1
        seen += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError(f"{path}: no last page after 50")


def _ids(items: list[dict[str, Any]]) -> list[Any]:
    return [i["id"] if "id" in i else i["request_id"] for i in items]


MAKERS: dict[str, Callable[[Gateway, dict[str, str]], str]] = {
    "webhooks": _webhooks,
    "allowed-ips": _allowed_ips,
    "credentials": _credentials,
    "keys": _keys,
    "deliveries": _deliveries,
    "proxies": _proxies,
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_every_list_pages_by_cursor_and_refuses_a_bad_one(gw: Gateway, kind: str) -> None:
    _, h = _customer(gw)
    gw.added_egress = []  # type: ignore[attr-defined]
    try:
        _pages_alike(gw, MAKERS[kind](gw, h), h)
    finally:
        for eid in gw.added_egress:  # type: ignore[attr-defined]
            gw.cli("egress", "remove", eid)


def _pages_alike(gw: Gateway, path: str, h: dict[str, str]) -> None:
    whole = _get(gw, path, h, limit=200).json()
    assert whole["next_cursor"] is None and len(whole["items"]) >= 3
    assert whole["total_count"] == len(whole["items"])
    first = _get(gw, path, h, limit=1).json()
    assert len(first["items"]) == 1 and first["next_cursor"]
    assert first["total_count"] == whole["total_count"]  # the total, not the page
    assert _ids(_walk(gw, path, h)) == _ids(whole["items"])  # each once, in order
    for cursor in ("zzz", "%%%", "eyJhZnRlciI6ICJ4In0"):  # the last: {"after": "x"}
        err = assert_api_error(_get(gw, path, h, cursor=cursor), 400, "VALIDATION_ERROR")
        assert err["details"]["field"] == "cursor"
    for limit in (0, 201, "x"):
        err = assert_api_error(_get(gw, path, h, limit=limit), 400, "VALIDATION_ERROR")
        assert err["details"]["field"] == "limit"


def test_sources_and_leases_refuse_a_bad_cursor(gw: Gateway) -> None:
    _, h = _customer(gw)
    err = assert_api_error(_get(gw, "/sources", gw.op, cursor="zzz"), 400, "VALIDATION_ERROR")  # type: ignore[attr-defined]
    assert err["details"]["field"] == "cursor"
    err = assert_api_error(_get(gw, "/account/leases", h, cursor="zzz"), 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == "cursor"


def test_receipts_page_newest_first_by_cursor(gw: Gateway, origin) -> None:
    acc = cli(gw.db, "account", "create", f"r{time.monotonic_ns()}@example.com",
              "--trial-bytes", "10000000")  # fmt: skip
    h = bearer(cli(gw.db, "key", "create", str(acc["id"]))["key"])
    cred = cli(gw.db, "credential", "create", str(acc["id"]))
    gw.wait_for_credential(cred["username"], cred["password"])
    proxies = {"http": gw.proxy(cred["username"], cred["password"])}
    for n in range(3):
        assert requests.get(origin.url(f"/bytes/{n + 1}"), proxies=proxies, timeout=30).ok
    wait_until(lambda: _get(gw, "/account/receipts", h).json()["total_count"] == 3, what="receipts")
    whole = _get(gw, "/account/receipts", h).json()
    ids = [r["request_id"] for r in whole["items"]]
    assert ids == sorted(ids, reverse=True) and whole["next_cursor"] is None
    assert _ids(_walk(gw, "/account/receipts", h)) == ids
    err = assert_api_error(_get(gw, "/account/receipts", h, cursor="zzz"), 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == "cursor"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "/account/webhooks", ["GET", "POST"]),
        ("POST", "/account/alerts", ["GET", "PUT", "DELETE"]),
        ("PUT", "/account/credentials/1/allowed-ips", ["GET", "POST", "DELETE"]),
        ("POST", "/account/webhooks/1", ["GET", "DELETE"]),
        ("PUT", "/sources/1", ["GET", "PATCH", "DELETE"]),
        ("PUT", "/health", ["GET"]),
    ],
)
def test_a_wrong_method_names_every_method_of_the_path(
    gw: Gateway, method: str, path: str, allowed: list[str]
) -> None:
    _, h = _customer(gw)
    r = httpx.request(method, f"{gw.api_url}{path}", headers=h, json={}, timeout=30)
    err = assert_api_error(r, 404, "RESOURCE_NOT_FOUND")
    assert err["details"] == {"method": method, "allowed": allowed}
    assert r.headers["allow"] == ", ".join(allowed)


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("PUT", "/account/alerts", {"low_balance_cents": 600, "email": "no"}, "email"),
        ("PUT", "/account/alerts", {"low_balance_cents": 600, "extra": 1}, "extra"),
        ("PUT", "/account/alerts", {"low_balance_cents": "600"}, "low_balance_cents"),
        ("PUT", "/account/autorecharge", {"threshold_cents": 500, "amount_cents": "2000"},
         "amount_cents"),
        ("POST", "/account/webhooks", {"url": "http://127.0.0.1:9/x", "secret": "mine"}, "secret"),
        ("POST", "/account/credentials", {"max_bytes": "1000"}, "max_bytes"),
        ("POST", "/account/credentials", {"label": "a", "password": "mine"}, "password"),
        ("POST", "/auth/keys", {"label": 5}, "label"),
        ("POST", "/account/topups", {"amount_cents": 500.0}, "amount_cents"),
        ("POST", "/proxies/acquire", {"lease_duration_seconds": "60"}, "lease_duration_seconds"),
        ("POST", "/proxies/test", {"url": "http://x.example/", "count": True}, "count"),
        ("POST", "/fetch", {"url": "http://x.example/", "timeout": "5"}, "timeout"),
        ("POST", "/auth/register", {"email": "u@example.com", "admin": True}, "admin"),
    ],
)  # fmt: skip
def test_bodies_refuse_wrong_types_and_unknown_fields(
    gw: Gateway, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    _, h = _customer(gw)
    r = httpx.request(method, f"{gw.api_url}{path}", json=body, headers=h, timeout=30)
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == field, err
    if path == "/account/alerts":  # nothing was stored
        assert _get(gw, path, h).json() == {"low_balance_cents": None, "email": True}


def test_documented_bodies_still_pass(gw: Gateway) -> None:
    _, h = _customer(gw)
    r = httpx.put(f"{gw.api_url}/account/alerts", json={"low_balance_cents": 500}, headers=h)
    assert r.status_code == 200 and r.json() == {"low_balance_cents": 500, "email": True}
    r = httpx.put(
        f"{gw.api_url}/account/alerts", json={"low_balance_cents": 600, "email": False}, headers=h
    )
    assert r.status_code == 200 and r.json() == {"low_balance_cents": 600, "email": False}
    hook = {"url": "http://127.0.0.1:9/x", "events": "credits.*,lease.*"}  # one string
    assert httpx.post(f"{gw.api_url}/account/webhooks", json=hook, headers=h).status_code == 201
    r = httpx.post(f"{gw.api_url}/account/credentials", headers=h)  # no body at all
    assert r.status_code == 201
    src = {"url": "http://127.0.0.1:9/l.txt", "parser_name": "plaintext", "default_weight": 2}
    r = httpx.post(f"{gw.api_url}/sources", json=src, headers=gw.op)  # type: ignore[attr-defined]
    assert r.status_code == 201, r.text
    bad = httpx.patch(f"{gw.api_url}/sources/{r.json()['id']}", json={"is_active": "no"},
                      headers=gw.op)  # type: ignore[attr-defined]  # fmt: skip
    assert assert_api_error(bad, 400, "VALIDATION_ERROR")["details"]["field"] == "is_active"


def test_usage_by_domain_is_one_shape_everywhere(gw: Gateway) -> None:
    aid, h = _customer(gw)
    by_query = _get(gw, "/usage", h, by="domain").json()
    by_path = _get(gw, "/usage/domains", h).json()
    assert by_query == by_path == {"by": "domain", "days": 30, "items": []}
    from_cli = cli(gw.db, "usage", str(aid), "--by", "domain")
    assert from_cli == {"id": aid, "by": "domain", "days": 30, "items": []}
