"""Routing insight (seed 001) on the wire: ``GET /debug/pick`` and ``/network/health``.

A gateway serving its API with a pool of two source addresses (127.0.0.2 "us",
127.0.0.3 "de"), a real origin that blocks one of them, and real sessions: the
preview must name the egress the proxy then really uses.
"""

from __future__ import annotations

import pytest
import requests
from api_helpers import assert_api_error
from support import ApiProcess, BlockingOrigin, Gateway, free_port, prepare_ledger, wait_until

US, DE = "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def peer():
    o = BlockingOrigin("127.0.0.1")
    yield o
    o.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, peer):
    from datorus_core import egress_ledger, ledger

    db = tmp_path_factory.mktemp("insight") / "ledger.db"
    prepare_ledger(db)
    conn = ledger.open_ledger(db)
    egress_ledger.add_egress(conn, f"direct://{US}", "us")
    egress_ledger.add_egress(conn, f"direct://{DE}", "de")
    conn.conn.close()
    g = Gateway(db, {"api_port": free_port(), "block_seconds": 60}).start()
    g.acc, g.user, g.pw = g.customer(trial_bytes=10**12)
    g.key = g.cli("key", "create", str(g.acc))["key"]

    def both_live() -> bool:
        return {_via(g, peer, "/peer", **{"X-Datorus-Country": c}).text for c in ("us", "de")} == {
            US,
            DE,
        }

    wait_until(both_live, 10, 0.05, "both source addresses in use")
    yield g
    g.stop()


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
