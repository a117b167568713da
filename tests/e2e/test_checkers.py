"""Checkers on the wire (issue 17): real upstream proxies on loopback, the gateway's own
judge, egress moving unchecked -> active -> dead -> active, socks4 carrying customers.

One gateway with its REST API and default settings for the judge (``GET /judge`` on
its own API port), checking every second, dead after three failures in a row. Each
upstream gets a country of its own, so a customer's ``X-Datorus-Country`` names it,
and leaves from a loopback alias of its own, which the origin echoes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import httpx
import pytest
import requests
from api_helpers import assert_api_error, bearer
from support.clients import basic, raw_connection, read_response
from support.ledger import prepare_ledger
from support.lists import ListServer
from support.origins import BlockingOrigin
from support.processes import Gateway
from support.upstream import Socks4Proxy, Socks5Proxy, UpstreamProxy
from support.waiting import free_port, wait_until

from datorus_core.egress import parse_egress_url
from datorus_core.egress_io import HandshakeError, handshake
from datorus_core.judge import check_token

DEAD_AFTER = 3


@pytest.fixture(scope="module")
def origin():
    o = BlockingOrigin("127.0.0.1")
    yield o
    o.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    db = tmp_path_factory.mktemp("checkers") / "ledger.db"
    prepare_ledger(db)
    g = Gateway(
        db,
        {
            "api_port": free_port(),
            "egress_check_seconds": 1,
            "egress_check_timeout": 2,
            "egress_dead_after": DEAD_AFTER,
            "api_judge_per_minute": 5,
        },
    ).start()
    g.acc, g.user, g.pw = g.customer(trial_bytes=10**12)
    g.key = g.cli("key", "create", str(g.acc))["key"]
    g.op = g.cli("key", "create", "--operator", "--label", "ops")["key"]
    yield g
    g.stop()


def api(gw: Gateway, path: str) -> dict:
    r = httpx.get(f"{gw.api_url}{path}", headers=bearer(gw.key), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def proxy_of(gw: Gateway, egress_id: int) -> dict:
    return api(gw, f"/proxies/{egress_id}")


def via(gw: Gateway, origin: BlockingOrigin, country: str) -> requests.Response:
    """One forward GET of the origin's ``/peer`` through the gateway, targeting *country*."""
    proxies = {"http": gw.proxy(gw.user, gw.pw)}
    return requests.get(
        origin.url("/peer"), proxies=proxies, headers={"X-Datorus-Country": country}, timeout=20
    )


