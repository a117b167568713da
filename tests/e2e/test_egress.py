"""The egress pool on the wire: sticky sessions, spreading, blocks, upstream proxies.

Loopback only: the egress are source addresses 127.0.0.2-127.0.0.5 and real upstream
CONNECT proxies (``support.upstream.UpstreamProxy``) whose own exits are 127.0.0.6/127.0.0.7;
the origins echo the peer address they see, so each response names its way out.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import ssl
import subprocess
import time
from urllib.parse import urlsplit

import pytest
import requests
from checks import assert_envelope
from support.clients import basic, raw_connection, read_response
from support.ledger import add_egress, ledger_rows, new_ledger, prepare_ledger
from support.origins import BlockingOrigin
from support.paths import MITMDUMP
from support.processes import Gateway
from support.upstream import UpstreamProxy
from support.waiting import free_port, wait_until

SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


def get(gw: Gateway, user: str, pw: str, url: str, **headers: str) -> requests.Response:
    """One forward request through the gateway on a fresh connection."""
    proxies = {"http": gw.proxy(user, pw), "https": gw.proxy(user, pw)}
    return requests.get(url, proxies=proxies, headers=headers, timeout=20)


def forward(gw: Gateway, url: str, **headers: str) -> bytes:
    """A raw forward GET of *url* with the credential of *gw*'s module (``gw.user``)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"GET {url} HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n"
        f"Proxy-Authorization: {basic(gw.user, gw.pw)}\r\n{extra}\r\n"
    ).encode()


def tunnel_get(port: int, auth: str, target: tuple[str, int], path: str, **headers: str):
    """CONNECT to *target*, then GET *path* inside the tunnel: (connect status+headers, body)."""
    with raw_connection(port) as s:
        extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
        s.sendall(
            f"CONNECT {target[0]}:{target[1]} HTTP/1.1\r\nHost: {target[0]}\r\n"
            f"Proxy-Authorization: {auth}\r\n{extra}\r\n".encode()
        )
        status, hdrs, body = read_response(s)
        if status != 200:
            return status, hdrs, body
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {target[0]}\r\n\r\n".encode())
        _, _, inner = read_response(s)
        return status, hdrs, inner


@pytest.fixture(scope="module")
def peer_origin():
    o = BlockingOrigin("127.0.0.1")
    yield o
    o.close()


@pytest.fixture(scope="module")
def pool_gw(tmp_path_factory, peer_origin):
    """A gateway whose pool is four source addresses (country us); blocks last 1 s."""
    d = tmp_path_factory.mktemp("egress")
    db = new_ledger(d)
    prepare_ledger(db)
    add_egress(db, [(f"direct://{ip}", "us") for ip in SOURCES])
    gw = Gateway(
        db,
        {
            "block_seconds": 1,
            "egress_check_seconds": 1,
            "egress_check_url": peer_origin.url("/peer"),
        },
    ).start()
    acc, user, pw = gw.customer(trial_bytes=10**12)
    gw.user, gw.pw, gw.acc = user, pw, acc
    seen: set[str] = set()

    def all_live() -> bool:
        seen.add(get(gw, user, pw, peer_origin.url("/peer")).text)
        return seen >= set(SOURCES)

    try:  # a gateway that never gets ready is stopped too, not left running
        wait_until(all_live, 40, 0.01, "four source addresses in use")
        yield gw
    finally:
        gw.stop()


# -- sticky sessions ----------------------------------------------------------------------


def test_session_keeps_one_egress_over_100_requests(pool_gw, peer_origin):
    gw = pool_gw
    s = requests.Session()
    s.proxies = {"http": gw.proxy(gw.user, gw.pw)}
    exits = set()
    for _ in range(100):
        r = s.get(peer_origin.url("/peer"), headers={"X-Datorus-Session-Id": "s100"}, timeout=20)
        assert r.status_code == 200
        assert r.headers["X-Datorus-Session-Id"] == "s100"
        exits.add(r.text)
    assert len(exits) == 1 and exits <= set(SOURCES)
    # and new connections keep it too
    for _ in range(5):
        r = get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **{"X-Datorus-Session-Id": "s100"})
        assert r.text in exits


