"""Proxy-list sources on a real gateway (issue 17): operator keys, ``/sources``, scrapes.

A gateway serving its REST API, real list servers on loopback (plaintext, JSON, CSV, a
500, garbage, an endless body, a slow one) and the real ``datorus`` CLI on the same
ledger. The schedule runs in the gateway's background: with the test-only
``test_schedule_seconds`` a cron source runs every second here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import assert_api_error, bearer
from support.ledger import cli, prepare_ledger
from support.lists import ListServer
from support.paths import DATORUS
from support.processes import Gateway, GatewaySetup
from support.serve import Serve
from support.waiting import free_port, wait_http, wait_until

# loopback addresses where nothing listens: the gateway checks what it imports, and tests
# reach nothing off this box
PLAIN = "# provider list\n127.0.20.1:3128\nsocks5://u:p@127.0.20.2:1080\n127.0.20.3:8080:bob:pw\n"
JSON = json.dumps([{"ip": "127.0.21.1", "port": 8080, "country": "nl"}, "socks5://127.0.21.2:1080"])
CSV = "host,port,protocol\n127.0.22.1,3128,http\n127.0.22.2,3129,https\n"
NEVER = "0 0 1 1 *"  # a valid schedule that does not fire while these tests run


@pytest.fixture(scope="module")
def lists() -> Iterator[ListServer]:
    s = ListServer()
    s.serve("/plain.txt", PLAIN)
    s.serve("/list.json", JSON, "application/json")
    s.serve("/list.csv", CSV, "text/csv")
    s.serve("/fails", "oops", status=500)
    s.serve("/garbage", b"\x00\x01<html><body>nothing here</body></html>\xff" * 40)
    yield s
    s.close()


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    def ready(g: Gateway) -> None:
        g.op = g.cli("key", "create", "--operator", "--label", "ops")["key"]
        g.acc, g.user, g.pw = g.customer()
        g.key = g.cli("key", "create", str(g.acc))["key"]

    return GatewaySetup(api=True, ready=ready)


def api(g: Gateway, method: str, path: str, key: str | None, **kw: Any) -> httpx.Response:
    headers = bearer(key) if key else {}
    return httpx.request(method, g.api_url + path, headers=headers, timeout=60, **kw)


def add(g: Gateway, url: str, **body: Any) -> dict[str, Any]:
    r = api(g, "POST", "/sources", g.op, json={"url": url, **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


# -- operator keys --------------------------------------------------------------------------

ROUTES = [
    ("GET", "/sources", None),
    ("POST", "/sources", {"url": "http://127.0.0.1:9/x", "parser_name": "plaintext"}),
    ("GET", "/sources/1", None),
    ("PATCH", "/sources/1", {"name": "x"}),
    ("DELETE", "/sources/1", None),
    ("POST", "/sources/1/scrape", None),
    ("GET", "/sources/abc", None),  # even a bad path: the route does not exist for it
    ("POST", "/sources", {"url": 5}),  # and a bad body
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_a_customer_key_finds_no_source_route(gw, method, path, body):
    r = api(gw, method, path, gw.key, json=body)
    err = assert_api_error(r, 404, "RESOURCE_NOT_FOUND")
    unknown = assert_api_error(api(gw, method, "/nothing-here", gw.key), 404, "RESOURCE_NOT_FOUND")
    assert err["message"] == f"No such endpoint: {method} {path}."
    assert err["details"] == {"path": path} and set(unknown["details"]) == {"path"}


@pytest.mark.parametrize(("method", "path", "body"), ROUTES[:6])
@pytest.mark.parametrize("key", [None, "pp_" + "y" * 48])
def test_no_key_or_a_wrong_one_is_401_on_source_routes(gw, method, path, body, key):
    r = api(gw, method, path, key, json=body)
    assert_api_error(r, 401, "INVALID_CREDENTIAL")
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_an_operator_key_has_no_account_but_reads_the_pool(gw):
    err = assert_api_error(api(gw, "GET", "/account", gw.op), 401, "INVALID_CREDENTIAL")
    assert err["details"] == {"reason": "operator_key"}
    for path in ("/proxies", "/stats/pool", "/stats/plugins"):
        assert api(gw, "GET", path, gw.op).status_code == 200, path
    assert api(gw, "GET", "/sources", gw.op).status_code == 200


def test_the_openapi_document_marks_the_operator_routes(gw):
    doc = httpx.get(gw.api_url + "/openapi.json", timeout=30).json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["OperatorKey"]["scheme"] == "bearer"
    assert "--operator" in schemes["OperatorKey"]["description"]
    ops = [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if path.startswith("/sources")
    ]
    assert len(ops) == 6
    for path, method, op in ops:
        assert op["x-datorus-operator"] is True, (path, method)
        assert op["security"] == [{"OperatorKey": []}], (path, method)
        assert "operator key" in op["description"], (path, method)
    assert "x-datorus-operator" not in doc["paths"]["/account"]["get"]
    assert {"ApiKey": []} in doc["paths"]["/proxies"]["get"]["security"]
    assert {"OperatorKey": []} in doc["paths"]["/proxies"]["get"]["security"]


def test_the_cli_makes_lists_and_revokes_operator_keys(gw):
    made = gw.cli("key", "create", "--operator", "--label", "temp")
    assert set(made) >= {"id", "key", "prefix", "label", "operator"}
    assert made["operator"] is True and made["label"] == "temp" and made["key"].startswith("pp_")
    listed = gw.cli("key", "list", "--operator")["items"]
    assert made["id"] in [k["id"] for k in listed] and all(k["operator"] for k in listed)
    assert "key" not in listed[0]
    assert api(gw, "GET", "/sources", made["key"]).status_code == 200
    assert gw.cli("key", "revoke", str(made["id"])) == {"id": made["id"], "revoked": True}
    assert_api_error(api(gw, "GET", "/sources", made["key"]), 401, "INVALID_CREDENTIAL")
    both = gw.cli("key", "create", str(gw.acc), "--operator", check=False)
    assert both["error"]["code"] == "VALIDATION_ERROR"
    customer = gw.cli("key", "list", str(gw.acc))["items"]
    assert customer and not any(k["operator"] for k in customer)


# -- the sources ------------------------------------------------------------------------------


def test_a_source_is_added_read_paged_changed_and_removed(gw, lists):
    # a list of its own: its proxies stay after the DELETE, and must not be another
    # test's (whichever runs first on this gateway would own them)
    crud = JSON.replace("127.0.21.", "127.0.28.")
    url = lists.serve("/crud.json", crud, "application/json")
    src = add(gw, url, cron_schedule=NEVER, tags={"provider": "dc"})
    assert set(src) >= {
        "id",
        "url",
        "parser_name",
        "cron_schedule",
        "default_protocol",
        "is_active",
        "last_scraped_at",
        "created_at",
        "next_run_at",
        "last_error",
    }
    assert src["parser_name"] == "json"  # picked from the fetched list
    assert (src["cron_schedule"], src["default_protocol"], src["is_active"]) == (
        NEVER,
        "http",
        True,
    )
    assert src["next_run_at"].startswith(f"{time.gmtime().tm_year + 1}-01-01T00:00:00")
    assert src["last_scraped_at"] is None and src["tags"] == {"provider": "dc"}
    assert api(gw, "GET", f"/sources/{src['id']}", gw.op).json() == src

    ids = [src["id"]] + [
        add(gw, lists.url(f"/p{i}.txt"), parser_name="plaintext", is_active=i != 1)["id"]
        for i in range(3)
    ]
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = api(gw, "GET", "/sources", gw.op, params=params).json()
        assert len(page["items"]) <= 2 and page["total_count"] >= 4
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen) and set(ids) <= set(seen)
    off = api(gw, "GET", "/sources", gw.op, params={"is_active": "false"}).json()
    assert ids[2] in [s["id"] for s in off["items"]]
    assert all(not s["is_active"] for s in off["items"])
    bad = api(gw, "GET", "/sources", gw.op, params={"cursor": "nope"})
    assert assert_api_error(bad, 400, "VALIDATION_ERROR")["details"]["field"] == "cursor"

    r = api(gw, "PATCH", f"/sources/{src['id']}", gw.op, json={"default_country": "de"})
    assert r.status_code == 200 and r.json()["default_country"] == "DE"
    r = api(gw, "PATCH", f"/sources/{src['id']}", gw.op, json={"cron_schedule": None})
    assert r.json()["cron_schedule"] is None and r.json()["next_run_at"] is None
    r = api(gw, "PATCH", f"/sources/{src['id']}", gw.op, json={"is_active": None})
    assert assert_api_error(r, 400, "VALIDATION_ERROR")["details"]["field"] == "is_active"

    scraped = api(gw, "POST", f"/sources/{src['id']}/scrape", gw.op).json()
    assert scraped["proxies_new"] == 2
    gone = api(gw, "DELETE", f"/sources/{src['id']}", gw.op).json()
    assert gone == {"id": src["id"], "removed": True, "proxies_kept": 2}
    path = f"/sources/{src['id']}"
    err = assert_api_error(api(gw, "GET", path, gw.op), 404, "RESOURCE_NOT_FOUND")
    assert err["details"] == {"source": src["id"]}
    for method, where in (("PATCH", path), ("DELETE", path), ("POST", path + "/scrape")):
        r = api(gw, method, where, gw.op, json={})
        assert assert_api_error(r, 404, "RESOURCE_NOT_FOUND")["details"] == {"source": src["id"]}
    proxies = api(gw, "GET", "/proxies", gw.op, params={"limit": 200}).json()["items"]
    kept = [p for p in proxies if p["source_id"] == src["id"]]
    assert {p["ip"] for p in kept} == {"127.0.28.1", "127.0.28.2"}  # DELETE kept them


def test_a_deleted_sources_id_is_never_given_to_a_new_one(gw, lists):
    """Deleting the newest source does not hand its id to the next: a replayed DELETE by id
    is a 404, and the proxies the deleted one found (kept, with its id) are not the new
    source's (probe 8, item 18; migration 14)."""
    older = add(gw, lists.url("/reuse-a.txt"), parser_name="plaintext", cron_schedule=NEVER)
    newest = add(gw, lists.url("/reuse-b.txt"), parser_name="plaintext", cron_schedule=NEVER)
    gone = api(gw, "DELETE", f"/sources/{newest['id']}", gw.op).json()
    assert gone == {"id": newest["id"], "removed": True, "proxies_kept": 0}
    fresh = add(gw, lists.url("/reuse-c.txt"), parser_name="plaintext", cron_schedule=NEVER)
    assert fresh["id"] > newest["id"] > older["id"]
    r = api(gw, "DELETE", f"/sources/{newest['id']}", gw.op)
    assert assert_api_error(r, 404, "RESOURCE_NOT_FOUND")["details"] == {"source": newest["id"]}
    assert api(gw, "GET", f"/sources/{fresh['id']}", gw.op).json()["url"].endswith("/reuse-c.txt")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"parser_name": "nonesuch"}, "parser_name"),
        ({"cron_schedule": "*/5 * * *"}, "cron_schedule"),
        ({"cron_schedule": "0 25 * * *"}, "cron_schedule"),
        ({"default_country": "usa"}, "default_country"),
        ({"default_protocol": "ftp"}, "default_protocol"),
        ({"default_weight": 0}, "default_weight"),
        ({"url": "ftp://127.0.0.1/list"}, "url"),
        ({"url": "GARBAGE"}, "parser_name"),  # fetched: no parser reads it
        ({"url": "http://127.0.0.1:9/list.txt"}, "url"),  # nothing to fetch to pick one
    ],
)
def test_a_bad_source_is_400_naming_its_field(gw, lists, body, field):
    url = body.pop("url", lists.url("/plain.txt"))
    url = lists.url("/garbage") if url == "GARBAGE" else url
    before = api(gw, "GET", "/sources", gw.op).json()["total_count"]
    r = api(gw, "POST", "/sources", gw.op, json={"url": url, **body})
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == field and err["details"]["reason"]
    assert api(gw, "GET", "/sources", gw.op).json()["total_count"] == before


