"""Routing insight (seed 001) and the pool API (seed 002) on the wire: ``GET /debug/pick``,
``/network/health``, ``/proxies`` and ``/stats``.

A gateway serving its API with a pool of two source addresses (127.0.0.2 "us",
127.0.0.3 "de"), a real origin that blocks one of them, and real sessions: the
preview must name the egress the proxy then really uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading

import pytest
import requests
from api_helpers import assert_api_error
from checks import assert_envelope
from support.ledger import LedgerTarget, add_egress, ledger_row, prepare_ledger
from support.origins import BlockingOrigin
from support.processes import ApiProcess, Gateway, GatewaySetup
from support.waiting import free_port, wait_until

US, DE = "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def peer():
    o = BlockingOrigin("127.0.0.1")
    yield o
    o.close()


def _us_and_de(db: LedgerTarget) -> None:
    prepare_ledger(db)
    add_egress(db, [(f"direct://{US}", "us"), (f"direct://{DE}", "de")])


@pytest.fixture(scope="module")
def gw_setup(peer) -> GatewaySetup:
    def ready(g: Gateway) -> None:
        g.acc, g.user, g.pw = g.customer(trial_bytes=10**12)
        g.key = g.cli("key", "create", str(g.acc))["key"]

        def both_live() -> bool:
            return {
                _via(g, peer, "/peer", **{"X-Datorus-Country": c}).text for c in ("us", "de")
            } == {US, DE}

        wait_until(both_live, 40, 0.05, "both source addresses in use")

    settings = {
        "block_seconds": 60,
        "egress_check_seconds": 1,
        "egress_check_url": peer.url("/judge"),
        "ws_connect_timeout": 1,
    }
    return GatewaySetup(settings, api=True, ledger=_us_and_de, ready=ready)


def _via(g: Gateway, peer, path: str, **headers: str) -> requests.Response:
    proxies = {"http": g.proxy(g.user, g.pw)}
    return requests.get(peer.url(path), proxies=proxies, headers=headers, timeout=20)


def _api(g: Gateway, path: str, key: str | None = None, **kw) -> requests.Response:
    auth = {"Authorization": f"Bearer {key or g.key}"} if key != "" else {}
    return requests.get(
        g.api_url + path, headers={**auth, **kw.pop("headers", {})}, timeout=10, **kw
    )


def test_pick_previews_the_egress_a_session_really_uses_without_pinning(gw, peer):
    url = peer.url("/peer")
    # a fresh session: a preview pins nothing, so asking again may differ; the proxy pins
    r = _api(gw, "/debug/pick", params={"url": url, "session_id": "insight-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["live"] is True and body["route"] == "pool" and body["pinned"] is False
    assert body["domain"] == "127.0.0.1" and body["session_id"] == "insight-1"
    assert {c["url"] for c in body["candidates"]} == {f"direct://{US}", f"direct://{DE}"}
    assert sum(c["chance"] for c in body["candidates"]) == pytest.approx(1.0, abs=1e-3)
    used = _via(gw, peer, "/peer", **{"X-Datorus-Session-Id": "insight-1"}).text
    # now the session lives: every preview names its egress, by query or by header
    for params, headers in (
        ({"url": url, "session_id": "insight-1"}, {}),
        ({"url": url}, {"X-Datorus-Session-Id": "insight-1"}),
    ):
        for _ in range(5):
            b = _api(gw, "/debug/pick", params=params, headers=headers).json()
            assert b["pinned"] is True and b["egress"]["url"] == f"direct://{used}"
    # targeting narrows the candidates, as X-Datorus-Country / X-Geo do on the proxy
    b = _api(gw, "/debug/pick", params={"url": url}, headers={"X-Geo": "DE"}).json()
    assert b["country"] == "de" and [c["url"] for c in b["candidates"]] == [f"direct://{DE}"]
    assert b["egress"]["url"] == f"direct://{DE}" and b["pinned"] is False


def test_pick_errors_have_the_envelope(gw, peer):
    url = peer.url("/peer")
    r = _api(gw, "/debug/pick", params={"url": "ftp://example.com/"})
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == "url"
    r = _api(gw, "/debug/pick", params={"url": url, "country": "usa"})
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"] == {"field": "country", "reason": "must be two letters"}
    r = _api(gw, "/debug/pick", params={"url": url, "country": "fr"})
    err = assert_api_error(r, 502, "UPSTREAM_FAILED")
    assert err["details"]["reason"] == "no_egress_for_country"
    r = _api(gw, "/debug/pick", key="", params={"url": url})
    assert_api_error(r, 401, "INVALID_CREDENTIAL")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = _api(gw, "/network/health/a b", params={})
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == "domain"


def test_network_health_shows_a_block_and_pick_avoids_it(gw, peer):
    domain = "127.0.0.1"
    h = _api(gw, f"/network/health/{domain}").json()
    assert h["live"] is True and h["available"] == 2 and h["retryAfterSeconds"] is None
    peer.blocked.add(US)
    try:
        r = _via(gw, peer, "/guarded", **{"X-Datorus-Country": "us"})
        assert r.status_code == 403 and r.headers["X-Datorus-Blocked"] == "1"
    finally:
        peer.blocked.discard(US)
    h = _api(gw, f"/network/health/{domain}").json()
    states = {e["url"]: e for e in h["egress"]}
    assert states[f"direct://{US}"]["state"] == "limited"
    assert 0 < states[f"direct://{US}"]["recoversInSeconds"] <= 60
    assert states[f"direct://{DE}"]["state"] == "ok"
    assert (h["available"], h["limited"]) == (1, 1)
    # the preview and the proxy both avoid the limited egress while another is ok
    for _ in range(10):
        b = _api(gw, "/debug/pick", params={"url": peer.url("/peer")}).json()
        assert b["egress"]["url"] == f"direct://{DE}"
        chance = {c["url"]: c["chance"] for c in b["candidates"]}
        assert chance == {f"direct://{US}": 0.0, f"direct://{DE}": 1.0}
    assert _via(gw, peer, "/peer").text == DE
    # a normal answer through it clears the block
    assert _via(gw, peer, "/peer", **{"X-Datorus-Country": "us"}).text == US
    assert _api(gw, f"/network/health/{domain}").json()["available"] == 2


def test_standalone_api_reads_the_pool_from_the_ledger(gw, peer):
    api = ApiProcess(gw.db).start()
    try:
        h = requests.get(
            f"{api.url}/network/health/example.com",
            headers={"Authorization": f"Bearer {gw.key}"},
            timeout=10,
        ).json()
        assert h["live"] is False and h["available"] == 2
        b = requests.get(
            f"{api.url}/debug/pick",
            params={"url": "https://example.com/", "session_id": "x"},
            headers={"Authorization": f"Bearer {gw.key}"},
            timeout=10,
        ).json()
        assert b["live"] is False and b["pinned"] is False and b["port"] == 443
        assert b["egress"]["url"] in (f"direct://{US}", f"direct://{DE}")
    finally:
        api.stop()


# -- the pool, seed 002's shape ------------------------------------------------------------


def test_proxies_list_filters_sorts_and_pages(gw, peer):
    def checked() -> list[dict]:
        items = _api(gw, "/proxies", params={"status": "active"}).json()["items"]
        return items if len(items) == 2 and all(p["exit_ip"] for p in items) else []

    items = wait_until(checked, 15, 0.2, "both egress checked through the judge")
    by_ip = {p["ip"]: p for p in items}
    assert set(by_ip) == {US, DE}
    us = by_ip[US]
    assert (us["protocol"], us["port"], us["country"], us["exit_ip"]) == ("direct", None, "US", US)
    # the box's own addresses are not graded for anonymity (upstream proxies are)
    assert us["anonymity"] is None and 0 < us["score"] <= 1 and us["uptime_pct"] == 100.0
    assert us["avg_latency_ms"] is not None and us["last_checked_at"] and us["first_seen_at"]
    page = _api(gw, "/proxies", params={"country": "de"}).json()
    assert [p["ip"] for p in page["items"]] == [DE] and page["total_count"] == 1
    # sorted by score, best first by default; ascending on request
    scores = [p["score"] for p in _api(gw, "/proxies").json()["items"]]
    assert scores == sorted(scores, reverse=True)
    asc = _api(gw, "/proxies", params={"sort": "latency", "order": "asc"}).json()["items"]
    assert [p["avg_latency_ms"] for p in asc] == sorted(p["avg_latency_ms"] for p in asc)
    # cursor pages: one per page, every proxy once
    first = _api(gw, "/proxies", params={"limit": 1}).json()
    assert first["total_count"] == 2 and first["next_cursor"]
    second = _api(gw, "/proxies", params={"limit": 1, "cursor": first["next_cursor"]}).json()
    assert second["next_cursor"] is None
    assert {first["items"][0]["id"], second["items"][0]["id"]} == {us["id"], by_ip[DE]["id"]}
    assert _api(gw, "/proxies", params={"min_score": 1.01}).status_code == 400
    err = assert_api_error(_api(gw, "/proxies", params={"status": "gone"}), 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == "status"
    assert _api(gw, "/proxies", params={"max_latency_ms": 0}).json()["items"] == []
    assert _api(gw, "/proxies", params={"verified_within_minutes": 5}).json()["total_count"] == 2


def test_proxy_detail_stats_and_a_disabled_egress(gw, peer):
    pid = next(p["id"] for p in gw.cli("egress", "list")["items"] if p["url"] == f"direct://{DE}")
    d = wait_until(
        lambda: (b := _api(gw, f"/proxies/{pid}").json())["recent_checks"] and b, 15, 0.2, "checks"
    )
    assert d["proxy"]["id"] == pid and d["proxy"]["ip"] == DE
    c = d["recent_checks"][0]
    assert c["checker_name"] == "http_anonymity" and c["stage"] == 2 and c["passed"] is True
    assert c["exit_ip"] == DE and c["created_at"]
    err = assert_api_error(_api(gw, "/proxies/999999"), 404, "RESOURCE_NOT_FOUND")
    assert err["details"] == {"egress": 999999}
    stats = _api(gw, "/stats/pool").json()
    assert stats["total_proxies"] == 2 and stats["by_protocol"] == {"direct": 2}
    assert stats["sources_total"] == 0 and stats["last_validation_at"]
    plugins = _api(gw, "/stats/plugins").json()
    assert [(c["name"], c["stage"]) for c in plugins["checkers"]] == [
        ("tcp_connect", 1),
        ("http_anonymity", 2),
    ]
    gw.cli("egress", "disable", str(pid))
    try:
        assert _api(gw, f"/proxies/{pid}").json()["proxy"]["status"] == "disabled"
        assert _api(gw, "/stats/pool").json()["by_status"]["disabled"] == 1
        listed = _api(gw, "/proxies", params={"status": "disabled"}).json()["items"]
        assert [p["id"] for p in listed] == [pid]
    finally:
        gw.cli("egress", "enable", str(pid))
    assert _api(gw, "/proxies", key="").status_code == 401


# -- exclusive leases ----------------------------------------------------------------------


def _post(g: Gateway, path: str, body: dict | None = None) -> requests.Response:
    h = {"Authorization": f"Bearer {g.key}"}
    return requests.post(g.api_url + path, json=body or {}, headers=h, timeout=10)


def test_lease_is_exclusive_paid_once_and_released(gw, peer):
    other_acc, other_user, other_pw = gw.customer(trial_bytes=10**12)
    # a lease costs a cent of balance: trial bytes do not pay for it
    r = _post(gw, "/proxies/acquire", {"country": "US"})
    err = assert_api_error(r, 402, "INSUFFICIENT_BALANCE")
    assert err["details"]["requiredCents"] == 1
    gw.cli("balance", "add", str(gw.acc), "3")
    r = _post(gw, "/proxies/acquire", {"country": "US", "lease_duration_seconds": 120})
    assert r.status_code == 200, r.text
    lease = r.json()
    lid = lease["lease_id"]
    assert re.fullmatch(r"ls[0-9a-f]{24}", lid)
    assert lease["proxy"]["ip"] == US and lease["proxy"]["country"] == "US"
    assert lease["credits_remaining"] == 2
    # the one US egress is taken: another lease waits, an impossible one is not found
    r = _post(gw, "/proxies/acquire", {"country": "US"})
    err = assert_api_error(r, 429, "RATE_LIMITED")
    assert err["details"]["limit"] == "leases"
    assert 100 <= int(r.headers["Retry-After"]) <= 120
    assert_api_error(_post(gw, "/proxies/acquire", {"country": "FR"}), 404, "RESOURCE_NOT_FOUND")
    # the last unleased egress stays shared: nobody can lease the whole pool
    r = _post(gw, "/proxies/acquire", {})
    err = assert_api_error(r, 429, "RATE_LIMITED")
    assert err["details"]["reason"] == "pool_reserve"
    assert 100 <= int(r.headers["Retry-After"]) <= 120  # when the 120 s lease above ends
    assert [x["lease_id"] for x in _api(gw, "/account/leases").json()["items"]] == [lid]
    tx = _api(gw, "/account/credits").json()["recent_transactions"][0]
    assert (tx["tx_type"], tx["amount"]) == ("acquire", -1)
    assert _api(gw, "/account").json()["balance_cents"] == 2

    # in force at once: requests naming it leave by it (header or username)
    assert _via(gw, peer, "/peer", **{"X-Datorus-Lease-Id": lid}).text == US
    health = {e["url"]: e["state"] for e in _api(gw, "/network/health/x.example").json()["egress"]}
    assert health == {f"direct://{US}": "leased", f"direct://{DE}": "ok"}
    proxies = {"http": f"http://{gw.user}-lease-{lid}:{gw.pw}@127.0.0.1:{gw.port}"}
    assert requests.get(peer.url("/peer"), proxies=proxies, timeout=10).text == US
    # nobody else leaves by it, the lease holder's other requests neither
    other = {"http": gw.proxy(other_user, other_pw)}
    for _ in range(10):
        assert requests.get(peer.url("/peer"), proxies=other, timeout=10).text == DE
        assert _via(gw, peer, "/peer").text == DE
    r = _via(gw, peer, "/peer", **{"X-Datorus-Country": "us"})
    err = assert_envelope(r.status_code, r.headers, r.content, "UPSTREAM_FAILED", 502)
    assert err["details"]["reason"] == "no_healthy_egress"
    # someone else's lease id is not theirs
    r = requests.get(
        peer.url("/peer"), proxies=other, headers={"X-Datorus-Lease-Id": lid}, timeout=10
    )
    err = assert_envelope(r.status_code, r.headers, r.content, "RESOURCE_NOT_FOUND", 404)
    assert err["details"] == {"lease": lid}
    assert not [s for s in peer.seen if s["headers"].get("x-datorus-lease-id")]

    # released early: free for everyone again, not refunded, not releasable twice
    r = _post(gw, f"/proxies/acquire/{lid}/release")
    assert r.status_code == 200 and r.json()["released"] is True
    assert_api_error(_post(gw, f"/proxies/acquire/{lid}/release"), 404, "RESOURCE_NOT_FOUND")
    assert _api(gw, "/account/leases").json()["total_count"] == 0
    assert _api(gw, "/account").json()["balance_cents"] == 2
    assert _via(gw, peer, "/peer", **{"X-Datorus-Country": "us"}).text == US  # at once
    r = _via(gw, peer, "/peer", **{"X-Datorus-Lease-Id": lid})
    assert_envelope(r.status_code, r.headers, r.content, "RESOURCE_NOT_FOUND", 404)


# -- POST /fetch ---------------------------------------------------------------------------


def test_fetch_goes_through_the_gateway_billed_routed_and_judged(gw, peer):
    before = _api(gw, "/usage").json()["requests"]
    r = _post(gw, "/fetch", {"url": peer.url("/peer"), "session_id": "fetch-1"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == 200 and out["body"] in (US, DE) and out["body_encoding"] == "text"
    meta = out["meta"]
    assert meta["blocked"] is False and meta["session_id"] == "fetch-1"
    assert meta["egress"]["url"] == f"direct://{out['body']}"
    assert not [k for k in out["headers"] if k.lower().startswith("x-datorus-")]
    # billed like any request, with a receipt under the returned id
    rec = wait_until(
        lambda: (
            gw.cli("receipt", meta["request_id"], check=False).get("status")
            and (gw.cli("receipt", meta["request_id"]))
        ),
        5,
        0.1,
        "receipt flushed",
    )
    # the body and one response head (well under 1 KiB)
    assert rec["status"] == 200 and len(out["body"]) < rec["bytesDown"] < len(out["body"]) + 1024
    wait_until(lambda: _api(gw, "/usage").json()["requests"] > before, 5, 0.05, "usage")
    # the session sticks across fetches
    for _ in range(3):
        again = _post(gw, "/fetch", {"url": peer.url("/peer"), "session_id": "fetch-1"})
        assert again.json()["body"] == out["body"]
    # a block page: the target's answer with meta.blocked, and the egress avoided next
    peer.blocked.add(DE)
    try:
        r = _post(gw, "/fetch", {"url": peer.url("/guarded"), "country": "de"})
        out = r.json()
        assert out["status"] == 403 and "g-recaptcha" in out["body"]
        assert out["meta"]["blocked"] is True and out["meta"]["egress"]["url"] == f"direct://{DE}"
    finally:
        peer.blocked.discard(DE)
    state = {e["url"]: e["state"] for e in _api(gw, "/network/health/127.0.0.1").json()["egress"]}
    assert state[f"direct://{DE}"] == "limited"
    # a normal answer through it clears the block: later tests find the pool as it was
    assert _via(gw, peer, "/peer", **{"X-Datorus-Country": "de"}).text == DE
    assert _api(gw, "/network/health/127.0.0.1").json()["available"] == 2

    # the fetch credential is the account's own, listed with the others: one, whichever
    # process (or worker) served the fetches
    def fetch_creds() -> list[dict]:
        items = _api(gw, "/account/credentials").json()["items"]
        return [c for c in items if c["label"] == "api fetch"]

    (first,) = fetch_creds()
    assert not first["revoked"]
    # revoked by its customer, the next fetch makes a new one
    r = requests.delete(
        f"{gw.api_url}/account/credentials/{first['id']}",
        headers={"Authorization": f"Bearer {gw.key}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text

    def new_one_used() -> str | None:
        r = _post(gw, "/fetch", {"url": peer.url("/peer")})
        assert r.status_code == 200, r.text
        if [c["revoked"] for c in fetch_creds()] == [True, False]:
            return r.json()["meta"]["request_id"]
        return None

    rid = wait_until(new_one_used, 10, 0.1, "a new fetch credential in use")
    # billed before the next test reads the usage
    wait_until(lambda: gw.cli("receipt", rid, check=False).get("status"), 5, 0.1, "receipt")


def test_fetch_errors(gw, peer):
    # the gateway's own refusal comes back as its envelope, ids agreeing
    r = _post(gw, "/fetch", {"url": "http://169.254.169.254/latest/meta-data/"})
    err = assert_api_error(r, 403, "AUP_VIOLATION")
    assert err["details"]["rule"] == "link_local"
    err = assert_api_error(_post(gw, "/fetch", {"url": "ftp://x/"}), 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == "url"
    r = _post(gw, "/fetch", {"url": peer.url("/peer"), "headers": {"X": "a\r\nb"}})
    assert assert_api_error(r, 400, "VALIDATION_ERROR")["details"]["field"] == "headers"
    r = _post(gw, "/fetch", {"url": peer.url("/peer"), "country": "fr"})
    err = assert_api_error(r, 502, "UPSTREAM_FAILED")
    assert err["details"]["reason"] == "no_egress_for_country"
    api = ApiProcess(gw.db).start()
    try:
        r = requests.post(
            f"{api.url}/fetch",
            json={"url": peer.url("/peer")},
            headers={"Authorization": f"Bearer {gw.key}"},
            timeout=10,
        )
        err = assert_api_error(r, 503, "SERVICE_UNAVAILABLE")
        assert err["details"] == {"reason": "gateway_only"}
    finally:
        api.stop()


# -- the WebSocket relay -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws_target():
    """A WebSocket echo server on loopback; ``whoami`` answers the peer address."""
    import websockets

    async def echo(conn):
        async for m in conn:
            await conn.send(conn.remote_address[0] if m == "whoami" else m)

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict = {}

    async def main():
        async with websockets.serve(echo, "127.0.0.1", 0, compression=None) as server:
            box["port"] = server.sockets[0].getsockname()[1]
            box["stop"] = asyncio.Event()
            ready.set()
            await box["stop"].wait()

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    assert ready.wait(10)
    yield f"ws://127.0.0.1:{box['port']}/echo"
    loop.call_soon_threadsafe(box["stop"].set)
    t.join(10)


@contextlib.contextmanager
def _relay(g: Gateway, message: dict | None):
    """Open the relay and send *message* (None: send nothing)."""
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{g.settings['api_port']}/ws", open_timeout=10) as ws:
        if message is not None:
            ws.send(json.dumps(message))
        yield ws


def _close_of(g: Gateway, message: dict | None) -> tuple[int, str]:
    """How the relay closes after *message*."""
    with _relay(g, message) as ws:
        return _closed_with(ws)


def _closed_with(ws) -> tuple[int, str]:
    from websockets.exceptions import ConnectionClosed

    with pytest.raises(ConnectionClosed) as e:
        ws.recv(timeout=15)
    return e.value.rcvd.code, e.value.rcvd.reason


def test_ws_relay_carries_messages_through_the_gateway(gw, ws_target):
    used = gw.cli("usage", str(gw.acc))["bytes"]
    with _relay(gw, {"apiKey": gw.key, "url": ws_target, "country": "de"}) as ws:
        assert json.loads(ws.recv(timeout=10)) == {"type": "connected", "url": ws_target}
        ws.send("whoami")
        assert ws.recv(timeout=10) == DE  # it left by the targeted egress
        ws.send(b"\x00" * 100_000)
        assert ws.recv(timeout=10) == b"\x00" * 100_000
    port = int(ws_target.rsplit(":", 1)[1].split("/")[0])

    def billed() -> int | None:
        row = ledger_row(
            gw.db,
            "SELECT SUM(bytes_up + bytes_down) FROM receipts WHERE account_id = ? AND port = ?",
            (gw.acc, port),
        )
        moved = row[0] if row else None
        return moved if moved and gw.cli("usage", str(gw.acc))["bytes"] == used + moved else None

    # the relay's tunnel is billed what it carried: 200,000 bytes of messages, their
    # framing and the WebSocket handshake (under 4 KiB), to the byte in the usage
    moved = wait_until(billed, 5, 0.1, "relay billed")
    assert 200_000 < moved < 200_000 + 4096


def test_ws_relay_close_codes(gw, ws_target):
    bad_key = {"apiKey": "pp_" + "x" * 48, "url": ws_target}
    assert _close_of(gw, bad_key) == (1008, "invalid API key")
    assert _close_of(gw, {"apiKey": gw.key}) == (1008, "missing target URL")
    assert _close_of(gw, None) == (1008, "connect timeout")  # ws_connect_timeout 1
    no_egress = {"apiKey": gw.key, "url": ws_target, "country": "fr"}
    assert _close_of(gw, no_egress) == (1011, "agent unavailable")
    dead = {"apiKey": gw.key, "url": f"ws://127.0.0.1:{free_port()}/"}
    assert _close_of(gw, dead) == (1011, "target connection failed")
    # the account's open-tunnel cap: the second relay is over it
    acc, _, _ = gw.customer(trial_bytes=10**9, max_tunnels=1)
    key = gw.cli("key", "create", str(acc))["key"]
    with _relay(gw, {"apiKey": key, "url": ws_target}) as first:
        assert "connected" in first.recv(timeout=10)
        assert _close_of(gw, {"apiKey": key, "url": ws_target}) == (1008, "rate limit exceeded")


# -- POST /proxies/test ----------------------------------------------------------------------


def test_proxies_test_tries_each_best_proxy_through_the_gateway(gw, peer):
    url = peer.url("/peer?proxies-test=1")
    r = _post(gw, "/proxies/test", {"url": url, "count": 5, "timeout_seconds": 10})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["url"] == url and out["success_rate"] == 1.0
    assert {x["ip"] for x in out["results"]} == {US, DE}
    assert all(x["reachable"] and x["status_code"] == 200 for x in out["results"])
    assert all(0 < x["latency_ms"] < 10_000 and x["error"] is None for x in out["results"])
    # each request really left by its own proxy
    seen = {s["peer"] for s in peer.seen if "proxies-test=1" in s["path"]}
    assert seen == {US, DE}
    r = _post(gw, "/proxies/test", {"url": url, "country": "us", "count": 1}).json()
    assert [x["ip"] for x in r["results"]] == [US]
    err = assert_api_error(
        _post(gw, "/proxies/test", {"url": url, "country": "fr"}), 404, "RESOURCE_NOT_FOUND"
    )
    assert err["details"]["country"] == "fr"
    # a refusal that is not about the proxies is the whole answer
    r = _post(gw, "/proxies/test", {"url": "http://169.254.169.254/"})
    assert assert_api_error(r, 403, "AUP_VIOLATION")["details"]["rule"] == "link_local"
    # customers cannot pin an egress themselves: a forged pin is ignored
    r = _via(gw, peer, "/peer", **{"X-Datorus-Egress-Report": "1", "X-Datorus-Egress-Pin": "x:1"})
    assert r.status_code == 200 and r.headers["X-Datorus-Egress-Id"].isdigit()