def test_session_keeps_one_egress_over_connects(pool_gw, peer_origin):
    gw = pool_gw
    auth = basic(gw.user, gw.pw)
    exits = set()
    for _ in range(10):
        status, hdrs, body = tunnel_get(
            gw.port,
            auth,
            ("127.0.0.1", peer_origin.port),
            "/peer",
            X_Datorus_Session_Id="tun-1",
        )
        assert status == 200
        assert hdrs["x-datorus-session-id"] == "tun-1"
        exits.add(body.decode())
    assert len(exits) == 1 and exits <= set(SOURCES)
    # a forward request with the same session id leaves the same way
    r = get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **{"X-Datorus-Session-Id": "tun-1"})
    assert r.text in exits


def test_without_session_requests_spread(pool_gw, peer_origin):
    gw = pool_gw
    exits = [get(gw, gw.user, gw.pw, peer_origin.url("/peer")).text for _ in range(24)]
    assert 3 <= len(set(exits)) <= 4 and set(exits) <= set(SOURCES)
    r = get(gw, gw.user, gw.pw, peer_origin.url("/peer"))
    assert "X-Datorus-Session-Id" not in r.headers


def test_two_accounts_same_session_id_are_independent(pool_gw, peer_origin):
    gw = pool_gw
    _, user2, pw2 = gw.customer(trial_bytes=10**12)
    # try ids until the two accounts' sessions land on different egress: with a shared
    # table they never could
    for i in range(20):
        sid = f"shared-{i}"
        a = get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **{"X-Datorus-Session-Id": sid})
        b = get(gw, user2, pw2, peer_origin.url("/peer"), **{"X-Datorus-Session-Id": sid})
        if a.text != b.text:
            for _ in range(5):
                hdr = {"X-Datorus-Session-Id": sid}
                assert get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **hdr).text == a.text
                assert get(gw, user2, pw2, peer_origin.url("/peer"), **hdr).text == b.text
            return
    pytest.fail("20 shared session ids never landed on different egress")


def test_invalid_session_id_is_ignored(pool_gw, peer_origin):
    gw = pool_gw
    for bad in ("has space", "x" * 129, "semi;colon", "ümlaut".encode().decode("latin-1")):
        r = get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **{"X-Datorus-Session-Id": bad})
        assert r.status_code == 200
        assert "X-Datorus-Session-Id" not in r.headers
    seen = peer_origin.server.seen
    assert not any("x-datorus-session-id" in s["headers"] for s in seen)


def test_keepalive_connection_switching_sessions(pool_gw, peer_origin):
    gw = pool_gw
    # six sessions, on at least two egress: new ids until the second egress shows up
    pinned: dict[str, str] = {}
    for i in range(60):
        sid = f"ka-{i}"
        pinned[sid] = get(
            gw, gw.user, gw.pw, peer_origin.url("/peer"), **{"X-Datorus-Session-Id": sid}
        ).text
        if len(pinned) >= 6 and len(set(pinned.values())) >= 2:
            break
    assert len(set(pinned.values())) >= 2, "60 sessions all landed on one egress"
    ids = list(pinned)
    auth = basic(gw.user, gw.pw)
    with raw_connection(gw.port) as s:
        for round_ in range(3):
            for sid in ids:
                s.sendall(
                    f"GET {peer_origin.url('/peer')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Proxy-Authorization: {auth}\r\nX-Datorus-Session-Id: {sid}\r\n\r\n".encode()
                )
                status, hdrs, body = read_response(s)
                assert status == 200
                assert hdrs["x-datorus-session-id"] == sid
                assert body.decode() == pinned[sid], (round_, sid)


# -- the username syntax ------------------------------------------------------------------