def test_scrapes_import_each_format_as_unchecked_proxies(gw, lists):
    expected = {"/plain.txt": 3, "/list.json": 2, "/list.csv": 2}
    stats_before = api(gw, "GET", "/stats/pool", gw.op).json()
    for path, n in expected.items():
        src = add(gw, lists.url(path), default_country="fr")
        r = api(gw, "POST", f"/sources/{src['id']}/scrape", gw.op)
        assert r.status_code == 200, r.text
        out = r.json()
        assert set(out) >= {
            "source_id",
            "proxies_discovered",
            "proxies_new",
            "proxies_updated",
            "duration_ms",
            "error",
        }
        assert (out["source_id"], out["proxies_discovered"], out["error"]) == (src["id"], n, None)
        found = [
            p
            for p in api(gw, "GET", "/proxies", gw.key, params={"status": "unchecked"}).json()[
                "items"
            ]
            if p["source_id"] == src["id"]
        ]
        assert len(found) == n and all(p["status"] == "unchecked" for p in found)
        assert all(p["country"] in ("FR", "NL") and p["last_checked_at"] is None for p in found)
        shown = api(gw, "GET", f"/sources/{src['id']}", gw.op).json()
        assert shown["last_scraped_at"] and shown["last_found"] == n and shown["proxies"] == n
        again = api(gw, "POST", f"/sources/{src['id']}/scrape", gw.op).json()
        assert (again["proxies_new"], again["proxies_updated"]) == (0, n)
    stats = api(gw, "GET", "/stats/pool", gw.op).json()
    assert stats["sources_total"] == stats_before["sources_total"] + 3
    assert stats["sources_active"] >= 3 and stats["last_scrape_at"]
    assert stats["by_status"]["unchecked"] >= 7


