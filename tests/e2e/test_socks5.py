"""The SOCKS5 entry (RFC 1928 with RFC 1929 auth) on the wire: real curl and a raw client.

A SOCKS5 request gets exactly what a CONNECT gets (CONTRACT section 2): the same
credentials and username options, acceptable use, rate limits and the tunnel cap
(shared with the HTTP entry), billing with a receipt, sticky sessions, suspension; each
refusal is the SOCKS5 reply the contract maps it to, and the log names the Datorus code.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time

import pytest
from support.clients import basic, raw_connection, read_response
from support.counting import CountingRelay
from support.ledger import add_egress, ledger_rows, new_ledger, prepare_ledger
from support.origins import BlockingOrigin
from support.processes import Gateway, GatewaySetup
from support.socks5 import http_get_through, socks5_connect
from support.waiting import free_port, wait_until

from datorus_core import socks

UPSTREAM_TIMEOUT = 3


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    return GatewaySetup({"socks5_port": free_port(), "upstream_timeout": UPSTREAM_TIMEOUT})


@pytest.fixture(scope="module")
def cust(gw):
    return gw.customer(trial_bytes=10**12)


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "30", *args], capture_output=True, text=True, timeout=60
    )


def receipts(gw, account_id: int) -> list[tuple]:
    return ledger_rows(
        gw.db,
        "SELECT method, host, port, status, bytes_up, bytes_down FROM receipts"
        " WHERE account_id = ? AND code IS NULL ORDER BY started_at",
        (account_id,),
    )


def refusals(gw, account_id: int) -> list[tuple]:
    return ledger_rows(
        gw.db,
        "SELECT method, host, port, status, bytes_up, bytes_down, nanocents, code FROM receipts"
        " WHERE account_id = ? AND code IS NOT NULL ORDER BY started_at, finished_at",
        (account_id,),
    )


# -- the way in ---------------------------------------------------------------------------


def test_curl_socks5_hostname_fetches_and_is_billed_with_a_receipt(gw, origin):
    acc, user, pw = gw.customer(trial_bytes=10**12)
    r = curl(
        "--socks5-hostname",
        f"{user}:{pw}@127.0.0.1:{gw.socks_port}",
        f"http://localhost:{origin.port}/bytes/1000",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
    )
    assert r.stdout == "200 1000", r.stderr
    rows = wait_until(lambda: receipts(gw, acc), 5, 0.05, "the SOCKS5 tunnel's receipt")
    method, host, port, status, up, down = rows[0]
    # plain HTTP over SOCKS is bytes in a tunnel: metered as a tunnel, both ways
    assert (method, host, port, status) == ("CONNECT", "localhost", origin.port, 200)
    assert up > 50 and down > 1000
    usage = gw.cli("usage", str(acc))
    assert usage["requests"] == 1 and usage["bytes"] == up + down


def test_curl_socks5_ip_literal_and_tls_passthrough(gw, tls_origin, ca_file):
    acc, user, pw = gw.customer(trial_bytes=10**12)
    r = curl(
        "--socks5",
        f"{user}:{pw}@127.0.0.1:{gw.socks_port}",
        "--cacert",
        ca_file,
        f"https://127.0.0.1:{tls_origin.port}/",
    )
    assert r.returncode == 0 and r.stdout == "hello from origin", r.stderr


def test_httpx_through_the_socks5_entry(gw, cust, tls_origin, ca_file):
    """A Python client with SOCKS5 support (httpx with socksio), as scrapers use it."""
    import httpx

    _, user, pw = cust
    proxy = f"socks5://{user}:{pw}@127.0.0.1:{gw.socks_port}"
    verify = ssl.create_default_context(cafile=ca_file)
    with httpx.Client(proxy=proxy, verify=verify, timeout=20) as c:
        r = c.get(f"https://localhost:{tls_origin.port}/")
        assert (r.status_code, r.text) == (200, "hello from origin")
    wrong = f"socks5://{user}:wrong@127.0.0.1:{gw.socks_port}"
    with httpx.Client(proxy=wrong) as c, pytest.raises(httpx.ProxyError):
        c.get(f"https://localhost:{tls_origin.port}/")


def test_ipv6_literal_target_is_judged_like_a_connect(gw, cust):
    _, user, pw = cust
    # [::1] is allowed by the test ledger; nothing listens there on this port: refused
    port = free_port()
    a = socks5_connect(gw.socks_port, "::1", port, user, pw)
    assert (a.method, a.auth_status, a.reply) == (2, 0, socks.CONNECTION_REFUSED)
    # the cloud metadata address, as an IPv4-mapped IPv6 literal, is denied by policy
    a = socks5_connect(gw.socks_port, "::ffff:169.254.169.254", 80, user, pw)
    assert a.reply == socks.NOT_ALLOWED


def test_username_options_ride_in_the_socks_username(gw, cust, origin):
    _, user, pw = cust
    a = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, f"{user}-session-s5-1", pw)
    assert a.reply == socks.SUCCEEDED
    assert http_get_through(a, "127.0.0.1")[0] == 200
    a.close()


# -- refusals and their replies -------------------------------------------------------------


def test_wrong_password_is_rfc1929_failure(gw, cust):
    _, user, pw = cust
    for name, secret in ((user, pw + "x"), ("dtnosuchuser1", pw), (f"{user}-country-usa", pw)):
        a = socks5_connect(gw.socks_port, "127.0.0.1", 80, name, secret)
        assert (a.method, a.auth_status, a.reply) == (2, 0x01, None), name


def test_no_auth_offer_from_an_unlisted_address_gets_0xff(gw):
    a = socks5_connect(gw.socks_port, "127.0.0.1", 80, methods=b"\x00")
    assert a.method == 0xFF and a.reply is None
    r = curl("--socks5-hostname", f"127.0.0.1:{gw.socks_port}", "http://localhost:9/")
    assert r.returncode == 97 and "No authentication method was acceptable" in r.stderr


def test_acceptable_use_refusal_is_0x02_and_the_log_names_the_code(gw):
    acc, user, pw = gw.customer(trial_bytes=10**12)
    start = gw.log.stat().st_size
    a = socks5_connect(gw.socks_port, "169.254.169.254", 80, user, pw)
    assert a.reply == socks.NOT_ALLOWED
    a = socks5_connect(gw.socks_port, "127.0.0.1", 25, user, pw)  # deny_ports
    assert a.reply == socks.NOT_ALLOWED
    wait_until(
        lambda: "refused with 0x02: 403 AUP_VIOLATION" in gw.log.read_bytes()[start:].decode(),
        5,
        0.05,
        "the log line naming AUP_VIOLATION",
    )
    # each refusal leaves a receipt with its Datorus code (nothing moved, nothing charged)
    rows = wait_until(
        lambda: len(refusals(gw, acc)) == 2 and refusals(gw, acc), 5, 0.05, "the receipts"
    )
    assert rows == [("CONNECT", "169.254.169.254", 80, 403, 0, 0, 0, "AUP_VIOLATION"),
                    ("CONNECT", "127.0.0.1", 25, 403, 0, 0, 0, "AUP_VIOLATION")]  # fmt: skip
    assert gw.cli("usage", str(acc))["requests"] == 0


def test_the_gateways_own_socks_port_is_denied(gw, cust):
    _, user, pw = cust
    a = socks5_connect(gw.socks_port, "127.0.0.1", gw.socks_port, user, pw)
    assert a.reply == socks.NOT_ALLOWED


def test_refused_upstream_is_0x05_unresolvable_is_0x04(gw, cust):
    _, user, pw = cust
    a = socks5_connect(gw.socks_port, "127.0.0.1", free_port(), user, pw)
    assert a.reply == socks.CONNECTION_REFUSED
    a = socks5_connect(gw.socks_port, "nonexistent.invalid", 80, user, pw)
    assert a.reply == socks.HOST_UNREACHABLE


def test_a_name_that_cannot_be_a_host_is_0x04(gw, cust):
    _, user, pw = cust
    a = socks5_connect(gw.socks_port, "evil.example\r\nX-Injected: 1", 80, user, pw, domain=True)
    assert a.reply == socks.HOST_UNREACHABLE


def test_upstream_timeout_is_0x06(gw, cust):
    _, user, pw = cust
    # a listening socket whose accept queue is full: the kernel drops further SYNs, so a
    # connect to it neither succeeds nor fails before the gateway's timer
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(full.getsockname())
            fillers.append(c)
        a = socks5_connect(gw.socks_port, "127.0.0.1", full.getsockname()[1], user, pw)
        assert a.reply == socks.TTL_EXPIRED
    finally:
        for c in fillers:
            c.close()
        full.close()


def test_rate_limit_is_shared_with_the_http_entry_and_is_0x02(gw, origin):
    acc, user, pw = gw.customer(trial_bytes=10**12, rps=1, burst=1)
    time.sleep(1.1)  # the readiness probe's slot comes back
    # the HTTP entry takes the one request of the burst...
    with raw_connection(gw.port) as s:
        s.sendall(
            f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
        )
        assert read_response(s)[0] == 200
    # ...so the SOCKS5 entry is over the limit at once
    a = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, user, pw)
    assert a.reply == socks.NOT_ALLOWED


def test_tunnel_cap_is_shared_with_the_http_entry(gw, origin):
    acc, user, pw = gw.customer(trial_bytes=10**12, max_tunnels=1)
    a = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, user, pw)
    assert a.reply == socks.SUCCEEDED
    try:
        with raw_connection(gw.port) as s:
            s.sendall(
                f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n"
                f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
            )
            status, _, body = read_response(s)
        assert status == 429 and b"open_tunnels" in body
        b = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, user, pw)
        assert b.reply == socks.NOT_ALLOWED
    finally:
        a.close()
    # the slot is given back when the tunnel closes
    wait_until(
        lambda: socks5_connect(gw.socks_port, "127.0.0.1", origin.port, user, pw).reply == 0,
        10,
        0.1,
        "the tunnel slot back",
    )


def test_trial_exhausted_is_0x02(gw, origin):
    acc, user, pw = gw.customer(trial_bytes=0)
    a = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, user, pw)
    assert (a.auth_status, a.reply) == (0, socks.NOT_ALLOWED)
    rows = wait_until(lambda: refusals(gw, acc), 5, 0.05, "the receipt")
    assert [(r[3], r[7]) for r in rows] == [(402, "TRIAL_EXHAUSTED")]


def test_suspension_closes_the_socks_tunnel_and_refuses_new_ones(gw, origin):
    acc, user, pw = gw.customer(trial_bytes=10**12)
    a = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, user, pw)
    assert a.reply == socks.SUCCEEDED and a.sock is not None
    gw.cli("account", "suspend", str(acc))
    a.sock.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        assert a.sock.recv(1) == b""  # closed by the gateway
    a.close()
    # every process serving the port has read the suspension (each reads the ledger itself)
    probe = (
        f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n"
    ).encode()
    gw.each_worker(probe, lambda answer: b"ACCOUNT_SUSPENDED" in answer[2], 10)
    b = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, user, pw)
    assert b.reply == socks.NOT_ALLOWED


def test_unsupported_command_is_0x07(gw, cust):
    _, user, pw = cust
    with raw_connection(gw.socks_port) as s:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        u, p = user.encode(), pw.encode()
        s.sendall(bytes((1, len(u))) + u + bytes((len(p),)) + p)
        assert s.recv(2) == b"\x01\x00"
        s.sendall(b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50")  # BIND
        assert s.recv(2) == b"\x05\x07"


# -- metering: the same download over SOCKS5 and over CONNECT -----------------------------


def _tls_download(sock: socket.socket, ca, path: str) -> int:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    got = 0
    with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        while data := tls.recv(1 << 16):
            got += len(data)
    return got


def test_50mb_over_socks_is_metered_as_the_same_download_over_connect(gw, tls_origin, ca):
    acc, user, pw = gw.customer(trial_bytes=10**12)
    relay = CountingRelay(tls_origin.port)
    try:
        a = socks5_connect(gw.socks_port, "127.0.0.1", relay.port, user, pw)
        assert a.reply == socks.SUCCEEDED and a.sock is not None
        got = _tls_download(a.sock, ca, "/bytes/50000000")
        assert 50_000_000 < got < 50_000_000 + 1024
        wait_until(lambda: relay.active == 0 and receipts(gw, acc), 10, 0.05, "the receipt")
        socks_row = receipts(gw, acc)[0]
        # what the target saw, exactly
        assert (socks_row[4], socks_row[5]) == (relay.up, relay.down)
        up1, down1 = relay.up, relay.down
        with raw_connection(gw.port, timeout=30) as s:
            s.sendall(
                f"CONNECT 127.0.0.1:{relay.port} HTTP/1.1\r\nHost: x\r\n"
                f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(1)
            assert head.startswith(b"HTTP/1.1 200")
            assert _tls_download(s.dup(), ca, "/bytes/50000000") == got
        wait_until(lambda: len(receipts(gw, acc)) == 2, 10, 0.05, "the CONNECT's receipt")
        connect_row = receipts(gw, acc)[1]
        assert (connect_row[4], connect_row[5]) == (relay.up - up1, relay.down - down1)
        # the same bytes but for what TLS itself varies (keys, session tickets)
        assert abs((socks_row[4] + socks_row[5]) - (connect_row[4] + connect_row[5])) < 2048
    finally:
        relay.close()


# -- sticky sessions and egress ---------------------------------------------------------------

SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@pytest.fixture(scope="module")
def peer_origin():
    o = BlockingOrigin("127.0.0.1")
    yield o
    o.close()


@pytest.fixture(scope="module")
def pool_gw(tmp_path_factory, peer_origin):
    """A gateway with a SOCKS5 entry whose pool is three source addresses."""
    db = new_ledger(tmp_path_factory.mktemp("socks-pool"))
    prepare_ledger(db)
    add_egress(db, [(f"direct://{ip}", "us") for ip in SOURCES])
    g = Gateway(
        db,
        {
            "socks5_port": free_port(),
            "egress_check_seconds": 1,
            "egress_check_url": peer_origin.url("/peer"),
        },
    ).start()
    acc, user, pw = g.customer(trial_bytes=10**12)
    g.user, g.pw = user, pw
    seen: set[str] = set()

    def all_live() -> bool:
        a = socks5_connect(g.socks_port, "127.0.0.1", peer_origin.port, user, pw)
        if a.reply == 0:
            seen.add(http_get_through(a, "127.0.0.1", "/peer")[1].decode())
            a.close()
        return seen >= set(SOURCES)

    try:  # a gateway that never gets ready is stopped too, not left running
        wait_until(all_live, 40, 0.01, "every source address in use")
        yield g
    finally:
        g.stop()


def _exit(g, peer_origin, user: str) -> str:
    a = socks5_connect(g.socks_port, "127.0.0.1", peer_origin.port, user, g.pw)
    assert a.reply == socks.SUCCEEDED
    try:
        status, body = http_get_through(a, "127.0.0.1", "/peer")
    finally:
        a.close()
    assert status == 200
    return body.decode()


def test_a_socks_session_keeps_one_egress_and_matches_the_http_session(pool_gw, peer_origin):
    g = pool_gw
    exits = {_exit(g, peer_origin, f"{g.user}-session-sticky-1") for _ in range(8)}
    assert len(exits) == 1 and exits <= set(SOURCES)
    # the same session through the HTTP entry (the header) leaves the same way
    with raw_connection(g.port) as s:
        s.sendall(
            f"GET {peer_origin.url('/peer')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Proxy-Authorization: {basic(g.user, g.pw)}\r\n"
            "X-Datorus-Session-Id: sticky-1\r\n\r\n".encode()
        )
        status, _, body = read_response(s)
    assert status == 200 and body.decode() in exits
    # without a session the tunnels spread over the pool
    spread = {_exit(g, peer_origin, g.user) for _ in range(30)}
    assert len(spread) >= 2


# -- failed logins --------------------------------------------------------------------------


def test_failed_socks5_logins_count_against_the_address_like_407s(make_gateway, origin):
    """Wrong SOCKS5 passwords throttle the address on both entries; a right one still works."""
    g = make_gateway(socks5_port=free_port(), auth_fail_limit=3)
    acc, user, pw = g.customer(trial_bytes=10**12)
    for _ in range(4):
        a = socks5_connect(g.socks_port, "127.0.0.1", origin.port, user, "wrong")
        assert a.auth_status == 0x01
    with raw_connection(g.port) as s:
        s.sendall(
            f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, 'wrong')}\r\n\r\n".encode()
        )
        status, _, body = read_response(s)
    assert status == 429 and b"auth_failures" in body
    a = socks5_connect(g.socks_port, "127.0.0.1", origin.port, user, pw)
    assert a.reply == socks.SUCCEEDED  # a correct credential is never refused for them
    a.close()