def test_username_session_with_curl_over_connect(pool_gw, peer_origin):
    gw = pool_gw
    user = f"{gw.user}-country-us-session-curl-abc_1"
    outs = set()
    for _ in range(5):
        p = subprocess.run(
            [
                "curl",
                "-sS",
                "-p",
                "-x",
                f"http://{user}:{gw.pw}@127.0.0.1:{gw.port}",
                peer_origin.url("/peer"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert p.returncode == 0, p.stderr
        outs.add(p.stdout)
    assert len(outs) == 1 and outs <= set(SOURCES)
    # the same session by header is the same session
    hdr = {"X-Datorus-Session-Id": "curl-abc_1"}
    assert get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **hdr).text in outs


def test_username_session_with_a_url_only_client(pool_gw, peer_origin, tls_origin, ca_file):
    """A client that only knows http://user:pass@host:port (as browsers and scrapers do),
    for plain HTTP and for HTTPS (a CONNECT tunnel it cannot add headers to)."""
    gw = pool_gw
    proxy = f"http://{gw.user}-session-browser-7:{gw.pw}@127.0.0.1:{gw.port}"
    s = requests.Session()
    s.proxies = {"http": proxy, "https": proxy}
    outs = {s.get(peer_origin.url("/peer"), timeout=20).text for _ in range(10)}
    assert len(outs) == 1
    for _ in range(5):
        fresh = requests.Session()  # a new tunnel each time
        fresh.proxies = {"https": proxy}
        r = fresh.get(tls_origin.url("/peer"), verify=ca_file, timeout=20)
        assert r.status_code == 200 and r.text in outs
    r = s.get(peer_origin.url("/headers"), timeout=20)
    assert r.headers["X-Datorus-Session-Id"] == "browser-7"
    assert "proxy-authorization" not in r.json()


def test_bad_username_options_get_407(pool_gw, peer_origin):
    gw = pool_gw
    for user in (f"{gw.user}-bogus-1", f"{gw.user}-country-usa", f"{gw.user}-session-"):
        r = get(gw, user, gw.pw, peer_origin.url("/peer"))
        assert r.status_code == 407
        assert r.json()["error"]["code"] == "INVALID_CREDENTIAL"
        assert r.headers["Proxy-Authenticate"] == 'Basic realm="Datorus"'
    # a valid session id is echoed on errors too
    r = get(gw, gw.user, "wrong", peer_origin.url("/peer"), **{"X-Datorus-Session-Id": "e-1"})
    assert r.status_code == 407 and r.headers["X-Datorus-Session-Id"] == "e-1"


def test_country_targeting(pool_gw, peer_origin):
    gw = pool_gw
    for header in ("X-Datorus-Country", "X-Geo"):
        r = get(gw, gw.user, gw.pw, peer_origin.url("/headers"), **{header: "US"})
        assert r.status_code == 200
        assert "x-geo" not in r.json() and "x-datorus-country" not in r.json()
    r = get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **{"X-Datorus-Country": "fr"})
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "UPSTREAM_FAILED"
    assert err["details"]["reason"] == "no_egress_for_country"
    assert r.headers["X-Datorus-Request-Id"] == err["requestId"]
    r = get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **{"X-Geo": "nowhere"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "VALIDATION_ERROR"
    assert r.json()["error"]["details"]["field"] == "x-geo"


# -- blocks -------------------------------------------------------------------------------
#
# Blocks are per (egress, domain). The exact tests run on a gateway of their own whose
# source addresses each have a country, so a test sends a request by its victim on
# purpose, and whose blocks last a minute, so "avoided while limited" does not race the
# back-off; each test asks an origin on a loopback address of its own, a domain no other
# test has blocked. Only the lapse of a back-off needs the short one of pool_gw.

COUNTRY = {"127.0.0.2": "us", "127.0.0.3": "de", "127.0.0.4": "fr", "127.0.0.5": "gb"}
BLOCKS_TTL = 2  # blocks_gw's session_ttl
_hosts = itertools.count(1)


@pytest.fixture(scope="module")
def blocks_gw(tmp_path_factory, peer_origin):
    """Four source addresses, one country each; blocks last 60 s; sessions 2 s."""
    db = new_ledger(tmp_path_factory.mktemp("blocks"))
    prepare_ledger(db)
    add_egress(db, [(f"direct://{ip}", country) for ip, country in COUNTRY.items()])
    gw = Gateway(db, {"session_ttl": BLOCKS_TTL, "block_seconds": 60}).start()
    gw.acc, gw.user, gw.pw = gw.customer(trial_bytes=10**12)

    # egress added by hand start unchecked: the pool worker (its own process, at a lower
    # priority; on PostgreSQL 10 s late when the gateway has no judge) makes them active,
    # and every worker of datorus serve reads that for itself (every 0.5 s): each is asked
    # for each country (one worker could still answer 502 while the other already used all)
    try:  # a gateway that never gets ready is stopped too, not left running
        for ip, c in COUNTRY.items():
            gw.each_worker(
                forward(gw, peer_origin.url("/peer"), **{"X-Datorus-Country": c}),
                lambda a, ip=ip: a[0] == 200 and a[2] == ip.encode(),
                timeout=40,
            )
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def own_origin():
    """A blocking origin on a loopback address of its own: a domain nobody blocked yet."""
    o = BlockingOrigin(f"127.0.2.{next(_hosts)}")
    yield o
    o.close()


def via(
    gw: Gateway, url: str, country: str | None = None, session: str | None = None
) -> requests.Response:
    """One request as gw's customer, targeted at *country* and/or in *session*."""
    hdr = {}
    if country:
        hdr["X-Datorus-Country"] = country
    if session:
        hdr["X-Datorus-Session-Id"] = session
    return get(gw, gw.user, gw.pw, url, **hdr)


def test_blocked_egress_is_avoided_while_another_is_ok(blocks_gw, own_origin):
    gw, o = blocks_gw, own_origin
    victim = "127.0.0.3"
    o.blocked.add(victim)
    r = via(gw, o.url("/guarded"), country=COUNTRY[victim])  # by the victim, on purpose
    assert r.status_code == 403 and r.headers["X-Datorus-Blocked"] == "1"
    assert "g-recaptcha" in r.text  # the target's body is returned as it was
    # limited for a minute: no unpinned request goes there while three others are ok
    outs = [via(gw, o.url("/guarded")) for _ in range(20)]
    assert [(r.status_code, "X-Datorus-Blocked" in r.headers) for r in outs] == [(200, False)] * 20
    assert {r.text for r in outs} <= set(SOURCES) - {victim}
    assert o.server.peers.count(victim) == 1
    # the only egress of its country still carries targeted requests, and a normal
    # answer through it clears the block: unpinned requests reach it again
    o.blocked.discard(victim)
    assert via(gw, o.url("/peer"), country=COUNTRY[victim]).text == victim
    wait_until(lambda: via(gw, o.url("/peer")).text == victim, 10, 0.01, "cleared egress in use")


def test_pinned_session_stays_while_limited_and_moves_once_unavailable(blocks_gw, own_origin):
    gw, o = blocks_gw, own_origin
    victim, sid = "127.0.0.5", "pin-1"
    # pinned to the victim on purpose: the only egress of its country
    assert via(gw, o.url("/peer"), country=COUNTRY[victim], session=sid).text == victim
    o.blocked.add(victim)
    # limited twice: the session stays (the customer sees the blocks, flagged) ...
    for _ in range(3):
        r = via(gw, o.url("/guarded"), session=sid)
        assert r.status_code == 403 and r.headers["X-Datorus-Blocked"] == "1"
        assert r.headers["X-Datorus-Session-Id"] == sid
    # ... the third block made it unavailable: the session moves, and stays moved
    moved = {via(gw, o.url("/guarded"), session=sid).text for _ in range(5)}
    assert len(moved) == 1 and moved <= set(SOURCES) - {victim}
    assert o.server.peers.count(victim) == 4


def test_block_page_marker_marks_blocked(blocks_gw, own_origin):
    gw, o = blocks_gw, own_origin
    victim = "127.0.0.4"
    o.blocked.add(victim)
    r = via(gw, o.url("/marked"), country=COUNTRY[victim])
    assert r.status_code == 200 and "g-recaptcha" in r.text
    assert r.headers["X-Datorus-Blocked"] == "1"
    # after the block the victim is avoided for that domain: not one more captcha page
    outs = [via(gw, o.url("/marked")) for _ in range(20)]
    assert [(r.status_code, "X-Datorus-Blocked" in r.headers) for r in outs] == [(200, False)] * 20
    assert {r.text for r in outs} <= set(SOURCES) - {victim}
    assert o.server.peers.count(victim) == 1


def test_reset_by_the_target_counts_as_a_block(blocks_gw, own_origin):
    gw, o = blocks_gw, own_origin
    victim = "127.0.0.2"
    o.blocked.add(victim)
    r = via(gw, o.url("/reset"), country=COUNTRY[victim])
    assert r.status_code == 502 and r.json()["error"]["code"] == "UPSTREAM_FAILED"
    outs = [via(gw, o.url("/reset")) for _ in range(20)]
    assert [r.status_code for r in outs] == [200] * 20
    assert {r.text for r in outs} <= set(SOURCES) - {victim}
    assert o.server.peers.count(victim) == 1


def test_ttl_expiry_releases_the_pin(blocks_gw, own_origin):
    """A live session keeps even a limited egress; once idle past the TTL its id starts
    a new session, which a fresh pick puts elsewhere (the old egress is still limited)."""
    gw, o = blocks_gw, own_origin
    victim, sid = "127.0.0.4", "short-lived"
    assert via(gw, o.url("/peer"), country=COUNTRY[victim], session=sid).text == victim
    o.blocked.add(victim)
    for _ in range(2):  # limited (for 60 s, then 120 s), not unavailable: the session stays
        r = via(gw, o.url("/guarded"), session=sid)
        assert r.status_code == 403 and r.headers["X-Datorus-Session-Id"] == sid
    o.blocked.discard(victim)  # a request still pinned to it would now answer 200 from it
    time.sleep(BLOCKS_TTL + 0.5)  # the idle TTL itself is under test: that time must pass
    now = via(gw, o.url("/peer"), session=sid).text
    assert now in set(SOURCES) - {victim}
    assert {via(gw, o.url("/peer"), session=sid).text for _ in range(3)} == {now}  # pinned anew


def test_a_block_lapses_by_itself(pool_gw, peer_origin):
    """block_seconds (1 s here) later the blocked egress carries traffic again."""
    gw = pool_gw
    victim = "127.0.0.3"
    sid = next(
        f"lapse-{i}"
        for i in range(200)
        if get(
            gw, gw.user, gw.pw, peer_origin.url("/peer"), **{"X-Datorus-Session-Id": f"lapse-{i}"}
        ).text
        == victim
    )
    peer_origin.blocked.add(victim)
    try:
        t0 = time.monotonic()  # the block starts after this, and lasts at least 1 s
        r = get(gw, gw.user, gw.pw, peer_origin.url("/guarded"), **{"X-Datorus-Session-Id": sid})
        assert r.status_code == 403 and r.headers["X-Datorus-Blocked"] == "1"
    finally:
        peer_origin.blocked.discard(victim)
    # answered within the second the block surely lasts: never by the victim (on a slow
    # box fewer requests fall in that second, none may: the check only gets weaker)
    while True:
        r = get(gw, gw.user, gw.pw, peer_origin.url("/peer"))
        if time.monotonic() - t0 >= 0.9:
            break
        assert r.text != victim
    # nobody acts, yet the back-off lapses and the victim carries traffic again
    wait_until(
        lambda: get(gw, gw.user, gw.pw, peer_origin.url("/peer")).text == victim,
        20,
        0.02,
        "blocked egress recovers",
    )


# -- CLI ----------------------------------------------------------------------------------


def test_cli_egress_list_disable_enable_remove(pool_gw, peer_origin):
    gw = pool_gw
    items = gw.cli("egress", "list")["items"]
    assert [i["url"] for i in items] == [f"direct://{ip}" for ip in SOURCES]
    assert all(i["country"] == "us" for i in items)

    # checks ran against the judge and recorded the exit address (the ledger is a public
    # interface: read it directly rather than polling the CLI)
    def exits_recorded() -> bool:
        rows = ledger_rows(gw.db, "SELECT url, exit_ip FROM egress")
        return all(ip == url[9:] for url, ip in rows)

    wait_until(exits_recorded, 15, 0.2, "health checks recorded exit IPs")
    items = gw.cli("egress", "list")["items"]
    assert all(i["exitIp"] == i["url"][9:] and i["lastCheckedAt"] for i in items)
    show = gw.cli("egress", "show", str(items[0]["id"]))
    assert show["checks"] and show["checks"][0]["passed"] == 1
    assert 0 <= show["score"] <= 1

    def avoided(ip: str) -> bool:
        return ip not in {get(gw, gw.user, gw.pw, peer_origin.url("/peer")).text for _ in range(20)}

    assert gw.cli("egress", "disable", str(items[1]["id"])) == {
        "id": items[1]["id"],
        "enabled": False,
    }
    try:
        wait_until(lambda: avoided(SOURCES[1]), 5, 0.05, "disabled egress out of use")
    finally:
        assert gw.cli("egress", "enable", str(items[1]["id"]))["enabled"] is True
    # removal is live too (later tests on this gateway do not count on this egress)
    assert gw.cli("egress", "remove", str(items[0]["id"]))["removed"] is True
    wait_until(lambda: avoided(SOURCES[0]), 5, 0.05, "removed egress out of use")
    bad = gw.cli("egress", "remove", str(items[0]["id"]), check=False)
    assert bad["error"]["code"] == "RESOURCE_NOT_FOUND"
    bad = gw.cli("egress", "add", "ftp://x:1", check=False)
    assert bad["error"]["code"] == "VALIDATION_ERROR"
    assert bad["error"]["details"]["field"] == "url"
    again = gw.cli("egress", "add", f"direct://{SOURCES[1]}")
    assert again["id"] == items[1]["id"] and again["created"] is False


def test_ipv6_source_address_serves_ipv6_targets_only(pool_gw, peer_origin):
    gw = pool_gw
    origin6 = BlockingOrigin("::1")
    try:
        gw.cli("egress", "add", "direct://[::1]")

        def via6() -> str:
            r = get(gw, gw.user, gw.pw, origin6.url("/peer"))
            assert r.status_code == 200, r.text
            return r.text

        # the only IPv6-capable egress carries every IPv6 request, and no IPv4 one, once
        # checked (by every worker of datorus serve for itself: README)
        gw.each_worker(forward(gw, origin6.url("/peer")), lambda a: a[2] == b"::1")
        assert {via6() for _ in range(5)} == {"::1"}
        assert {get(gw, gw.user, gw.pw, peer_origin.url("/peer")).text for _ in range(10)} <= set(
            SOURCES
        )
    finally:
        origin6.close()


# -- upstream proxies ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxies_gw(tmp_path_factory, peer_origin, ca_file):
    """A gateway whose pool is two authenticated upstream proxies (exits .6 and .7)."""
    db = new_ledger(tmp_path_factory.mktemp("proxies"))
    prepare_ledger(db)
    ups = [UpstreamProxy("127.0.0.6", "up1", "s3cret:1"), UpstreamProxy("127.0.0.7", "up2", "pw2")]
    add_egress(db, [(up.url, "de") for up in ups])
    gw = Gateway(
        db,
        {"egress_check_seconds": 1, "egress_check_url": peer_origin.url("/judge")},
        env={"SSL_CERT_FILE": ca_file},  # trusts the test CA of the https:// upstream
    ).start()
    acc, user, pw = gw.customer(trial_bytes=10**12)
    gw.user, gw.pw = user, pw
    # both upstream proxies in use by every worker of datorus serve: each reads the pool
    # worker's checks for itself (every 0.5 s), so one can still have none active while
    # the other already carries traffic through both
    for up in ups:
        gw.each_worker(
            forward(gw, peer_origin.url("/peer")),
            lambda a, exit_ip=up.source: a[0] == 200 and a[2] == exit_ip.encode(),
        )
    yield gw, ups
    gw.stop()
    for up in ups:
        up.stop()


def test_upstream_proxies_carry_forward_and_connect(proxies_gw, peer_origin):
    gw, ups = proxies_gw

    def judged() -> list:
        items = gw.cli("egress", "list")["items"]
        return items if all(i["anonymity"] for i in items) else []

    listed = wait_until(judged, 15, 0.5, "checks judged the upstream proxies")
    assert all(":***@" in i["url"] for i in listed)  # passwords never listed
    # the judge saw each proxy's own exit, and no header naming anyone else
    assert {(i["exitIp"], i["anonymity"]) for i in listed} == {
        ("127.0.0.6", "elite"),
        ("127.0.0.7", "elite"),
    }
    hdr = {"X-Datorus-Session-Id": "via-1"}
    exits = {get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **hdr).text for _ in range(10)}
    assert len(exits) == 1 and exits <= {"127.0.0.6", "127.0.0.7"}
    status, hdrs, body = tunnel_get(
        gw.port,
        basic(gw.user, gw.pw),
        ("127.0.0.1", peer_origin.port),
        "/peer",
        X_Datorus_Session_Id="via-1",
    )
    assert status == 200 and body.decode() in exits
    # a kept-alive client connection alternating between sessions on the two proxies
    pinned: dict[str, str] = {}
    for i in range(40):
        sid = f"ka-via-{i}"
        ip = get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **{"X-Datorus-Session-Id": sid}).text
        if ip not in pinned.values():
            pinned[sid] = ip
        if len(pinned) == 2:
            break
    assert len(pinned) == 2
    with raw_connection(gw.port) as s:
        for _ in range(3):
            for sid, ip in pinned.items():
                s.sendall(
                    f"GET {peer_origin.url('/peer')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Proxy-Authorization: {basic(gw.user, gw.pw)}\r\n"
                    f"X-Datorus-Session-Id: {sid}\r\n\r\n".encode()
                )
                status, _, body = read_response(s)
                assert status == 200 and body.decode() == ip
    # the customer's credential never reached an upstream proxy: only ours did
    ours = {basic("up1", "s3cret:1"), basic("up2", "pw2")}
    assert all(a in ours for up in ups for a in up.auth_seen)