# what the background checks change meanwhile, apart from what a scrape would
CHECKED = {"status", "score", "avg_latency_ms", "uptime_pct", "last_checked_at", "exit_ip"}


def listed(gw: Gateway) -> list[dict[str, Any]]:
    """The pool as a scrape leaves it, by id (what the checks move left out)."""
    items = api(gw, "GET", "/proxies", gw.op, params={"limit": 200}).json()["items"]
    return sorted(({k: v for k, v in p.items() if k not in CHECKED} for p in items), key=str)


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/fails", "http_status"), ("/garbage", "unparseable"), ("/huge", "too_large")],
)
def test_a_failing_list_is_recorded_and_changes_no_proxy(gw, lists, path, reason):
    """The source's plaintext list turns into a 500, garbage, or an endless body."""
    host = f"127.0.23.{len(path)}"
    src = add(gw, lists.serve(f"/ok{path}", f"{host}:3128\n"))
    assert api(gw, "POST", f"/sources/{src['id']}/scrape", gw.op).json()["proxies_new"] == 1
    before = listed(gw)
    api(gw, "PATCH", f"/sources/{src['id']}", gw.op, json={"url": lists.url(path)})
    r = api(gw, "POST", f"/sources/{src['id']}/scrape", gw.op)
    assert r.status_code == 200
    out = r.json()
    assert out["error_reason"] == reason and out["error"] and out["proxies_discovered"] == 0
    shown = api(gw, "GET", f"/sources/{src['id']}", gw.op).json()
    assert shown["last_error"] == out["error"] and shown["last_found"] == 1
    assert listed(gw) == before