def tunnel_peer(gw: Gateway, origin: BlockingOrigin, country: str) -> tuple[int, bytes]:
    """CONNECT to the origin targeting *country*, then GET /peer inside: (status, body)."""
    with raw_connection(gw.port) as s:
        s.sendall(
            f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Proxy-Authorization: {basic(gw.user, gw.pw)}\r\n"
            f"X-Datorus-Country: {country}\r\n\r\n".encode()
        )
        status, _, body = read_response(s)
        if status != 200:
            return status, body
        s.sendall(b"GET /peer HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return status, read_response(s)[2]


def add(gw: Gateway, url: str, country: str) -> int:
    return int(gw.cli("egress", "add", url, "--country", country)["id"])


def status_of(gw: Gateway, egress_id: int) -> tuple[str, int]:
    """(status, failure streak) as the ledger holds them (a public interface)."""
    with sqlite3.connect(gw.db) as c:
        row = c.execute(
            "SELECT status, fail_streak FROM egress WHERE id = ?", (egress_id,)
        ).fetchone()
    return row[0], row[1]


def test_an_egress_goes_unchecked_active_dead_active(gw, origin):
    up = UpstreamProxy("127.0.0.11")
    up.stop()  # added while it does not answer: it stays unchecked, carrying nothing
    try:
        _lifecycle(gw, origin, up, add(gw, up.url, "aa"))
    finally:
        up.stop()


def _lifecycle(gw: Gateway, origin: BlockingOrigin, up: UpstreamProxy, eid: int) -> None:
    assert proxy_of(gw, eid)["proxy"]["status"] == "unchecked"
    wait_until(lambda: status_of(gw, eid) == ("unchecked", 1), 10, 0.05, "a first failed check")
    r = via(gw, origin, "aa")
    err = assert_api_error(r, 502, "UPSTREAM_FAILED")
    assert err["details"]["reason"] == "no_healthy_egress"

    up.start()  # its stage-2 check passes: active, customer traffic leaves by it
    wait_until(lambda: status_of(gw, eid) == ("active", 0), 10, 0.05, "active")
    wait_until(lambda: via(gw, origin, "aa").text == "127.0.0.11", 10, 0.05, "traffic via it")
    seen = proxy_of(gw, eid)
    assert seen["proxy"]["status"] == "active" and seen["proxy"]["exit_ip"] == "127.0.0.11"
    names = {c["checker_name"] for c in seen["recent_checks"]}
    assert names == {"tcp_connect", "http_anonymity"}

    up.stop()  # one failure backs it off; DEAD_AFTER in a row make it dead
    wait_until(lambda: status_of(gw, eid)[1] >= 1, 10, 0.05, "a failed check")
    assert status_of(gw, eid)[0] in ("active", "dead")
    wait_until(lambda: status_of(gw, eid) == ("dead", DEAD_AFTER), 15, 0.05, "dead")
    assert via(gw, origin, "aa").status_code == 502
    assert eid in [p["id"] for p in api(gw, "/proxies?status=dead")["items"]]
    pool = api(gw, "/stats/pool")
    assert pool["by_status"]["dead"] >= 1 and pool["last_validation_at"]

    up.start()  # it recovers by itself at its next passing check
    wait_until(lambda: status_of(gw, eid) == ("active", 0), 10, 0.05, "recovered")
    wait_until(lambda: via(gw, origin, "aa").text == "127.0.0.11", 10, 0.05, "traffic again")


def test_anonymity_is_graded_by_the_built_in_judge(gw):
    ups = {
        "elite": UpstreamProxy("127.0.0.12", "u1", "p1"),
        "transparent": UpstreamProxy("127.0.0.13", forwarded="xff"),
        "anonymous": UpstreamProxy("127.0.0.14", forwarded="via"),
    }
    try:
        ids = {level: add(gw, up.url, f"b{level[0]}") for level, up in ups.items()}

        def graded() -> dict[str, dict]:
            got = {level: proxy_of(gw, eid)["proxy"] for level, eid in ids.items()}
            return got if all(p["anonymity"] for p in got.values()) else {}

        got = wait_until(graded, 15, 0.1, "three proxies graded")
        assert {level: p["anonymity"] for level, p in got.items()} == {
            "elite": "elite",
            "transparent": "transparent",
            "anonymous": "anonymous",
        }
        assert {p["exit_ip"] for p in got.values()} == {"127.0.0.12", "127.0.0.13", "127.0.0.14"}
        assert all(p["status"] == "active" for p in got.values())
        listed = api(gw, "/proxies?anonymity=transparent")["items"]
        assert [p["id"] for p in listed] == [ids["transparent"]]
        # the proxy's own credentials went to it, never on to the judge
        assert set(ups["elite"].auth_seen) == {basic("u1", "p1")}
    finally:
        for up in ups.values():
            up.stop()


def test_customer_traffic_through_socks4_and_socks5_upstreams(gw, origin):
    s4 = Socks4Proxy("127.0.0.15", user_id="alice")
    s5 = Socks5Proxy("127.0.0.16", "bob", "s3cret")
    bad = Socks4Proxy("127.0.0.17", user_id="carol")
    try:
        add(gw, s4.url, "cc")
        add(gw, s5.url, "cd")
        refused = add(gw, bad.url.replace("carol@", "mallory@"), "ce")
        for country, exit_ip in (("cc", "127.0.0.15"), ("cd", "127.0.0.16")):
            wait_until(lambda c=country, e=exit_ip: via(gw, origin, c).text == e, 15, 0.05, country)
            assert tunnel_peer(gw, origin, country) == (200, exit_ip.encode())
        assert set(s4.user_ids) == {"alice"}
        # a SOCKS4 proxy that refuses our user id never passes its check
        wait_until(lambda: status_of(gw, refused)[0] == "dead", 15, 0.05, "refused: dead")
        check = proxy_of(gw, refused)["recent_checks"][0]
        assert check["checker_name"] == "http_anonymity" and not check["passed"]
        assert "SOCKS4" in check["detail"]
    finally:
        for p in (s4, s5, bad):
            p.stop()


def test_the_judge_answers_anyone_within_its_limit(gw):
    r = httpx.get(f"{gw.api_url}/judge", headers={"X-Test": "1", "Cookie": "a=b"}, timeout=10)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["ip"] == "127.0.0.1" and body["judge"] == "datorus"
    assert body["headers"]["x-test"] == "1" and body["headers"]["cookie"] == "(redacted)"
    for _ in range(10):
        r = httpx.get(f"{gw.api_url}/judge", timeout=10)
        if r.status_code == 429:
            break
    err = assert_api_error(r, 429, "RATE_LIMITED")
    assert err["details"]["setting"] == "api_judge_per_minute"
    assert int(r.headers["retry-after"]) >= 1

    # the gateway's own checks carry a signature made with the ledger's judge secret (the
    # pool worker makes it when it claims the pool, a moment after the gateway starts)
    def judge_secret() -> tuple | None:
        with sqlite3.connect(gw.db) as c:
            return c.execute("SELECT value FROM api_secrets WHERE name = 'judge'").fetchone()

    wait_until(lambda: judge_secret() is not None, 10, 0.05, "the judge's secret")
    (secret,) = judge_secret()
    signed = httpx.get(
        f"{gw.api_url}/judge", params={"check": check_token(secret, time.time())}, timeout=10
    )
    assert signed.status_code == 200 and signed.json()["ip"] == "127.0.0.1"
    bad = httpx.get(f"{gw.api_url}/judge", params={"check": "1.00"}, timeout=10)
    assert bad.status_code == 429


def test_stats_plugins_lists_checkers_with_their_health(gw):
    add(gw, f"http://127.0.0.1:{free_port()}", "dd")  # nothing listens: tcp_connect fails

    def failed_once() -> bool:
        tcp = api(gw, "/stats/plugins")["checkers"][0]
        return tcp["name"] == "tcp_connect" and tcp["failures"] > 0

    wait_until(failed_once, 10, 0.1, "a failed TCP check")
    checkers = {c["name"]: c for c in api(gw, "/stats/plugins")["checkers"]}
    tcp, http = checkers["tcp_connect"], checkers["http_anonymity"]
    assert (tcp["stage"], http["stage"], tcp["priority"]) == (1, 2, 0)
    assert tcp["package"] == "datorus" and http["module"] == "datorus_core.checkers.judge_check"
    assert tcp["healthy"] is True and http["enabled"] is True
    assert tcp["last_run_at"] and tcp["failures"] >= 1 and tcp["last_failure"]
    assert http["errors"] == 0 and http["last_error"] is None


def test_socks4a_hands_a_name_to_the_proxy(origin):
    """A target given by name goes to a SOCKS4 proxy as SOCKS4a (the proxy resolves it)."""
    s4 = Socks4Proxy("127.0.0.18", user_id="dora")

    async def fetch(url: str, host: str) -> bytes:
        spec = parse_egress_url(url)
        reader, writer = await asyncio.open_connection("127.0.0.1", s4.port)
        try:
            await handshake(spec, host, origin.port, reader, writer)
            writer.write(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return (await reader.read()).partition(b"\r\n\r\n")[2]
        finally:
            writer.close()

    try:
        assert asyncio.run(fetch(s4.url, "localhost")) == b"127.0.0.18"
        with pytest.raises(HandshakeError, match="IPv6") as e:
            asyncio.run(fetch(s4.url, "::1"))
        assert e.value.target  # not the proxy's fault: it stays in the pool
        with pytest.raises(HandshakeError, match="reply 91"):
            asyncio.run(fetch(s4.url.replace("dora@", ""), "127.0.0.1"))
    finally:
        s4.stop()


def test_proxies_a_source_found_are_checked_graded_and_carry_customers(gw, origin):
    """The issue's walk-through: a source listing three local proxies, scraped; the three
    are unchecked, then active with exit IP and anonymity from the built-in judge, and a
    customer's request leaves through one of them (the proxy counted it)."""
    ups = [UpstreamProxy(f"127.0.0.{n}") for n in (21, 22, 23)]
    for up in ups:
        up.stop()  # not answering yet: the scrape's proxies must wait, unchecked
    lists = ListServer()
    try:
        body = "".join(f"127.0.0.1:{up.port}\n" for up in ups)
        op = bearer(gw.op)
        src = httpx.post(
            f"{gw.api_url}/sources",
            headers=op,
            json={"url": lists.serve("/three.txt", body), "default_country": "ee"},
            timeout=30,
        ).json()
        out = httpx.post(f"{gw.api_url}/sources/{src['id']}/scrape", headers=op, timeout=30)
        assert out.json()["proxies_new"] == 3

        def found() -> list[dict]:
            items = api(gw, "/proxies?limit=200")["items"]
            return [p for p in items if p.get("source_id") == src["id"]]

        assert [p["status"] for p in found()] == ["unchecked"] * 3

        # once the gateway has loaded them (before, "ee" names no egress at all):
        def refused() -> dict:
            r = via(gw, origin, "ee")
            err = r.json()["error"] if r.status_code == 502 else {}
            return err if err.get("details", {}).get("reason") == "no_healthy_egress" else {}

        assert wait_until(refused, 10, 0.05, "the pool loaded")["code"] == "UPSTREAM_FAILED"
        for up in ups:
            up.start()

        def graded() -> list[dict]:
            got = found()
            done = all(p["status"] == "active" and p["anonymity"] for p in got)
            return got if done else []

        got = wait_until(graded, 15, 0.1, "the three checked and graded")
        assert {p["exit_ip"] for p in got} == {"127.0.0.21", "127.0.0.22", "127.0.0.23"}
        assert {p["anonymity"] for p in got} == {"elite"}
        before = sum(up.connects for up in ups)
        r = via(gw, origin, "ee")
        assert r.status_code == 200 and r.text in {"127.0.0.21", "127.0.0.22", "127.0.0.23"}
        assert sum(up.connects for up in ups) > before  # one of them carried it
    finally:
        lists.close()
        for up in ups:
            up.stop()