def test_killed_upstream_proxy_is_routed_around(proxies_gw, peer_origin):
    gw, ups = proxies_gw
    dead, alive = ups
    dead.stop()
    failures = 0
    outs = []
    for _ in range(20):
        r = get(gw, gw.user, gw.pw, peer_origin.url("/peer"))
        if r.status_code == 502:
            assert r.json()["error"]["code"] == "UPSTREAM_FAILED"
            failures += 1
        else:
            outs.append(r.text)
    # at most the requests that found it dead before the gateway knew (each gateway
    # process finds out for itself: README), then all avoid it
    assert failures <= 2 * gw.workers
    assert outs[-10:] == [alive.source] * 10
    # a session pinned there moves to the live one
    r = get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **{"X-Datorus-Session-Id": "moves"})
    assert r.text == alive.source
    # restarted, the checks bring it back
    dead.start()
    wait_until(
        lambda: get(gw, gw.user, gw.pw, peer_origin.url("/peer")).text == dead.source,
        40,
        0.05,
        "restarted upstream proxy back in the pool",
    )


def test_no_healthy_egress_is_502_with_reason(proxies_gw, peer_origin):
    gw, ups = proxies_gw
    for up in ups:
        up.stop()
    try:
        # a request that finds a proxy dead is a plain 502 and takes it out of the pool;
        # each gateway process finds that out for itself (with datorus serve, each worker:
        # README), so at most one such 502 per proxy and process, then the reason
        found_dead = 0
        for _ in range(len(ups) * gw.workers + 1):
            r = get(gw, gw.user, gw.pw, peer_origin.url("/peer"))
            err = assert_envelope(r.status_code, r.headers, r.content, "UPSTREAM_FAILED", 502)
            if err["details"]["reason"] == "no_healthy_egress":
                break
            found_dead += 1
        assert err["details"]["reason"] == "no_healthy_egress"
        assert 1 <= err["details"]["retryAfterSeconds"] <= 600  # back-offs cap at 10 min
        # a tunnel alike, within what is left of that bound
        for _ in range(len(ups) * gw.workers - found_dead + 1):
            status, hdrs, body = tunnel_get(
                gw.port, basic(gw.user, gw.pw), ("127.0.0.1", peer_origin.port), "/peer"
            )
            err = assert_envelope(status, hdrs, body, "UPSTREAM_FAILED", 502)
            if err["details"]["reason"] == "no_healthy_egress":
                break
            found_dead += 1
        assert err["details"]["reason"] == "no_healthy_egress"
    finally:
        for up in ups:
            up.start()