def test_a_scrape_under_way_is_not_run_twice(gw, lists):
    src = add(gw, lists.serve("/slow.txt", "127.0.24.1:80\n", delay=4), parser_name="plaintext")
    first: list[httpx.Response] = []
    t = threading.Thread(
        target=lambda: first.append(api(gw, "POST", f"/sources/{src['id']}/scrape", gw.op))
    )
    t.start()
    wait_until(lambda: api(gw, "GET", f"/sources/{src['id']}", gw.op).json()["scraping"], 10, 0.05)
    r = api(gw, "POST", f"/sources/{src['id']}/scrape", gw.op)
    err = assert_api_error(r, 429, "RATE_LIMITED")
    assert err["details"] == {"limit": "scrape_running", "source": src["id"]}
    assert r.headers["retry-after"] == "1"
    t.join(30)
    assert first[0].status_code == 200 and first[0].json()["proxies_new"] == 1
    assert lists.hits("/slow.txt") == 1


# -- the CLI mirror -------------------------------------------------------------------------


def test_the_cli_mirrors_the_sources(gw, lists):
    url = lists.serve("/cli.csv", CSV.replace("127.0.22.", "127.0.26."), "text/csv")
    src = gw.cli("source", "add", url, "--cron", NEVER, "--country", "it", "--tag", "via=cli")
    assert (src["parserName"], src["cronSchedule"], src["defaultCountry"]) == ("csv", NEVER, "IT")
    assert src["tags"] == {"via": "cli"} and src["isActive"] is True
    assert api(gw, "GET", f"/sources/{src['id']}", gw.op).json()["url"] == url
    assert src["id"] in [s["id"] for s in gw.cli("source", "list")["items"]]
    out = gw.cli("source", "scrape", str(src["id"]))
    assert (out["sourceId"], out["proxiesDiscovered"], out["proxiesNew"]) == (src["id"], 2, 2)
    shown = gw.cli("source", "show", str(src["id"]))
    assert shown["lastFound"] == 2 and shown["proxies"] == 2 and shown["lastError"] is None
    off = gw.cli("source", "set", str(src["id"]), "--disable", "--cron", "none")
    assert off["isActive"] is False and off["cronSchedule"] is None

    gw.cli("source", "set", str(src["id"]), "--url", lists.url("/fails"))
    p = subprocess.run(
        [DATORUS, "--db", str(gw.db), "source", "scrape", str(src["id"]), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and p.stdout == ""
    err = json.loads(p.stderr)["error"]
    assert err["code"] == "UPSTREAM_FAILED" and err["details"]["errorReason"] == "http_status"
    assert gw.cli("source", "show", str(src["id"]))["lastError"].startswith("the list answered 500")

    bad = gw.cli("source", "add", url, "--cron", "61 * * * *", check=False)["error"]
    assert (bad["code"], bad["details"]["field"]) == ("VALIDATION_ERROR", "cron_schedule")
    bad = gw.cli("source", "add", url, "--parser", "nonesuch", check=False)["error"]
    assert bad["details"]["field"] == "parser_name"
    text = subprocess.run(
        [DATORUS, "--db", str(gw.db), "source", "add", url, "--cron", "61 * * * *"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 1 and "cron" in text.stderr.lower()

    assert gw.cli("source", "remove", str(src["id"])) == {
        "id": src["id"],
        "removed": True,
        "proxiesKept": 2,
    }
    missing = gw.cli("source", "show", str(src["id"]), check=False)["error"]
    assert missing["code"] == "RESOURCE_NOT_FOUND"
    words = subprocess.run(
        [DATORUS, "--db", str(gw.db), "source", "show", str(src["id"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"No source {src['id']}" in words.stderr


# -- the schedule ---------------------------------------------------------------------------


def test_the_gateway_scrapes_on_schedule_and_shows_the_next_run(make_gateway, lists, tmp_path):
    g = make_gateway(api_port=free_port(), test_schedule_seconds=1)
    _wait_api(g)
    op = g.cli("key", "create", "--operator")["key"]
    url = lists.serve("/sched.txt", "127.0.25.1:3128\n127.0.25.2:3128\n")
    idle = lists.serve("/idle.txt", "127.0.25.9:3128\n")
    r = httpx.post(
        g.api_url + "/sources",
        headers=bearer(op),
        json={"url": url, "cron_schedule": "*/30 * * * *"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    off = httpx.post(
        g.api_url + "/sources",
        headers=bearer(op),
        json={"url": idle, "cron_schedule": "* * * * *", "is_active": False},
        timeout=30,
    ).json()
    wait_until(lambda: lists.hits("/sched.txt") >= 3, 20, 0.1, "three scheduled scrapes")
    src = httpx.get(f"{g.api_url}/sources/{sid}", headers=bearer(op), timeout=30).json()
    assert src["last_scraped_at"] and src["last_found"] == 2 and src["last_error"] is None
    assert src["next_run_at"] >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    assert src["proxies"] == 2
    shown = g.cli("source", "show", str(sid))
    assert shown["nextRunAt"] and shown["lastScrapedAt"]
    assert lists.hits("/idle.txt") == 1  # fetched once, to pick its parser: never scheduled
    assert off["next_run_at"] is None
    assert "(scheduled): 2 proxies" in g.log.read_text()


def _wait_api(g: Gateway) -> None:
    wait_http(g.api_url + "/health", proc=g.proc)


def test_with_two_workers_a_scheduled_scrape_happens_once(tmp_path, lists, redis_server):
    """``datorus serve --workers 2``: both workers look for due sources every second, and
    the ledger's claim gives each run to one of them. The first list answers slowly, so
    the other worker looks at it several times while it runs; the second is due 5 s
    later, so by the time it is scraped both workers have passed the first many times."""
    db = tmp_path / "ledger.db"
    prepare_ledger(db)
    sv = Serve(db, 2, {"redis_url": redis_server.url, "test_schedule_seconds": 3600}).start()
    try:
        assert len(sv.worker_pids()) == 2
        slow = lists.serve("/once.txt", "127.0.27.1:3128\n", delay=2)
        later = lists.serve("/later.txt", "127.0.27.2:3128\n")
        first = _cli_with(db, {"DATORUS_TEST_SCHEDULE_SECONDS": "1"}, slow)
        second = _cli_with(db, {"DATORUS_TEST_SCHEDULE_SECONDS": "5"}, later)

        def scraped(sid: int) -> bool:
            return bool(cli(db, "source", "show", str(sid))["lastScrapedAt"])

        # the pool worker may start late (it waits for a gateway with a judge), and then
        # runs both, the slow one last: wait for both, whichever order they end in
        wait_until(lambda: scraped(first["id"]) and scraped(second["id"]), 40, 0.2, "both scraped")
        assert (lists.hits("/once.txt"), lists.hits("/later.txt")) == (1, 1)
        shown = cli(db, "source", "show", str(first["id"]))
        assert shown["lastFound"] == 1 and shown["scraping"] is False
        hour = time.strftime("%Y-%m-%dT%H", time.gmtime(time.time() + 3600))
        assert shown["nextRunAt"].startswith(hour) or shown["nextRunAt"] > hour
        logs = sv.out.read_text(errors="replace")
        assert logs.count("(scheduled): 1 proxies") == 2  # one line per run, from one worker
    finally:
        sv.stop()


def _cli_with(db, env: dict[str, str], url: str) -> dict[str, Any]:
    """``datorus source add URL --cron '* * * * *'`` with *env* (the test-only setting)."""
    p = subprocess.run(
        [DATORUS, "--db", str(db), "source", "add", url, "--parser", "plaintext"]
        + ["--cron", "* * * * *", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def test_a_gateway_on_postgresql_runs_the_schedule(postgres_cluster, lists, tmp_path):
    """The scheduler's claims, import and next run on a PostgreSQL ledger."""
    url = postgres_cluster.create_database("sources")
    prepare_ledger(url)
    g = Gateway(tmp_path / "unused.db", {"db": url, "test_schedule_seconds": 1}, set_db=False)
    g.start()
    try:
        src = _cli_with(url, {"DATORUS_TEST_SCHEDULE_SECONDS": "1"}, lists.serve("/pg.txt", PLAIN))
        wait_until(lambda: lists.hits("/pg.txt") >= 2, 20, 0.1, "two scheduled scrapes")
        shown = cli(url, "source", "show", str(src["id"]))
        assert shown["lastFound"] == 3 and shown["proxies"] == 3 and shown["nextRunAt"]
        items = cli(url, "egress", "list")["items"]
        assert {e["sourceId"] for e in items} == {src["id"]} and len(items) == 3
    finally:
        g.stop()


# -- found proxies and the acceptable-use policy ---------------------------------------------

# loopback, private, link-local (cloud metadata) and a name for loopback: denied by default;
# one documentation address (nothing listens there: it stays unchecked) is taken
DENIED = (
    "127.0.0.1:3128\n10.1.2.3:8080\n169.254.169.254:80\n[::1]:3128\nlocalhost:8080\n"
    "192.168.7.7:1080\n192.0.2.10:3128\n"
)


def test_found_proxies_at_denied_addresses_are_skipped_and_counted(tmp_path, lists):
    """Without ``source_proxy_allow`` a list cannot point the gateway inside its own
    network: a found proxy at a loopback, private or metadata address (or a name that
    resolves to one) is skipped, counted in ``proxies_denied`` and never enters the
    pool; with the range allowed, the same list imports it."""
    db = tmp_path / "ledger.db"
    prepare_ledger(db)
    url = lists.serve("/ssrf.txt", DENIED)
    g = Gateway(db, {"api_port": free_port()}, env={"DATORUS_SOURCE_PROXY_ALLOW": ""}).start()
    try:
        wait_http(g.api_url + "/health", proc=g.proc)
        g.op = g.cli("key", "create", "--operator")["key"]
        src = add(g, url, parser_name="plaintext")
        r = api(g, "POST", f"/sources/{src['id']}/scrape", g.op)
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["proxies_new"], out["proxies_denied"], out["proxies_skipped"]) == (1, 6, 6)
        assert out["error"] is None
        assert any("acceptable-use policy denies" in p for p in out["problems"])
        hosts = [p["url"] for p in api(g, "GET", "/proxies", g.op).json()["items"]]
        assert hosts == ["http://192.0.2.10:3128"]
        # the CLI judges with the same setting from its environment
        env = {**os.environ, "DATORUS_SOURCE_PROXY_ALLOW": "127.0.0.0/8,::1/128,10.0.0.0/8"}
        p = subprocess.run(
            [DATORUS, "--db", str(db), "source", "scrape", str(src["id"]), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert p.returncode == 0, p.stderr
        again = json.loads(p.stdout)
        # loopback (localhost too) and 10.1.2.3 allowed now; link-local, 192.168/16 not
        assert (again["proxiesNew"], again["proxiesDenied"]) == (4, 2)
        # the readable output says why, not only how many
        p = subprocess.run(
            [DATORUS, "--db", str(db), "source", "scrape", str(src["id"])],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert p.returncode == 0, p.stderr
        assert re.search(r"^proxiesDenied\s+2$", p.stdout, re.M), p.stdout
        assert "\nproblem: 2 proxies at addresses the acceptable-use policy denies" in p.stdout
    finally:
        g.stop()
