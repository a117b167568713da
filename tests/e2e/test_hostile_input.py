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
from support import Gateway, basic, raw_connection, read_response, wait_until

HEADER_TIMEOUT = 2


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[Gateway]:
    from conftest import _start

    g = _start(tmp_path_factory.mktemp("hostile"), {"header_timeout": HEADER_TIMEOUT})
    yield g
    g.stop()


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


def test_target_with_endless_response_head_is_502(gw, cust, bystander):
    """A hostile target cannot make the gateway buffer an endless response head either."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        c, _ = srv.accept()
        with contextlib.suppress(OSError):
            c.recv(65536)
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
