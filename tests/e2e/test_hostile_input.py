"""Malformed and hostile input: an envelope or a closed connection, never a crash or a leak.

Every case runs while a well-behaved client keeps being served on its own connection,
and the origin must never see the malformed request.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from checks import assert_envelope
from support.clients import basic, raw_connection, read_response
from support.processes import Gateway, GatewaySetup
from support.waiting import wait_until

HEADER_TIMEOUT = 2


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    return GatewaySetup({"header_timeout": HEADER_TIMEOUT})


@pytest.fixture(scope="module")
def cust(gw) -> tuple[int, str, str]:
    return gw.customer(trial_bytes=10**12)


@pytest.fixture
def bystander(gw, cust, origin) -> Iterator[list]:
    """A well-behaved client on its own keep-alive connection, served throughout the test."""
    _, user, pw = cust
    stop, results = threading.Event(), []

    def run() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.get(origin.url("/"), proxies={"http": gw.proxy(user, pw)}, timeout=5)
                    results.append(r.status_code)
                except requests.RequestException as e:
                    results.append(repr(e))
                time.sleep(0.02)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_until(lambda: results, timeout=10, what="bystander served")
    yield results
    stop.set()
    t.join(10)
    assert results and all(r == 200 for r in results), results[-5:]


def answer(gw: Gateway, raw: bytes, timeout: float = 5.0) -> tuple[int, dict, bytes] | None:
    """Send *raw*; the response, or None if the gateway closed the connection instead."""
    with raw_connection(gw.port, timeout=timeout) as s:
        s.sendall(raw)
        try:
            return read_response(s, timeout=timeout)
        except ConnectionError:
            return None


def auth(cust) -> str:
    return f"Proxy-Authorization: {basic(cust[1], cust[2])}\r\n"


MALFORMED = {
    "garbage_request_line": "GARBAGE\r\n\r\n",
    "bad_absolute_uri": "GET http://exa mple.com/ HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
    "bad_port": "GET http://127.0.0.1:99999/ HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
    "connect_without_port": "CONNECT 127.0.0.1 HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n",
    "connect_port_zero": "CONNECT 127.0.0.1:0 HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n",
    "invalid_header_name": "GET {url} HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n{auth}\r\n",
    "header_without_colon": "GET {url} HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n{auth}\r\n",
    "invalid_header_value": "GET {url} HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n{auth}\r\n",
    "cl_and_te": "POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    "Transfer-Encoding: chunked\r\n{auth}\r\n0\r\n\r\n",
    "duplicate_content_length": "POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    "Content-Length: 6\r\n{auth}\r\nhello!",
    "negative_content_length": "POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n{auth}\r\n",
    "unknown_transfer_encoding": "POST {url} HTTP/1.1\r\nHost: x\r\n"
    "Transfer-Encoding: gzip\r\n{auth}\r\nxx",
    "http_0_9_version": "GET {url} HTTP/0.9\r\n{auth}\r\n",
    "obs_fold_first_header": "GET {url} HTTP/1.1\r\n folded: x\r\n{auth}\r\n",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_400_envelope_or_close_and_never_reaches_origin(
    gw, cust, origin, bystander, case
):
    seen = len(origin.seen)
    raw = MALFORMED[case].format(auth=auth(cust), url=origin.url("/never")).encode("latin-1")
    t0 = time.monotonic()
    got = answer(gw, raw)
    assert time.monotonic() - t0 < 5
    if got is not None:
        status, headers, body = got
        err = assert_envelope(status, headers, body, "VALIDATION_ERROR", 400)
        assert err["details"]["field"] and err["details"]["reason"]
    # a later request that reaches the origin: once it is there, a leaked one would be too
    marker = f"/after-{case}"
    r = requests.get(origin.url(marker), proxies={"http": gw.proxy(cust[1], cust[2])}, timeout=10)
    assert r.status_code == 200 and [x["path"] for x in origin.seen[seen:]].count(marker) == 1
    assert not [r for r in origin.seen[seen:] if "/never" in r["path"]]


def test_oversized_request_head_is_400_without_waiting_for_its_end(gw, cust, bystander):
    """A head that never ends is refused once it passes 64 KiB: nothing buffers it whole."""
    with raw_connection(gw.port) as s:
        s.sendall(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):  # the gateway may close while we still send
            for _ in range(25):  # 200 kB of one head that has no end
                s.sendall(b"X-Pad: " + b"a" * 8000 + b"\r\n")
        status, headers, body = read_response(s, timeout=5)
        err = assert_envelope(status, headers, body, "VALIDATION_ERROR", 400)
        assert err["details"]["reason"] == "request head larger than 65536 bytes"
        assert headers["connection"] == "close"


def test_too_many_header_fields_is_400(gw, cust, origin, bystander):
    seen = len(origin.seen)
    fields = "".join(f"X-F{i}: {i}\r\n" for i in range(150))
    raw = f"GET {origin.url('/never')} HTTP/1.1\r\nHost: x\r\n{fields}{auth(cust)}\r\n"
    status, headers, body = answer(gw, raw.encode())
    err = assert_envelope(status, headers, body, "VALIDATION_ERROR", 400)
    assert err["details"] == {"field": "headers", "reason": "more than 100 fields"}
    assert not [r for r in origin.seen[seen:] if "/never" in r["path"]]


def test_slowloris_is_closed_after_header_timeout_without_starving_others(gw, cust, bystander):
    socks = []
    try:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            s.sendall(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        t0 = time.monotonic()
        for s in socks:
            try:
                while True:
                    s.sendall(b"X-Slow: 1\r\n")  # a trickle that never ends the head
                    s.settimeout(0.3)
                    try:
                        if s.recv(1) == b"":
                            break
                    except TimeoutError:
                        pass
                    assert time.monotonic() - t0 < HEADER_TIMEOUT + 5, "slow client kept open"
            except OSError:
                pass  # reset: closed as well
        assert time.monotonic() - t0 < HEADER_TIMEOUT + 5
    finally:
        for s in socks:
            s.close()


def test_idle_connection_that_never_sends_is_closed(gw, bystander):
    with raw_connection(gw.port, timeout=HEADER_TIMEOUT + 5) as s:
        t0 = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(1) == b""
        assert HEADER_TIMEOUT - 0.5 < time.monotonic() - t0 < HEADER_TIMEOUT + 5


def test_keepalive_connection_survives_between_quick_requests(gw, cust, origin):
    """The header timer must not cut a client that simply keeps its connection alive.

    One raw socket, so a connection the gateway cut shows (a client library would quietly
    open a new one); the pauses are the point: together they outlast the header timeout.
    """
    req = f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n{auth(cust)}\r\n".encode()
    with raw_connection(gw.port) as s:
        for _ in range(3):
            s.sendall(req)
            assert read_response(s)[0] == 200
            time.sleep(HEADER_TIMEOUT * 0.75)
        s.sendall(req)
        assert read_response(s)[0] == 200


@pytest.mark.parametrize("complete", [False, True], ids=["endless", "complete_100kb"])
def test_target_with_oversized_response_head_is_502(gw, cust, bystander, complete):
    """A hostile target cannot make the gateway buffer (or relay) a huge response head."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        c, _ = srv.accept()
        with contextlib.suppress(OSError):
            c.recv(65536)
            if complete:  # one write: the head ends in the read that passes 64 KiB
                c.sendall(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"b" * 100_000 + b"\r\n\r\n")
            else:
                c.sendall(b"HTTP/1.1 200 OK\r\n")
                for _ in range(100):
                    c.sendall(b"X-Pad: " + b"b" * 8000 + b"\r\n")
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        raw = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n{auth(cust)}\r\n"
        status, headers, body = answer(gw, raw.encode())
        err = assert_envelope(status, headers, body, "UPSTREAM_FAILED", 502)
        assert err["details"]["reason"] == "response head larger than 65536 bytes"
    finally:
        srv.close()
        t.join(5)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_body_of_a_refused_request_is_not_held_in_memory(gw, bystander):
    """A 407 with a 60 MB body behind it: the gateway drops the body, it does not buffer it."""
    size = 60 * 1024 * 1024
    before = _rss_mib(gw.proc.pid)
    with raw_connection(gw.port, timeout=30) as s:
        s.sendall(
            b"POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {size}\r\n\r\n".encode()
        )
        chunk = b"u" * (1 << 20)
        for _ in range(size // len(chunk)):
            s.sendall(chunk)
        status, headers, body = read_response(s, timeout=10)
    assert_envelope(status, headers, body, "INVALID_CREDENTIAL", 407)
    assert _rss_mib(gw.proc.pid) - before < 30  # buffered whole, it would be 60+ MiB


def test_client_flooding_while_its_request_is_answered_is_disconnected(gw, cust, origin, bystander):
    with raw_connection(gw.port, timeout=30) as s:
        s.sendall(f"GET {origin.url('/slow?s=3')} HTTP/1.1\r\nHost: x\r\n{auth(cust)}\r\n".encode())
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 64 * 1024 * 1024:  # far more than any pipelining client sends
                s.sendall(b"p" * 65536)
                sent += 65536
        assert sent < 64 * 1024 * 1024, "the gateway kept buffering a flood"


# -- request head size: every way a head can grow ------------------------------------------

HEAD_LIMIT = 64 * 1024
KB = 1000


@pytest.fixture
def sink() -> Iterator[socket.socket]:
    """A target that never accepts: a connection waiting in its backlog is a leaked head.

    (The test origin cannot tell: its http.server answers a line over 64 KiB with its
    own 431 before it records anything.)
    """
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setblocking(False)
    yield srv
    srv.close()


def reached(sink: socket.socket) -> bool:
    """Whether the gateway opened a connection to *sink*."""
    try:
        sink.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def make_head(
    method: str, shape: str, size: int, target: str, auth_line: str, version: str, extra: str = ""
) -> bytes:
    """A request head of exactly *size* bytes (blank line included), grown by *shape*."""
    line = f"{method} {target} {version}\r\n"
    fixed = f"Host: x\r\n{auth_line}{extra}"

    def fill(n: int) -> str:  # header lines of exactly n bytes (n >= 16)
        if shape == "long_line":
            return f"X-Pad: {'a' * (n - 9)}\r\n"
        if shape == "long_name":
            return f"X-{'n' * (n - 7)}: 1\r\n"
        each = {"many_lines": 2000, "many_small": 10}[shape]  # 2 KB lines or 10-byte ones
        count = (n - 8) // each
        lines = [f"X{i:04}: {'v' * (each - 9)}\r\n" for i in range(count)]
        return "".join(lines) + f"X-Z: {'z' * (n - 7 - count * each)}\r\n"

    if shape == "request_line":  # pad the target: a query, or for CONNECT the host name
        pad = size - len(line) - len(fixed) - 2
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            labels = "a." * (pad // 2) + "a" * (pad % 2)
            line = f"{method} {labels}{host}:{port} {version}\r\n"
        else:
            line = f"{method} {target}?{'q' * (pad - 1)} {version}\r\n"
        raw = line + fixed + "\r\n"
    else:
        raw = line + fixed + fill(size - len(line) - len(fixed) - 2) + "\r\n"
    out = raw.encode()
    assert len(out) == size
    return out


def send_head(gw: Gateway, raw: bytes, chunk: int = 0) -> tuple[int, dict, bytes]:
    """Send *raw* (all at once, or *chunk* bytes at a time); the gateway's answer."""
    with raw_connection(gw.port, timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):  # the gateway may refuse before the end
            if chunk:
                for i in range(0, len(raw), chunk):
                    s.sendall(raw[i : i + chunk])
                    time.sleep(0.005)  # a client that trickles its head
            else:
                s.sendall(raw)
        return read_response(s, timeout=10)


OVERSIZED = {  # (method, shape, size, version, chunk)
    "one_long_line": ("GET", "long_line", 100 * KB, "HTTP/1.1", 0),
    "many_lines": ("GET", "many_lines", 100 * KB, "HTTP/1.1", 0),
    "long_request_line": ("GET", "request_line", 100 * KB, "HTTP/1.1", 0),
    "long_header_name": ("GET", "long_name", 100 * KB, "HTTP/1.1", 0),
    "many_small_headers": ("GET", "many_small", 100 * KB, "HTTP/1.1", 0),
    "one_byte_over": ("GET", "many_lines", HEAD_LIMIT + 1, "HTTP/1.1", 0),
    "one_long_line_1mb": ("GET", "long_line", 1000 * KB, "HTTP/1.1", 0),
    "one_long_line_10mb": ("GET", "long_line", 10000 * KB, "HTTP/1.1", 0),
    "http_1_0": ("GET", "long_line", 100 * KB, "HTTP/1.0", 0),
    "slow_small_chunks": ("GET", "long_line", 100 * KB, "HTTP/1.1", 1000),
    "connect_long_value": ("CONNECT", "long_line", 100 * KB, "HTTP/1.1", 0),
    "connect_many_small_headers": ("CONNECT", "many_small", 100 * KB, "HTTP/1.1", 0),
    "connect_long_authority": ("CONNECT", "request_line", 100 * KB, "HTTP/1.1", 0),
    "connect_10mb": ("CONNECT", "long_line", 10000 * KB, "HTTP/1.1", 0),
}


@pytest.mark.parametrize("case", list(OVERSIZED))
def test_request_head_over_64_kib_is_400_envelope_and_never_forwarded(gw, cust, sink, case):
    method, shape, size, version, chunk = OVERSIZED[case]
    port = sink.getsockname()[1]
    target = f"127.0.0.1:{port}" if method == "CONNECT" else f"http://127.0.0.1:{port}/never"
    raw = make_head(method, shape, size, target, auth(cust), version)
    status, headers, body = send_head(gw, raw, chunk)
    err = assert_envelope(status, headers, body, "VALIDATION_ERROR", 400)
    assert err["details"] == {
        "field": "request",
        "reason": f"request head larger than {HEAD_LIMIT} bytes",
    }
    assert not reached(sink)


UNDERSIZED = {  # (method, shape, head size, body size)
    "one_long_line_60kib": ("GET", "long_line", 60 * 1024, 0),
    "many_lines_at_the_limit": ("GET", "many_lines", HEAD_LIMIT, 0),
    "head_at_the_limit_and_1mb_body_in_one_write": ("POST", "many_lines", HEAD_LIMIT, 1000 * KB),
    "connect_60kib": ("CONNECT", "long_line", 60 * 1024, 0),
}


@pytest.mark.parametrize("case", list(UNDERSIZED))
def test_request_head_up_to_64_kib_is_served(gw, cust, origin, case):
    method, shape, size, body_len = UNDERSIZED[case]
    target = f"127.0.0.1:{origin.port}" if method == "CONNECT" else origin.url("/")
    extra = f"Content-Length: {body_len}\r\n" if body_len else ""
    raw = make_head(method, shape, size, target, auth(cust), "HTTP/1.1", extra)
    seen = len(origin.seen)
    status, _, body = send_head(gw, raw + b"u" * body_len)
    assert status == 200, body
    if method != "CONNECT":
        assert len(origin.seen) == seen + 1
        assert origin.seen[-1]["body_len"] == body_len
