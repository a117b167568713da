"""Rate limits, the open-tunnel cap and auth-failure throttling, on the wire."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest
import requests
from checks import assert_envelope, assert_rate_headers
from support.clients import basic, raw_connection, read_response
from support.counting import RawOrigin
from support.waiting import wait_until


def get(gw, user, pw, url, session=None):
    s = session or requests
    return s.get(url, proxies={"http": gw.proxy(user, pw)}, timeout=10)


def read_pipelined(f) -> int:
    """The status of the next response on a buffered socket file (its body skipped)."""
    status = int(f.readline().split()[1])
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    f.read(length)
    return status


def test_burst_passes_exactly_then_429_with_headers_and_recovery(gateway, origin):
    rate, burst = 1, 10
    acc, user, pw = gateway.customer(trial_bytes=10**9, rps=rate, burst=burst)
    # the readiness probe took one request: its slot is back 1/rate s later (a slower box
    # only waits longer, and a bucket never holds more than the burst)
    time.sleep(1.1 / rate)
    rs: list[tuple[requests.Response, float, float]] = []  # response, sent, received
    with requests.Session() as s:
        for _ in range(burst + 5):
            sent = time.time()
            r = get(gateway, user, pw, origin.url("/"), s)
            rs.append((r, sent, time.time()))
            if r.status_code != 200:
                break
    statuses = [r.status_code for r, _, _ in rs]
    passed = len(rs) - 1
    # from a full bucket exactly `burst` pass whatever the timing, then one per 1/rate s:
    # more than `burst` only if the run took that long (the limiter's own window bound)
    assert statuses == [200] * passed + [429]
    first, last = rs[0][1], rs[-1][2]
    assert burst <= passed <= burst + int((last - first) * rate)
    for i, (r, sent, got) in enumerate(rs):
        remaining = assert_rate_headers(r.headers, sent, got, rate, burst)
        if i < burst:  # counts down from burst - 1; a slot back meanwhile adds one
            assert burst - 1 - i <= remaining <= burst - 1 - i + int((got - first) * rate)
    r = rs[-1][0]
    err = assert_envelope(r.status_code, r.headers, r.content, "RATE_LIMITED", 429)
    assert err["details"]["limit"] == "requests_per_second"
    assert r.headers["Retry-After"] == "1" == str(err["details"]["retryAfterSeconds"])
    assert r.headers["X-Datorus-RateLimit-Remaining"] == "0"
    # Retry-After is the limiter's promise: waiting that long suffices
    time.sleep(int(r.headers["Retry-After"]))
    assert get(gateway, user, pw, origin.url("/")).status_code == 200


def test_connect_counts_as_one_request_and_its_200_carries_the_headers(gateway, tls_origin):
    rate, burst = 1, 2
    acc, user, pw = gateway.customer(trial_bytes=10**9, rps=rate, burst=burst)
    time.sleep(1.1 / rate)  # the readiness probe's slot comes back (see above)
    answers: list[tuple[int, dict[str, str], float, float]] = []
    for _ in range(burst + 5):
        with raw_connection(gateway.port) as s:
            sent = time.time()
            s.sendall(
                f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1\r\nHost: x\r\n"
                f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
            )
            s.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                assert chunk, head
                head += chunk
            lines = head.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            hdrs = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
            }
            answers.append((int(lines[0].split()[1]), hdrs, sent, time.time()))
        if answers[-1][0] != 200:
            break
    passed = len(answers) - 1
    assert [a[0] for a in answers] == [200] * passed + [429]
    first, last = answers[0][2], answers[-1][3]
    assert burst <= passed <= burst + int((last - first) * rate)
    remaining = [assert_rate_headers(h, sent, got, rate, burst) for _, h, sent, got in answers]
    assert remaining[0] == 1  # exactly one CONNECT taken from the full bucket
    assert 0 <= remaining[1] <= int((answers[1][3] - first) * rate)
    assert remaining[-1] == 0 and answers[-1][1]["retry-after"] == "1"


def _flood(gateway, rate: int, burst: int, seconds: float = 2.0) -> tuple[int, int, float]:
    """Flood one new credential from 3 pipelining connections: (passed, refused, elapsed).

    The flood asks for a denied destination: the limiter runs before acceptable use, so
    a 403 means "passed the limiter" and no origin slows the client down.
    """
    acc, user, pw = gateway.customer(trial_bytes=10**12, rps=rate, burst=burst)
    stop = threading.Event()
    counts = {403: 0, 429: 0}
    other: list = []
    lock = threading.Lock()
    req = (
        "GET http://10.255.0.1/ HTTP/1.1\r\nHost: 10.255.0.1\r\n"
        f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n"
    ).encode()

    def flood() -> None:
        try:
            with raw_connection(gateway.port) as s, s.makefile("rb") as f:
                while not stop.is_set():
                    s.sendall(req * 25)  # pipelined: the client's own cost stays small
                    for _ in range(25):
                        status = read_pipelined(f)
                        with lock:
                            if status in counts:
                                counts[status] += 1
                            else:
                                other.append(status)
        except Exception as e:  # surfaced below: a thread's exception is otherwise lost
            other.append(repr(e))

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - t0
    assert not other
    return counts[403], counts[429], elapsed


def test_limiter_holds_the_rate_at_200_rps(gateway):
    """Flooded for 2 s, what passes is never more than burst + rate * t (+1).

    At 200 rps when this box can outrun that; a 2-core box busy with other tests
    sometimes cannot (then nothing is refused and the run proves nothing), and the
    same check runs at 50 rps instead.
    """
    for rate, burst in ((200, 20), (50, 10)):
        n, refused, elapsed = _flood(gateway, rate, burst)
        print(f"limiter at {rate} rps: {n} passed, {refused} refused in {elapsed:.2f} s")
        if refused:
            break
    assert refused > 0, f"the client never outran {rate} rps ({n} passed): proves nothing"
    assert burst <= n <= burst + rate * elapsed + 1
    # the rate's exact lower bound is proved on the limiter itself
    # (tests/unit/test_ratelimit.py): here client threads pause now and then on a busy
    # box, and a pause longer than burst/rate forfeits tokens


def test_open_tunnel_cap_is_429_with_which_limit(gateway, tls_origin):
    acc, user, pw = gateway.customer(trial_bytes=10**9, max_tunnels=2)
    socks: list[socket.socket] = []

    def connect() -> tuple[int, bytes]:
        s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        socks.append(s)
        s.sendall(
            f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
        )
        return read_response(s)

    try:
        assert connect()[0] == 200
        assert connect()[0] == 200
        status, headers, body = connect()
        err = assert_envelope(status, headers, body, "RATE_LIMITED", 429)
        assert err["details"] == {"limit": "open_tunnels", "maxTunnels": 2, "openTunnels": 2}
        assert headers["retry-after"] == "1"
        socks[0].close()  # one closes: a new one fits again
        wait_until(lambda: connect()[0] == 200, timeout=5, interval=0.1, what="tunnel slot freed")
    finally:
        for s in socks:
            s.close()


def _upgrade(gw, port: int, user: str, pw: str) -> tuple[socket.socket, int, dict, bytes]:
    """A WebSocket-style upgrade through the forward path; the socket stays open."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(
        f"GET http://127.0.0.1:{port}/upgrade HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
    )
    status, headers, body = read_response(s)
    return s, status, headers, body


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the peer closes *s* within *seconds* (data before the close is drained)."""
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass  # reset: closed too
    return True


def test_websockets_count_as_tunnels_against_the_cap(gateway, tls_origin):
    acc, user, pw = gateway.customer(trial_bytes=10**9, max_tunnels=1)
    origin = RawOrigin()
    socks: list[socket.socket] = []
    try:
        ws, status, _, _ = _upgrade(gateway, origin.port, user, pw)
        socks.append(ws)
        assert status == 101
        ws.sendall(b"ping")
        assert ws.recv(4) == b"ping"
        # the WebSocket holds the account's one tunnel: a CONNECT and a second upgrade wait
        c = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        socks.append(c)
        c.sendall(
            f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
        )
        status, headers, body = read_response(c)
        err = assert_envelope(status, headers, body, "RATE_LIMITED", 429)
        assert err["details"] == {"limit": "open_tunnels", "maxTunnels": 1, "openTunnels": 1}
        ws2, status, headers, body = _upgrade(gateway, origin.port, user, pw)
        socks.append(ws2)
        err = assert_envelope(status, headers, body, "RATE_LIMITED", 429)
        assert err["details"]["limit"] == "open_tunnels"
        assert headers["retry-after"] == "1"
        assert [c["requests"] for c in origin.conns] == [1]  # the refused one never left
        ws.close()  # the WebSocket ends: its slot is free again

        def upgraded() -> bool:
            s, status, _, _ = _upgrade(gateway, origin.port, user, pw)
            socks.append(s)
            return status == 101

        wait_until(upgraded, timeout=5, interval=0.1, what="tunnel slot freed")
    finally:
        for s in socks:
            s.close()
        origin.close()


def test_suspension_closes_open_tunnels_and_websockets(gateway, tls_origin, ca):
    acc, user, pw = gateway.customer(trial_bytes=10**9)
    origin = RawOrigin()
    try:
        ws, status, _, _ = _upgrade(gateway, origin.port, user, pw)
        assert status == 101
        tunnel = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        tunnel.sendall(
            f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
        )
        assert read_response(tunnel)[0] == 200
        # both carry traffic while the account is active (a positive sign, not a pause)
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        tls = ctx.wrap_socket(tunnel, server_hostname="localhost")
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(tls)[0] == 200
        ws.sendall(b"ping")
        assert ws.recv(4) == b"ping"
        gateway.cli("account", "suspend", str(acc))
        # within a few seconds (the contract): the gateway picks the change up within 2 s
        assert _closed_within(ws, 4), "the WebSocket outlived its account's suspension"
        assert _closed_within(tls, 4), "the tunnel outlived its account's suspension"
        ws.close()
        tls.close()
    finally:
        origin.close()


def _from(source: str, port: int, user: str, pw: str, target: str) -> int:
    """The status of one forward request sent from local address *source*."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        auth = f"Proxy-Authorization: {basic(user, pw)}\r\n" if user else ""
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        status, headers, body = read_response(s)
        if status == 429:
            err = assert_envelope(status, headers, body, "RATE_LIMITED", 429)
            assert err["details"]["limit"] == "auth_failures"
            assert 1 <= int(headers["retry-after"]) <= 60
        return status


# behind a balancer every client has the balancer's address (README, "Two boxes")
@pytest.mark.one_node
def test_repeated_wrong_credentials_throttle_the_address_not_the_right_ones(make_gateway, origin):
    gw = make_gateway(auth_fail_limit=5, auth_block_seconds=60)
    acc, user, pw = gw.customer(trial_bytes=10**9)
    url = origin.url("/")
    attacker = "127.0.0.3"  # its own address: the readiness probes came from 127.0.0.1
    codes = [_from(attacker, gw.port, user, pw + "x", url) for _ in range(8)]
    assert codes == [407] * 5 + [429] * 3
    # no credentials at all is not a failure; the right credential is never refused;
    # other addresses are not throttled
    assert _from(attacker, gw.port, "", "", url) == 407
    assert _from(attacker, gw.port, user, pw, url) == 200
    assert _from("127.0.0.1", gw.port, user, "wrong", url) == 407
    log = gw.log.read_text()
    assert f"throttling {attacker} after 5 failed logins" in log
    assert pw not in log and basic(user, pw) not in log and basic(user, pw + "x") not in log
