"""Scraping a source against real list servers on loopback, into a real ledger (issue 17).

``datorus_core.scraping`` end to end without a gateway: the fetch (status, size cap while
streaming, redirects, timeout), the parser picked or named, the import, and what a
failed list leaves behind (the error recorded, the proxies as they were). The fields
of a source are checked here too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.lists import ListServer

from datorus_core.envelope import DatorusError
from datorus_core.ledger import Ledger, open_ledger
from datorus_core.ledger import egress as ledger_egress
from datorus_core.ledger import sources as ls
from datorus_core.scraping import ListError, Scraper, fetch_list
from datorus_core.sources.fields import check_fields, next_run_at
from datorus_core.sources.registry import MAX_LIST_BYTES
from datorus_core.sources.screen import found_proxy_policy

# the lists here name proxies in 10/8 (and loopback): the operator allowed them
ALLOWED = found_proxy_policy({"source_proxy_allow": ["10.0.0.0/8", "127.0.0.0/8", "::1/128"]})

PLAIN = "# three proxies\n10.0.0.1:3128\nsocks5://u:p@10.0.0.2:1080\n10.0.0.3:8080:bob:pw\n"
JSON = json.dumps(
    [
        {"ip": "10.0.1.1", "port": 8080, "protocol": "http", "country": "nl"},
        {"host": "10.0.1.2", "port": "1080", "protocol": "socks5", "user": "a", "pass": "b"},
    ]
)
CSV = "host,port,protocol,country\n10.0.2.1,3128,http,fr\n10.0.2.2,3129,https,\n"


@pytest.fixture(scope="module")
def lists() -> Iterator[ListServer]:
    s = ListServer()
    yield s
    s.close()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Ledger]:
    d = open_ledger(str(tmp_path / "ledger.db"))
    yield d
    d.close()


def scraper(db: Ledger, timeout: float = 10.0) -> Scraper:
    async def run(fn: Any) -> Any:
        return fn(db)

    return Scraper(run, "test-owner", timeout, policy=ALLOWED)


def add(db: Ledger, url: str, parser: str | None = None, **over: Any) -> int:
    fields = check_fields({"url": url, "parser_name": parser, **over})
    return int(ls.add_source(db, fields)["id"])


def scrape(db: Ledger, sid: int, scheduled: bool = False) -> dict[str, Any] | None:
    return asyncio.run(scraper(db).scrape(sid, scheduled))


@pytest.mark.parametrize(
    ("path", "body", "ctype", "parser", "urls"),
    [
        (
            "/plain.txt",
            PLAIN,
            "text/plain",
            "plaintext",
            {
                "http://10.0.0.1:3128",
                "socks5://u:***@10.0.0.2:1080",
                "http://bob:***@10.0.0.3:8080",
            },
        ),
        (
            "/list.json",
            JSON,
            "application/json",
            "json",
            {"http://10.0.1.1:8080", "socks5://a:***@10.0.1.2:1080"},
        ),
        (
            "/list.csv",
            CSV,
            "text/csv",
            "csv",
            {"http://10.0.2.1:3128", "https://10.0.2.2:3129"},
        ),
    ],
)
def test_each_format_is_picked_read_and_imported(
    db: Ledger, lists: ListServer, path: str, body: str, ctype: str, parser: str, urls: set
) -> None:
    sid = add(db, lists.serve(path, body, ctype), default_country="de")
    out = scrape(db, sid)
    assert out is not None and out["error"] is None and out["parser_name"] == parser
    assert out["proxies_discovered"] == out["proxies_new"] == len(urls)
    assert out["proxies_updated"] == 0 and out["duration_ms"] >= 0
    rows = ledger_egress.list_egress(db)
    assert {r["url"] for r in rows} == urls
    assert all(r["sourceId"] == sid and r["status"] == "unchecked" for r in rows)
    again = scrape(db, sid)
    assert again is not None and (again["proxies_new"], again["proxies_updated"]) == (0, len(urls))
    src = ls.get_source(db, sid)
    assert (src["last_found"], src["last_new"], src["last_error"]) == (len(urls), 0, None)
    assert src["claimed_by"] is None


@pytest.mark.parametrize(
    ("path", "setup", "reason", "text"),
    [
        ("/fails", {"status": 500}, "http_status", "the list answered 500"),
        ("/garbage", {"body": b"\x00\xff<html>nothing here</html>\x13" * 50}, "no_parser", ""),
        ("/huge", None, "too_large", f"larger than {MAX_LIST_BYTES} bytes"),
        ("/huge-declared", None, "too_large", "larger than"),
        ("/redirect/6", None, "unreachable", "more than 5 redirects"),
        ("/empty", {"body": ""}, "empty", "names no proxy"),
    ],
)
def test_a_failing_list_records_its_error_and_leaves_the_proxies_alone(
    db: Ledger, lists: ListServer, path: str, setup: dict | None, reason: str, text: str
) -> None:
    good = lists.serve(f"/good{path}", "10.9.9.9:3128\n")
    sid = add(db, good, "plaintext" if path != "/garbage" else None)
    assert scrape(db, sid)["proxies_new"] == 1  # type: ignore[index]
    before = ledger_egress.list_egress(db)
    if setup is not None:
        lists.serve(path, setup.get("body", "x"), status=setup.get("status", 200))
    ls.update_source(db, sid, {"url": lists.url(path)})
    out = scrape(db, sid)
    assert out is not None and out["error_reason"] == reason and text in out["error"]
    assert out["proxies_discovered"] == out["proxies_new"] == 0
    assert ledger_egress.list_egress(db) == before  # nothing changed
    src = ls.get_source(db, sid)
    assert src["last_error"] == out["error"] and src["last_found"] == 1  # the last success
    assert src["claimed_by"] is None


def test_redirects_up_to_five_are_followed(db: Ledger, lists: ListServer) -> None:
    lists.serve("/list.txt", "10.0.5.1:80\n")
    out = scrape(db, add(db, lists.url("/redirect/5"), "plaintext"))
    assert out is not None and out["error"] is None and out["proxies_new"] == 1


def test_an_unreachable_list_and_a_slow_one(lists: ListServer) -> None:
    with pytest.raises(ListError) as e:
        asyncio.run(fetch_list("http://127.0.0.1:9/list.txt", 5))
    assert e.value.reason == "unreachable"
    slow = lists.serve("/slow", "10.0.0.1:80\n", delay=3)
    started = time.monotonic()
    with pytest.raises(ListError) as e:
        asyncio.run(fetch_list(slow, 0.5))
    assert e.value.reason == "timeout" and time.monotonic() - started < 2.5


def test_a_named_parser_that_finds_only_bad_lines_is_an_error(
    db: Ledger, lists: ListServer
) -> None:
    sid = add(db, lists.serve("/bad.txt", "not a proxy\nnor this\n"), "plaintext")
    out = scrape(db, sid)
    assert out is not None and out["error_reason"] == "unparseable"
    assert out["error"].startswith("none of its 2 entries is a proxy")


def test_a_scrape_on_request_waits_for_none_and_never_overlaps(
    db: Ledger, lists: ListServer
) -> None:
    sid = add(db, lists.serve("/one.txt", "10.0.0.1:80\n"), "plaintext")
    assert ls.claim(db, sid, "someone-else", int(time.time()), int(time.time()) + 60, False)
    with pytest.raises(DatorusError) as e:
        scrape(db, sid)
    assert e.value.code == "RATE_LIMITED" and e.value.headers == {"Retry-After": "1"}
    assert e.value.details == {"limit": "scrape_running", "source": sid}
    assert scrape(db, sid, scheduled=True) is None  # a scheduled run: not due, not taken
    with pytest.raises(DatorusError) as e:
        scrape(db, 999)
    assert e.value.code == "RESOURCE_NOT_FOUND"


def test_a_scheduled_run_sets_the_next_one_from_now(db: Ledger, lists: ListServer) -> None:
    url = lists.serve("/sched.txt", "10.0.0.1:80\n")
    sid = add(db, url, "plaintext", cron_schedule="*/5 * * * *")
    ls.update_source(db, sid, {"next_run_at": int(time.time()) - 3600})  # an hour overdue
    out = scrape(db, sid, scheduled=True)
    assert out is not None and out["error"] is None
    nxt = ls.get_source(db, sid)["next_run_at"]
    assert time.time() < nxt <= time.time() + 300 and nxt % 300 == 0  # one run, not twelve
    assert scrape(db, sid, scheduled=True) is None  # not due again


def test_source_fields_are_checked_with_the_api_field_names() -> None:
    def field_of(body: dict) -> str:
        with pytest.raises(DatorusError) as e:
            check_fields(body)
        assert e.value.code == "VALIDATION_ERROR"
        return str(e.value.details["field"])

    assert field_of({"url": "ftp://x/list"}) == "url"
    assert field_of({"url": "http:///nohost"}) == "url"
    assert field_of({"parser_name": "nope"}) == "parser_name"
    assert field_of({"cron_schedule": "61 * * * *"}) == "cron_schedule"
    assert field_of({"cron_schedule": "0 0 30 2 *"}) == "cron_schedule"  # never fires
    assert field_of({"default_protocol": "ftp"}) == "default_protocol"
    assert field_of({"default_country": "usa"}) == "default_country"
    assert field_of({"default_weight": 0}) == "default_weight"
    assert field_of({"tags": {"bad key": "x"}}) == "tags"
    assert field_of({"name": "a\nb"}) == "name"
    ok = check_fields({"url": "http://127.0.0.1/x", "cron_schedule": " ", "is_active": False})
    assert ok == {"url": "http://127.0.0.1/x", "cron_schedule": None, "enabled": False}
    assert next_run_at("0 * * * *", 3599.0) == 3600 and next_run_at(None, 1.0) is None


def test_reading_a_big_list_leaves_the_event_loop_free(db: Ledger, lists: ListServer) -> None:
    """A 2 MiB list (150,000 entries, seconds of parsing) is read in a worker thread:
    meanwhile the event loop (the gateway's, where requests are served) keeps ticking.
    Its longest pause is the interpreter's (a garbage collection of the growing list,
    the GIL, the box's other load), far below the parse."""
    body = b"10.7.7.7:8080\n" * (2 * 1024 * 1024 // 14)
    sid = add(db, lists.serve("/big.txt", body), "plaintext")

    async def threaded(fn: Any) -> Any:
        return await asyncio.to_thread(fn, db)

    async def main() -> tuple[dict[str, Any] | None, float, float]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        started = time.monotonic()
        out = await Scraper(threaded, "big", 30, policy=ALLOWED).scrape(sid)
        took = time.monotonic() - started
        done.set()
        await t
        return out, took, max(gaps)

    out, took, worst = asyncio.run(main())
    assert out is not None and out["error"] is None
    assert out["proxies_new"] == 1 and out["proxies_duplicate"] == len(body) // 14 - 1
    # on the loop, the parse (most of *took*) would be one pause; a busy box stretches
    # both alike, so the bound is relative
    assert worst < took / 3, (took, worst)


def test_found_proxies_at_denied_addresses_are_skipped_by_default(
    db: Ledger, lists: ListServer
) -> None:
    body = (
        "10.0.9.1:3128\n127.0.0.1:3128\n169.254.169.254:80\n[fd00::1]:3128\n"
        "192.0.2.1:3128\n[2001:db8::1]:8080\nlocalhost:8080\n"
    )
    sid = add(db, lists.serve("/mixed.txt", body), "plaintext")

    async def run(fn: Any) -> Any:
        return fn(db)

    out = asyncio.run(Scraper(run, "default-policy", 10).scrape(sid))
    assert out is not None and out["error"] is None
    assert (out["proxies_new"], out["proxies_denied"], out["proxies_skipped"]) == (2, 5, 5)
    assert {r["url"] for r in ledger_egress.list_egress(db)} == {
        "http://192.0.2.1:3128",
        "http://[2001:db8::1]:8080",
    }
    out = scrape(db, sid)  # 10/8 and loopback (localhost too) allowed: those join
    assert out is not None and (out["proxies_new"], out["proxies_denied"]) == (3, 2)
