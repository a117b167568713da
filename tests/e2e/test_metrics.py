"""``GET /metrics`` (CONTRACT section 8, issue 20): a real gateway, real clients, a real
scrape parsed with prometheus_client's own parser; counters move by exactly what was sent.

With ``DATORUS_GATEWAY_WORKERS=2`` the gateway is ``datorus serve`` and its launcher serves
every worker's metrics on the one port: the same counts must hold. Several nodes are
several gateways, each with its own ``/metrics`` (scraped as separate targets): the tests
of the shared gateway are ``one_node``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from checks import assert_envelope
from prometheus_client.parser import text_string_to_metric_families
from support.clients import basic, raw_connection, read_response
from support.ledger import new_ledger, prepare_ledger
from support.paths import REPO
from support.processes import Gateway, GatewaySetup
from support.serve import Serve, usage
from support.socks5 import http_get_through, socks5_connect
from support.waiting import free_port, wait_until

Samples = dict[tuple[str, frozenset], float]
DASHBOARD = REPO / "deploy" / "grafana" / "datorus.json"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus.yml"


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    return GatewaySetup({"metrics_port": free_port(), "socks5_port": free_port()})


def scrape(gw: Gateway) -> Samples:
    """One scrape of the gateway's ``/metrics``, every sample by (name, labels)."""
    port = gw.settings["metrics_port"]
    r = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    out: Samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample *name* with exactly *labels* (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample *name* whose labels include *labels*."""
    want = set(labels.items())
    return sum(v for (n, lb), v in samples.items() if n == name and want <= lb)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def proxies(gw: Gateway, user: str, pw: str) -> dict[str, str]:
    return {"http": gw.proxy(user, pw), "https": gw.proxy(user, pw)}


@pytest.mark.one_node
def test_counters_equal_the_requests_sent(gw, origin, tls_origin, ca_file):
    acc, user, pw = gw.customer(trial_bytes=10**9)
    used0 = usage(gw.db, acc)
    before = scrape(gw)
    px = proxies(gw, user, pw)
    for _ in range(3):
        r = requests.get(origin.url("/"), proxies=px, timeout=10)
        assert r.status_code == 200 and r.text == "hello from origin"
    assert requests.get(origin.url("/bytes/200000"), proxies=px, timeout=10).status_code == 200
    assert requests.get(origin.url("/status/404"), proxies=px, timeout=10).status_code == 404
    bad = requests.get(origin.url("/"), proxies=proxies(gw, user, "wrong"), timeout=10)
    assert bad.status_code == 407 and bad.json()["error"]["code"] == "INVALID_CREDENTIAL"
    denied = requests.get("http://127.0.0.1:25/", proxies=px, timeout=10)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "AUP_VIOLATION"
    closed = free_port()  # nothing listens there: the upstream refuses
    failed = requests.get(f"http://127.0.0.1:{closed}/", proxies=px, timeout=10)
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "UPSTREAM_FAILED"
    with raw_connection(gw.port) as s:
        s.sendall(
            f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, 'wrong')}\r\n\r\n".encode()
        )
        assert read_response(s)[0] == 407
    out = subprocess.run(
        ["curl", "-sS", "--cacert", ca_file, "-x", gw.proxy(user, pw),
         f"https://localhost:{tls_origin.port}/"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout == "hello from origin", out.stderr

    # billed: 3 + 1 + 1 forward requests and 1 tunnel (the 407s and the 403 are not)
    wait_until(lambda: usage(gw.db, acc)["requests"] - used0["requests"] >= 6, 15, 0.1, "usage")

    def tunnel_bytes_in() -> bool:
        used = usage(gw.db, acc)["bytes"] - used0["bytes"]
        after = scrape(gw)
        moved = total(after, "datorus_bytes_total") - total(before, "datorus_bytes_total")
        return moved == used

    wait_until(tunnel_bytes_in, 15, 0.1, "every byte billed counted, and only those")
    after = scrape(gw)
    r = "datorus_requests_total"
    assert delta(before, after, r, kind="forward", status="200", code="") == 4
    assert delta(before, after, r, kind="forward", status="404", code="") == 1
    assert delta(before, after, r, kind="forward", status="407", code="INVALID_CREDENTIAL") == 1
    assert delta(before, after, r, kind="forward", status="403", code="AUP_VIOLATION") == 1
    assert delta(before, after, r, kind="forward", status="502", code="UPSTREAM_FAILED") == 1
    assert delta(before, after, r, kind="tunnel", status="200", code="") == 1
    assert delta(before, after, r, kind="tunnel", status="407", code="INVALID_CREDENTIAL") == 1
    assert total(after, r) - total(before, r) == 10  # nothing else counted
    b = "datorus_bytes_total"
    fwd_down = delta(before, after, b, kind="forward", direction="down")
    assert fwd_down > 200_000  # the 200,000-byte body and every head
    assert delta(before, after, b, kind="tunnel", direction="up") > 0
    assert delta(before, after, b, kind="tunnel", direction="down") > 0
    # every forward answer is timed; time to first byte for relayed answers only
    d, t = "datorus_request_duration_seconds_count", "datorus_time_to_first_byte_seconds_count"
    assert delta(before, after, d, kind="forward") == 8
    assert delta(before, after, t, kind="forward") == 5
    assert delta(before, after, d, kind="tunnel") == 1


@pytest.mark.one_node
def test_refusals_for_money_are_counted_by_code(gw, origin):
    gauge = "datorus_accounts_refused_for_money"
    # the gauge's baseline is read before the account exists: gw.customer()'s own probes
    # (a CONNECT with the new credential, until every worker has answered one) are already
    # refused for money, and the state read once a second may count them before the
    # request below. No other test of this module is refused for money.
    accounts_before = value(scrape(gw), gauge)
    _, user, pw = gw.customer(trial_bytes=0)
    before = scrape(gw)
    r = requests.get(origin.url("/"), proxies=proxies(gw, user, pw), timeout=10)
    assert r.status_code == 402
    code = r.json()["error"]["code"]
    assert code in ("TRIAL_EXHAUSTED", "INSUFFICIENT_BALANCE")
    after = scrape(gw)
    assert delta(before, after, "datorus_requests_total", kind="forward", status="402", code=code)
    assert delta(before, after, "datorus_money_refusals_total", code=code) == 1
    assert total(after, "datorus_requests_total") - total(before, "datorus_requests_total") == 1
    # a second refusal of the same account is the same account
    assert (
        requests.get(origin.url("/"), proxies=proxies(gw, user, pw), timeout=10).status_code == 402
    )
    # read off the workers' state once a second: every worker that refused this account
    # (the probes reach both) lists it, and the launcher counts it once
    wait_until(
        lambda: value(scrape(gw), gauge) == accounts_before + 1, 15, 0.1, "exactly one account more"
    )


@pytest.mark.one_node
def test_open_tunnels_and_state_gauges(gw, tls_origin):
    _, user, pw = gw.customer(trial_bytes=10**9)
    name = "datorus_open_tunnels"
    wait_until(lambda: (name, frozenset({("kind", "tunnel")})) in scrape(gw), 15, 0.1, name)
    open_before = value(scrape(gw), name, kind="tunnel")
    with raw_connection(gw.port) as s:
        s.sendall(
            f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
        )
        assert read_response(s)[0] == 200
        wait_until(
            lambda: value(scrape(gw), name, kind="tunnel") == open_before + 1, 15, 0.1, "open"
        )
    wait_until(lambda: value(scrape(gw), name, kind="tunnel") == open_before, 15, 0.1, "closed")
    samples = scrape(gw)
    # the pool (empty here), the ledger and the mail outbox are read too
    assert value(samples, "datorus_egress", state="active") == 0
    assert (("datorus_ledger_events_pending", frozenset())) in samples
    wait_until(
        lambda: ("datorus_events_waiting", frozenset({("queue", "mail")})) in scrape(gw),
        20,
        0.2,
        "the outbox counted",
    )


def dashboard_metrics() -> set[str]:
    """Every metric name the shipped Grafana dashboard queries."""
    doc = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr" and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in re.findall(r"\bdatorus_[a-z0-9_]+", e)}


@pytest.mark.one_node
def test_every_metric_the_dashboard_queries_is_on_metrics(gw, origin):
    _, user, pw = gw.customer(trial_bytes=10**9)
    requests.get(origin.url("/"), proxies=proxies(gw, user, pw), timeout=10)
    wanted = dashboard_metrics()
    assert len(wanted) >= 10, wanted

    def missing() -> set[str]:
        # a sample's name, or a declared family (a gauge of blocked domains has no
        # sample while nothing is blocked; its # HELP and # TYPE are there)
        text = requests.get(
            f"http://127.0.0.1:{gw.settings['metrics_port']}/metrics", timeout=10
        ).text
        names = {n for n, _ in scrape(gw)}
        names |= {
            fam.name + sfx
            for fam in text_string_to_metric_families(text)
            for sfx in ("", "_total", "_bucket", "_sum", "_count")
        }
        return wanted - names

    try:
        wait_until(lambda: not missing(), 15, 0.2, "every dashboard metric exposed")
    except AssertionError:
        raise AssertionError(f"the dashboard queries what /metrics lacks: {missing()}") from None
    # the scrape config beside it names the default port
    assert "127.0.0.1:9464" in SCRAPE_CONFIG.read_text()


def listening_ports(pids: set[int]) -> set[int]:
    """TCP ports *pids* listen on (IPv4 and IPv6), from /proc."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                inodes[f[9]] = int(f[1].rsplit(":", 1)[1], 16)
    ports = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m and m.group(1) in inodes:
                ports.add(inodes[m.group(1)])
    return ports


@pytest.fixture
def plain_gateway(tmp_path: Path) -> Iterator[Gateway]:
    db = new_ledger(tmp_path)
    prepare_ledger(db)
    g = Gateway(db, {"metrics_port": 0}).start()
    yield g
    g.stop()


@pytest.mark.one_node
def test_metrics_port_0_listens_on_nothing_but_the_proxy(plain_gateway):
    gw = plain_gateway
    assert gw.proc is not None
    pids = {gw.proc.pid, *gw.worker_pids()}
    assert listening_ports(pids) == {gw.port}


def test_the_default_port_is_9464_on_loopback():
    from datorus_core.settings import BY_NAME

    assert BY_NAME["metrics_port"].default == 9464
    assert BY_NAME["metrics_host"].default == "127.0.0.1"


@pytest.mark.one_node
def test_a_metrics_port_in_use_is_reported_once(tmp_path):
    """Every worker of `datorus serve` counts into the launcher's port: no worker binds it."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    db = new_ledger(tmp_path)
    prepare_ledger(db)
    gw = Gateway(db, {"metrics_port": held.getsockname()[1]})
    gw.log = tmp_path / "gateway.log"
    try:
        gw.start(wait=False)
        assert gw.proc is not None
        assert gw.proc.wait(60) == 2
        fatal = [x for x in gw.log.read_text().splitlines() if x.startswith("datorus: fatal: ")]
        assert len(fatal) == 1 and "metrics cannot listen on 127.0.0.1:" in fatal[0], fatal
    finally:
        gw.stop()
        held.close()


def test_serve_sums_its_workers_and_a_reload_keeps_the_totals(tmp_path, origin, redis_server):
    """`datorus serve --workers 2` (whatever DATORUS_GATEWAY_WORKERS says): one port for
    both workers' counts, and replacing every worker (SIGHUP) takes nothing back, not even
    the accounts refused for money in the gauge's window."""
    db = new_ledger(tmp_path)
    prepare_ledger(db)
    mport = free_port()
    sv = Serve(db, 2, {"redis_url": redis_server.url, "metrics_port": mport}).start()
    try:
        _, user, pw = sv.customer(trial_bytes=10**9)
        px = {"http": sv.proxy(user, pw)}
        url = f"http://127.0.0.1:{mport}/metrics"

        def ok200() -> float:
            got = _parse(requests.get(url, timeout=10).text)
            return value(got, "datorus_requests_total", kind="forward", status="200", code="")

        def refused_accounts() -> float:
            got = _parse(requests.get(url, timeout=10).text)
            return value(got, "datorus_accounts_refused_for_money")

        _, broke, broke_pw = sv.customer(trial_bytes=0)
        for _ in range(4):  # new connections: 402s on both workers, very likely
            r = requests.get(
                origin.url("/"), proxies={"http": sv.proxy(broke, broke_pw)}, timeout=10
            )
            assert r.status_code == 402
        wait_until(lambda: refused_accounts() == 1, 15, 0.1, "the refused account counted")
        before = ok200()
        for _ in range(10):  # new connections: the kernel spreads them over the workers
            r = requests.get(origin.url("/"), proxies=px, timeout=10)
            assert r.status_code == 200
        served_by = sv.worker_pids()
        assert ok200() - before == 10
        sv.signal(signal.SIGHUP)
        sv.wait_log("reload done", 120)
        assert sv.worker_pids().isdisjoint(served_by)  # every worker replaced
        assert ok200() - before == 10  # the old workers' counts stay
        assert refused_accounts() == 1  # and so do the accounts they refused (300 s)
        for _ in range(5):
            assert requests.get(origin.url("/"), proxies=px, timeout=10).status_code == 200
        assert ok200() - before == 15
        # the workers' hot state is Redis: its round trips are timed
        got = _parse(requests.get(url, timeout=10).text)
        assert value(got, "datorus_redis_rtt_seconds_count") > 0
    finally:
        assert sv.stop() == 0


def _parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.mark.one_node
def test_an_unparseable_request_is_counted_with_its_code(gw):
    before = scrape(gw)
    with raw_connection(gw.port) as s:
        s.sendall(b"NOT A REQUEST\r\n\r\n")
        status, _, body = read_response(s)
    assert status == 400 and json.loads(body)["error"]["code"] == "VALIDATION_ERROR"
    after = scrape(gw)
    r = "datorus_requests_total"
    assert delta(before, after, r, kind="forward", status="400", code="VALIDATION_ERROR") == 1
    assert total(after, r) - total(before, r) == 1


@pytest.mark.one_node
def test_a_socks5_tunnel_is_counted_as_its_own_kind(gw, origin):
    """Bytes through the SOCKS5 entry are kind ``socks5`` (not ``tunnel``), equal to the
    bytes the ledger bills, and its admission is counted as a ``socks5`` 200."""
    acc, user, pw = gw.customer(trial_bytes=10**9)
    before = scrape(gw)
    used0 = usage(gw.db, acc)["bytes"]
    answer = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, user, pw)
    assert answer.reply == 0
    try:
        status, body = http_get_through(answer, "127.0.0.1", "/bytes/30000")
    finally:
        assert answer.sock is not None
        answer.sock.close()
    assert status == 200 and len(body) == 30000
    wait_until(lambda: usage(gw.db, acc)["bytes"] > used0, 15, 0.1, "usage flushed")
    billed = usage(gw.db, acc)["bytes"] - used0

    def moved() -> float:
        a = scrape(gw)
        return sum(
            delta(before, a, "datorus_bytes_total", kind="socks5", direction=d)
            for d in ("up", "down")
        )

    wait_until(lambda: moved() == billed, 15, 0.1, "socks5 bytes counted")
    after = scrape(gw)
    assert delta(before, after, "datorus_bytes_total", kind="tunnel", direction="down") == 0
    assert (
        total(after, "datorus_requests_total", kind="socks5", status="200")
        - total(before, "datorus_requests_total", kind="socks5", status="200")
        == 1
    )
    # a failed RFC 1929 login is counted as the 407 a CONNECT would get
    bad = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, user, pw + "x")
    assert (bad.auth_status, bad.reply) == (1, None)
    code = {"kind": "socks5", "status": "407", "code": "INVALID_CREDENTIAL"}
    wait_until(
        lambda: delta(after, scrape(gw), "datorus_requests_total", **code) == 1, 15, 0.1, "407"
    )