# -- the other kinds: an address prefix and a SOCKS5 upstream -----------------------------


def test_prefix_gives_each_session_its_own_address_and_socks5_upstream(
    proxies_gw, peer_origin, tmp_path
):
    """``direct://PREFIX/LEN`` (loopback stands in for a routed IPv6 prefix) and a real
    SOCKS5 upstream (a plain ``mitmdump --mode socks5``)."""
    gw, _ = proxies_gw
    port = free_port()
    socks = subprocess.Popen(
        [
            MITMDUMP,
            "-q",
            "--mode",
            "socks5",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
            "--set",
            f"confdir={tmp_path}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True,
            20,
            0.05,
            "socks5 upstream listening",
        )
        gw.cli("egress", "add", "direct://127.0.1.0/24", "--country", "jp")
        gw.cli("egress", "add", f"socks5://127.0.0.1:{port}", "--country", "se")

        def peer(country: str, **hdr: str) -> str:
            r = get(
                gw,
                gw.user,
                gw.pw,
                peer_origin.url("/peer"),
                **{"X-Datorus-Country": country, **hdr},
            )
            assert r.status_code == 200, r.text
            return r.text

        # live once checked (by every worker for itself)
        jp = forward(gw, peer_origin.url("/peer"), **{"X-Datorus-Country": "jp"})
        gw.each_worker(jp, lambda a: a[2].startswith(b"127.0.1."), 20)
        a = {peer("jp", **{"X-Datorus-Session-Id": "pa"}) for _ in range(3)}
        b = {peer("jp", **{"X-Datorus-Session-Id": "pb"}) for _ in range(3)}
        assert len(a) == 1 and len(b) == 1 and a != b  # one address per session
        assert len({peer("jp") for _ in range(6)}) >= 2  # and fresh ones without
        se = forward(gw, peer_origin.url("/peer"), **{"X-Datorus-Country": "se"})
        gw.each_worker(se, lambda a: a[2] == b"127.0.0.1", 20)
        status, _, body = tunnel_get(
            gw.port,
            basic(gw.user, gw.pw),
            ("127.0.0.1", peer_origin.port),
            "/peer",
            X_Datorus_Country="se",
        )
        assert status == 200 and body == b"127.0.0.1"
    finally:
        socks.terminate()
        socks.wait(15)


def test_https_upstream_and_a_refusing_upstream(proxies_gw, peer_origin, ca):
    """TLS to an ``https://`` upstream proxy; an upstream that refuses our credentials
    gives ``502 UPSTREAM_FAILED`` (forward and CONNECT), then is routed around."""
    gw, ups = proxies_gw
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    secure = UpstreamProxy("127.0.0.8", "up3", "pw3", tls=ctx)
    try:
        gw.cli("egress", "add", secure.url, "--country", "gb")
        gw.cli("egress", "add", ups[0].url.replace("s3cret:1", "wrong"), "--country", "nl")

        def via(country: str, sid: str | None = None) -> requests.Response:
            hdr = {"X-Datorus-Country": country}
            if sid:
                hdr["X-Datorus-Session-Id"] = sid
            return get(gw, gw.user, gw.pw, peer_origin.url("/peer"), **hdr)

        # live once checked (by every worker for itself)
        gb = forward(gw, peer_origin.url("/peer"), **{"X-Datorus-Country": "gb"})
        gw.each_worker(gb, lambda a: a[2] == b"127.0.0.8")
        status, _, body = tunnel_get(
            gw.port,
            basic(gw.user, gw.pw),
            ("127.0.0.1", peer_origin.port),
            "/peer",
            X_Datorus_Country="gb",
        )
        assert status == 200 and body == b"127.0.0.8"
        assert set(secure.auth_seen) == {basic("up3", "pw3")}

        # the refusing one: the first request fails with the envelope (or the check found
        # it first), then none is left (on every worker, each finding it out for itself)
        def refused(answer: tuple[int, dict[str, str], bytes]) -> bool:
            status, _, body = answer
            reason = json.loads(body)["error"]["details"]["reason"] if status == 502 else None
            return bool(reason) and reason != "no_egress_for_country"

        nl = forward(gw, peer_origin.url("/peer"), **{"X-Datorus-Country": "nl"})
        for status, headers, body in gw.each_worker(nl, refused).values():
            assert_envelope(status, headers, body, "UPSTREAM_FAILED", 502)
        r = via("nl", sid="refused-1")
        assert r.status_code == 502
        assert r.json()["error"]["details"]["reason"] == "no_healthy_egress"
        assert r.headers["X-Datorus-Session-Id"] == "refused-1"
    finally:
        secure.stop()


def test_a_request_the_gateway_cuts_for_money_marks_no_block(make_gateway, origin):
    """Running an account dry cuts its upload; that is the gateway's doing, not the
    target's, so the egress stays unblocked for every other customer."""
    gw = make_gateway()
    gw.cli("egress", "add", "direct://")
    _, user, pw = gw.customer()
    proxies = {"http": gw.proxy(user, pw)}
    report = {"X-Datorus-Egress-Report": "1"}
    wait_until(
        lambda: (
            "X-Datorus-Egress-Id"
            in requests.get(origin.url("/"), proxies=proxies, headers=report, timeout=10).headers
        ),
        40,
        0.1,
        "the egress live",
    )
    acc, poor, poor_pw = gw.customer(trial_bytes=0, price_cents_per_gb=10**6)  # 0.001 c/byte
    gw.cli("balance", "add", str(acc), "5")  # 5000 bytes' worth
    wait_until(
        lambda: (
            requests.get(
                origin.url("/"), proxies={"http": gw.proxy(poor, poor_pw)}, timeout=10
            ).status_code
            == 200
        ),
        10,
        0.1,
        "the top-up live",
    )
    with contextlib.suppress(requests.RequestException):
        # an upload cut before any answer: the target never got to say anything
        requests.post(
            origin.url("/upload"),
            data=b"x" * 5_000_000,
            proxies={"http": gw.proxy(poor, poor_pw)},
            timeout=30,
        )
    wait_until(lambda: "ran dry" in gw.log.read_text(), 10, 0.05, "the cut")
    # a real block afterwards, as the marker that the cut's own hooks have all run
    assert requests.get(origin.url("/status/429"), proxies=proxies, timeout=10).status_code == 429
    wait_until(lambda: "(status 429)" in gw.log.read_text(), 10, 0.05, "the real block")
    assert gw.log.read_text().count("blocked by") == 1