def _family(pid: int) -> set[int]:
    """*pid* and every process below it (workers, the delivery and pool processes)."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return out


@pytest.mark.one_node
def test_every_port_the_gateway_listens_on_is_refused_through_it(make_gateway):
    """CONTRACT section 2: a request to the gateway's own sockets is always denied, even
    with loopback allowed (as it is here): its proxy port, SOCKS5 entry, REST API and
    ``/metrics`` (which a customer must not read through the proxy), found by asking the
    kernel which ports the gateway's processes listen on (under ``datorus serve`` the
    launcher serves ``/metrics``), by forward request, CONNECT and SOCKS5 alike."""
    g = make_gateway(metrics_port=free_port(), socks5_port=free_port(), api_port=free_port())
    assert g.proc is not None
    expected = {g.port, g.socks_port, g.settings["api_port"], g.settings["metrics_port"]}
    ports = wait_until(
        lambda: p if expected <= (p := listening_ports(_family(g.proc.pid))) else None,
        15,
        0.1,
        "every listener up",
    )
    assert ports == expected  # a new listener must be added to the gateway_self rule too
    acc, user, pw = g.customer(trial_bytes=10**9)
    key = g.cli("key", "create", str(acc))["key"]
    for port in sorted(ports):
        authority = f"127.0.0.1:{port}"
        with raw_connection(g.port) as s:
            s.sendall(
                f"GET http://{authority}/metrics HTTP/1.1\r\nHost: {authority}\r\n"
                f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
            )
            status, headers, body = read_response(s)
        err = assert_envelope(status, headers, body, "AUP_VIOLATION", 403)
        assert err["details"] == {"rule": "gateway_self", "host": "127.0.0.1", "port": port}
        with raw_connection(g.port) as s:
            s.sendall(
                f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
            )
            status, headers, body = read_response(s)
        err = assert_envelope(status, headers, body, "AUP_VIOLATION", 403)
        assert err["details"]["rule"] == "gateway_self", authority
        answer = socks5_connect(g.socks_port, "localhost", port, user, pw)
        assert (answer.auth_status, answer.reply) == (0, 0x02), authority
        # nor a webhook: the API judges its URL by the same list
        r = requests.post(
            f"{g.api_url}/account/webhooks",
            json={"url": f"http://{authority}/hook"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert r.status_code == 403, r.text
        assert r.json()["error"]["details"]["rule"] == "gateway_self", authority
    # /metrics itself still answers its scraper directly
    assert requests.get(f"http://127.0.0.1:{g.settings['metrics_port']}/metrics", timeout=10).ok


@pytest.mark.one_node
def test_socks5_refusals_before_the_connect_are_counted(gw, origin):
    """Every SOCKS5 answer is counted (probe 8, item 15), also those before a CONNECT
    exists: "no authentication" from an address not allow-listed (method 0xFF) as the 407
    a CONNECT without credentials gets, BIND and UDP ASSOCIATE (reply 0x07) as the 400 of a
    request the gateway does not serve."""
    _, user, pw = gw.customer(trial_bytes=10**9)
    r = "datorus_requests_total"
    before = scrape(gw)
    noauth = socks5_connect(gw.socks_port, "127.0.0.1", origin.port)
    assert (noauth.method, noauth.reply) == (0xFF, None)
    for command in (0x02, 0x03):  # BIND, UDP ASSOCIATE
        answer = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, user, pw, command=command)
        assert (answer.auth_status, answer.reply) == (0, 0x07)
    missing = {"kind": "socks5", "status": "407", "code": "INVALID_CREDENTIAL"}
    unsupported = {"kind": "socks5", "status": "400", "code": "VALIDATION_ERROR"}

    def counted() -> bool:
        a = scrape(gw)
        return delta(before, a, r, **missing) == 1 and delta(before, a, r, **unsupported) == 2

    wait_until(counted, 15, 0.1, "the refusals counted")
    assert total(scrape(gw), r) - total(before, r) == 3  # and nothing else
