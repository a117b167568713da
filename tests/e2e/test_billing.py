"""Pay per byte: exact metering, trial then balance, 402s, cut-off, durability.

Metered bytes are compared with what a byte-counting origin (forward requests) or a
byte-counting TCP relay in front of the target (tunnels, WebSockets) saw on the wire.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import requests
from checks import assert_envelope
from support.clients import basic, raw_connection, read_response
from support.counting import CountingRelay, RawOrigin
from support.ledger import cli, is_url, ledger_exec, ledger_row, ledger_rows
from support.waiting import wait_until

NANO = 10**9


@pytest.fixture(scope="module")
def raw_origin():
    o = RawOrigin()
    yield o
    o.close()


def receipt(gw, request_id: str) -> dict:
    """The receipt of a request, once the gateway has flushed it."""

    def get():
        r = cli(gw.db, "receipt", request_id, check=False)
        return r if "requestId" in r else None

    return wait_until(get, timeout=5, interval=0.05, what=f"receipt {request_id}")


def fresh_get(gw, user, pw, url, **kw) -> requests.Response:
    with requests.Session() as s:
        return s.get(url, proxies={"http": gw.proxy(user, pw)}, timeout=60, **kw)


def open_tunnel(gw, user, pw, port: int) -> tuple[socket.socket, dict[str, str]]:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    s.sendall(
        f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), head
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    return s, headers


def tls_download(sock: socket.socket, ca, path: str) -> int:
    """GET *path* over TLS inside a tunnel; returns body bytes received before EOF."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    got = 0
    try:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            while True:
                data = tls.recv(1 << 16)
                if not data:
                    break
                got += len(data)
    except (OSError, ssl.SSLError):
        pass
    return got


def account(gw, acc_id: int) -> dict:
    return gw.cli("account", "show", str(acc_id))


# -- exact metering ---------------------------------------------------------------------


def test_forward_get_is_metered_exactly_as_the_origin_saw_it(gateway, raw_origin):
    acc, user, pw = gateway.customer(trial_bytes=10**9)
    before = len(raw_origin.conns)
    r = fresh_get(gateway, user, pw, raw_origin.url("/bytes/12345"))
    assert r.status_code == 200 and len(r.content) == 12345
    rec = receipt(gateway, r.headers["X-Datorus-Request-Id"])
    conn = raw_origin.conns[before]
    assert rec["bytesUp"] == conn["in"]
    assert rec["bytesDown"] == conn["out"]
    assert rec["status"] == 200 and rec["method"] == "GET"
    assert rec["trialBytes"] == conn["in"] + conn["out"] and rec["nanocents"] == 0


def test_forward_post_is_metered_exactly(gateway, raw_origin):
    acc, user, pw = gateway.customer(trial_bytes=10**9)
    before = len(raw_origin.conns)
    body = b"p" * 300_000
    with requests.Session() as s:
        r = s.post(
            raw_origin.url("/upload"),
            data=body,
            proxies={"http": gateway.proxy(user, pw)},
            timeout=30,
        )
    assert r.status_code == 200
    rec = receipt(gateway, r.headers["X-Datorus-Request-Id"])
    conn = raw_origin.conns[before]
    # the body and a request head (well under 1 KiB) went up, nothing else
    assert len(body) < rec["bytesUp"] == conn["in"] < len(body) + 1024
    assert rec["bytesDown"] == conn["out"]


def chunked_size(n: int, k: int) -> int:
    """Bytes RawOrigin writes for ``/chunked/N/K``: its head, every chunk framed, the end."""
    size, total, left = (
        max(1, n // k),
        len(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        n,
    )
    while left:
        part = min(size, left)
        total += len(b"%x\r\n" % part) + part + 2
        left -= part
    return total + len(b"0\r\n\r\n")


def test_chunked_response_framing_is_metered(gateway, raw_origin):
    acc, user, pw = gateway.customer(trial_bytes=10**9)
    before = len(raw_origin.conns)
    r = fresh_get(gateway, user, pw, raw_origin.url("/chunked/100000/37"))
    assert len(r.content) == 100000
    rec = receipt(gateway, r.headers["X-Datorus-Request-Id"])
    conn = raw_origin.conns[before]
    assert rec["bytesDown"] == conn["out"] == chunked_size(100000, 37)  # framing included
    assert rec["bytesUp"] == conn["in"]


def test_streamed_100mb_download_is_metered_exactly(gateway, raw_origin):
    acc, user, pw = gateway.customer(trial_bytes=10**12)
    before = len(raw_origin.conns)
    n = 100_000_000
    got = 0
    with (
        requests.Session() as s,
        s.get(
            raw_origin.url(f"/bytes/{n}"),
            proxies={"http": gateway.proxy(user, pw)},
            stream=True,
            timeout=120,
        ) as r,
    ):
        for chunk in r.iter_content(1 << 20):
            got += len(chunk)
        rid = r.headers["X-Datorus-Request-Id"]
    assert got == n
    rec = receipt(gateway, rid)
    conn = raw_origin.conns[before]
    assert rec["bytesDown"] == conn["out"]
    assert rec["bytesUp"] == conn["in"]
    usage = gateway.cli("usage", str(acc))
    assert usage["bytes"] == conn["in"] + conn["out"] and usage["requests"] == 1


def test_tunnel_50mb_tls_download_is_metered_exactly(gateway, tls_origin, ca):
    relay = CountingRelay(tls_origin.port)
    acc, user, pw = gateway.customer(trial_bytes=10**12)
    sock, headers = open_tunnel(gateway, user, pw, relay.port)
    got = tls_download(sock, ca, "/bytes/50000000")
    assert 50_000_000 < got < 50_000_000 + 1024  # the body and the origin's response head
    rec = receipt(gateway, headers["x-datorus-request-id"])
    wait_until(
        lambda: relay.up == rec["bytesUp"] and relay.down == rec["bytesDown"],
        timeout=5,
        what=f"relay {relay.up}/{relay.down} == receipt {rec['bytesUp']}/{rec['bytesDown']}",
    )
    assert rec["method"] == "CONNECT" and rec["status"] == 200
    relay.close()


def _ws_frame_read(sock: socket.socket) -> bytes:
    """One unmasked server frame's payload."""

    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "connection closed mid-frame"
            buf += chunk
        return buf

    _, n = exact(2)
    n &= 0x7F
    if n == 126:
        n = int.from_bytes(exact(2), "big")
    elif n == 127:
        n = int.from_bytes(exact(8), "big")
    return exact(n)


def test_forward_websocket_upgrade_is_metered_exactly(gateway):
    """A WebSocket through the forward path: the 101 carries the request id, then frames."""
    from websockets.frames import Frame, Opcode

    acc, user, pw = gateway.customer(trial_bytes=10**12)

    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)

    result: dict = {}
    ready = threading.Event()
    stop = threading.Event()

    def serve() -> None:
        import websockets

        async def main() -> None:
            async with websockets.serve(echo, "127.0.0.1", 0, compression=None) as server:
                result["port"] = server.sockets[0].getsockname()[1]
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)

        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
    relay = CountingRelay(result["port"])
    try:
        with raw_connection(gateway.port) as s:
            s.sendall(
                f"GET http://127.0.0.1:{relay.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(1)
                assert chunk, head
                head += chunk
            lines = head.decode().split("\r\n")
            assert lines[0].startswith("HTTP/1.1 101"), head
            headers = {
                k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)
            }
            rid = headers["x-datorus-request-id"]
            frames_up = frames_down = 0
            for size in (10, 1000, 100_000):
                frame = Frame(Opcode.BINARY, b"z" * size)
                frames_up += len(frame.serialize(mask=True))
                frames_down += len(frame.serialize(mask=False))
                s.sendall(frame.serialize(mask=True))
                assert len(_ws_frame_read(s)) == size
            close = Frame(Opcode.CLOSE, b"\x03\xe8")
            frames_up += len(close.serialize(mask=True))
            frames_down += len(close.serialize(mask=False))
            s.sendall(close.serialize(mask=True))
            assert _ws_frame_read(s) == b"\x03\xe8"  # the origin's own close, relayed as is
        rec = receipt(gateway, rid)
        wait_until(
            lambda: relay.up == rec["bytesUp"] and relay.down == rec["bytesDown"],
            timeout=5,
            what=f"relay {relay.up}/{relay.down} == receipt {rec['bytesUp']}/{rec['bytesDown']}",
        )
        # the frames both ways and one HTTP head each way (well under 1 KiB): no more
        assert rec["status"] == 101
        assert frames_up < relay.up < frames_up + 1024
        assert frames_down < relay.down < frames_down + 1024
    finally:
        stop.set()
        relay.close()
        t.join(5)


def test_websocket_through_connect_is_metered_exactly(gateway):
    """The websockets client's own proxy support: a CONNECT tunnel carrying the WebSocket."""
    import websockets

    acc, user, pw = gateway.customer(trial_bytes=10**12)

    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)

    async def run():
        async with websockets.serve(echo, "127.0.0.1", 0, compression=None) as server:
            relay = CountingRelay(server.sockets[0].getsockname()[1])
            async with websockets.connect(
                f"ws://127.0.0.1:{relay.port}/",
                proxy=gateway.proxy(user, pw),
                open_timeout=10,
                compression=None,
            ) as ws:
                for size in (10, 1000, 100_000):
                    await ws.send(b"z" * size)
                    assert len(await asyncio.wait_for(ws.recv(), 10)) == size
            return relay

    relay = asyncio.run(run())

    def rec():
        row = ledger_row(
            gateway.db,
            "SELECT bytes_up, bytes_down, method FROM receipts WHERE port = ? AND account_id = ?",
            (relay.port, acc),
        )
        return row if row and row[:2] == (relay.up, relay.down) else None

    up, down, method = wait_until(rec, timeout=5, what="tunnel receipt equals the relay's count")
    # 101,010 bytes of messages each way, plus framing and the handshake (under 2 KiB)
    assert method == "CONNECT"
    assert 101_010 < up < 101_010 + 2048 and 101_010 < down < 101_010 + 2048
    relay.close()


def test_gateway_errors_are_not_billed(gateway, raw_origin):
    from support.waiting import free_port

    acc, user, pw = gateway.customer(trial_bytes=10**9)
    r = fresh_get(gateway, user, pw, f"http://127.0.0.1:{free_port()}/")
    assert r.status_code == 502
    r = fresh_get(gateway, user, pw + "x", "http://127.0.0.1:9/")
    assert r.status_code == 407
    # a later request that is billed: once it shows, the earlier ones would have too
    before = len(raw_origin.conns)
    marker = fresh_get(gateway, user, pw, raw_origin.url("/bytes/100"))
    assert marker.status_code == 200
    usage = wait_until(
        lambda: (u := gateway.cli("usage", str(acc)))["requests"] and u, 5, 0.05, "marker billed"
    )
    conn = raw_origin.conns[before]
    assert usage["requests"] == 1 and usage["bytes"] == conn["in"] + conn["out"]
    assert (
        cli(gateway.db, "receipt", r.headers["X-Datorus-Request-Id"], check=False)["error"]["code"]
        == "RESOURCE_NOT_FOUND"
    )


def test_gateways_502_on_a_tunnel_through_a_refusing_upstream_is_not_billed(make_gateway):
    """The egress is an upstream proxy that refuses the gateway's credentials: a CONNECT
    gets the gateway's own ``502 UPSTREAM_FAILED`` naming the egress, and it is not billed
    (no receipt, no request in the usage), however the client then goes away."""
    from support.upstream import UpstreamProxy

    gw = make_gateway()
    acc, user, pw = gw.customer(trial_bytes=10**9)
    ups = UpstreamProxy("127.0.0.6", "up1", "right")

    def refused() -> list | None:  # a list: None until the egress itself failed us
        # port 1: a tunnel that went direct (before the pool holds the egress) is refused
        # at once, and not billed either
        with raw_connection(gw.port) as s:
            s.sendall(
                b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\nX-Datorus-Country: nl\r\n"
                + f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
            )
            status, headers, body = read_response(s)
        assert status == 502, body
        return [headers, body] if "egress" in json.loads(body)["error"]["details"] else None

    try:
        gw.cli("egress", "add", ups.url.replace(":right@", ":wrong@"), "--country", "nl")
        headers, body = wait_until(refused, 10, 0.05, "the refusing upstream in use")
    finally:
        ups.stop()
    assert_envelope(502, headers, body, "UPSTREAM_FAILED", 502)
    gw.stop()  # a clean stop flushes every request
    rid = headers["x-datorus-request-id"]
    found = cli(gw.db, "receipt", rid, check=False)
    assert found.get("error", {}).get("code") == "RESOURCE_NOT_FOUND", found
    assert cli(gw.db, "usage", str(acc))["requests"] == 0


# -- 402s ---------------------------------------------------------------------------------


def test_trial_exhausted_is_402_with_used_bytes_header(gateway, raw_origin):
    acc, user, pw = gateway.customer(trial_bytes=0)
    r = fresh_get(gateway, user, pw, raw_origin.url("/"))
    assert r.status_code == 402
    err = r.json()["error"]
    assert err["code"] == "TRIAL_EXHAUSTED" and err["details"] is None
    assert r.headers["X-Datorus-Used-Bytes"] == "0"
    assert r.headers["X-Datorus-Request-Id"] == err["requestId"]
    assert r.headers["X-Datorus-RateLimit-Limit"]
    # CONNECT too
    with raw_connection(gateway.port) as s:
        s.sendall(
            f"CONNECT 127.0.0.1:{raw_origin.port} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
        )
        status, headers, body = read_response(s)
    assert status == 402 and json.loads(body)["error"]["code"] == "TRIAL_EXHAUSTED"
    assert headers["x-datorus-used-bytes"] == "0"


def test_topped_up_account_below_minimum_is_402_insufficient_balance(gateway, raw_origin):
    acc, user, pw = gateway.customer(trial_bytes=0, price_cents_per_gb=10**9)
    gateway.cli("balance", "add", str(acc), "1")
    # 1 cent at 10^9 cents/GB buys exactly 1 byte, the overdraft bound (5 cents) 5 more:
    # the first request runs dry after 6 bytes of its request line and is answered 402

    def first_paid():
        r = fresh_get(gateway, user, pw, raw_origin.url("/"))
        return [r] if r.json()["error"]["code"] != "TRIAL_EXHAUSTED" else None

    (r,) = wait_until(first_paid, timeout=5, interval=0.1, what="top-up live")
    err = r.json()["error"]
    assert r.status_code == 402 and err["code"] == "INSUFFICIENT_BALANCE"
    assert r.headers["X-Datorus-Used-Bytes"] == "6"
    assert r.headers["X-Datorus-Request-Id"] == err["requestId"]
    rec = receipt(gateway, err["requestId"])
    assert (rec["bytesUp"], rec["bytesDown"], rec["status"]) == (6, 0, 402)
    assert rec["nanocents"] == 6 * NANO
    # the next one is refused before it starts
    r = fresh_get(gateway, user, pw, raw_origin.url("/"))
    err = r.json()["error"]
    assert r.status_code == 402 and err["code"] == "INSUFFICIENT_BALANCE"
    assert err["details"]["requiredCents"] == 1
    assert err["details"]["currentBalanceCents"] == -5
    assert r.headers["X-Datorus-Used-Bytes"] == "0"
    wait_until(lambda: account(gateway, acc)["balanceCents"] == -5, timeout=5, what="ledger")


def test_credential_byte_cap_refuses_that_credential_only(gateway, raw_origin):
    acc, user, pw = gateway.customer(trial_bytes=10**9)
    capped = gateway.cli("credential", "create", str(acc), "--max-bytes", "1000")
    gateway.wait_for_credential(capped["username"], capped["password"])
    cut = 0
    for _ in range(5):
        try:
            r = fresh_get(
                gateway, capped["username"], capped["password"], raw_origin.url("/bytes/400")
            )
        except requests.exceptions.RequestException:
            cut += 1  # the request that crossed the cap mid-response was cut there
            continue
        if r.status_code == 402:
            break
    assert r.status_code == 402
    err = r.json()["error"]
    assert err["code"] == "INSUFFICIENT_BALANCE"
    assert err["details"]["cap"] == "credential" and err["details"]["maxBytes"] == 1000
    assert err["details"]["usedBytes"] == 1000  # forward requests are held to the cap exactly
    assert fresh_get(gateway, user, pw, raw_origin.url("/")).status_code == 200


# -- running dry mid-flight -----------------------------------------------------------------


# At 5,000,000 cents/GB the 5-cent overdraft bound buys exactly 1,000 bytes: a request
# under way when the trial runs out may finish on those, and is cut exactly there.
BOUND_PRICE = 5_000_000
BOUND = 1000


def test_tunnel_is_cut_exactly_at_trial_plus_overdraft_bound(gateway, tls_origin, ca):
    acc, user, pw = gateway.customer(trial_bytes=1_000_000, price_cents_per_gb=BOUND_PRICE)
    sock, headers = open_tunnel(gateway, user, pw, tls_origin.port)
    got = tls_download(sock, ca, "/bytes/20000000")
    # the billed bytes include TLS (handshake, records, a record cut short): a few KiB
    assert 1_000_000 - 40_000 < got < 1_000_000 + BOUND
    rec = receipt(gateway, headers["x-datorus-request-id"])
    assert rec["bytesUp"] + rec["bytesDown"] == 1_000_000 + BOUND
    assert rec["trialBytes"] == 1_000_000 and rec["nanocents"] == BOUND * BOUND_PRICE
    shown = account(gateway, acc)
    assert shown["trialRemainingBytes"] == 0 and shown["balanceCents"] == -5
    r = fresh_get(gateway, user, pw, "http://127.0.0.1:9/")
    assert r.status_code == 402 and r.json()["error"]["code"] == "TRIAL_EXHAUSTED"


def test_streamed_download_is_cut_when_trial_runs_out(gateway, raw_origin):
    acc, user, pw = gateway.customer(trial_bytes=2_000_000, price_cents_per_gb=BOUND_PRICE)
    got = 0
    with (
        pytest.raises(requests.exceptions.RequestException),
        requests.Session() as s,
        s.get(
            raw_origin.url("/bytes/50000000"),
            proxies={"http": gateway.proxy(user, pw)},
            stream=True,
            timeout=30,
        ) as r,
    ):
        for chunk in r.iter_content(1 << 16):
            got += len(chunk)
    assert 0 < got < 2_000_000 + BOUND
    wait_until(
        lambda: gateway.cli("usage", str(acc))["bytes"] == 2_000_000 + BOUND,
        timeout=5,
        what="usage flushed",
    )
    assert account(gateway, acc)["trialRemainingBytes"] == 0


def test_page_judged_for_block_markers_is_streamed_when_the_allowance_is_short(
    make_gateway, raw_origin
):
    """With an egress pool, small pages are held whole to be searched for block markers;
    one the account cannot pay for in full is streamed instead: the client gets what it
    paid for, not a reset after being charged for a page it never saw."""
    gw = make_gateway()
    gw.cli("egress", "add", "direct://")
    # a new egress carries traffic once its checks pass, in every process that serves the
    # port (each checks the pool itself): asked of each with a customer of its own
    _, probe_user, probe_pw = gw.customer(trial_bytes=10**9)
    probe = (
        f"GET {raw_origin.url('/html/10')} HTTP/1.1\r\nHost: 127.0.0.1:{raw_origin.port}\r\n"
        f"Proxy-Authorization: {basic(probe_user, probe_pw)}\r\nConnection: close\r\n\r\n"
    ).encode()
    gw.each_worker(probe, lambda answer: answer[0] == 200, 30)
    acc, user, pw = gw.customer(trial_bytes=100_000, price_cents_per_gb=BOUND_PRICE)
    proxies = {"http": gw.proxy(user, pw)}
    # a page the allowance covers is held and judged whole (a Content-Length answer)
    r = requests.get(raw_origin.url("/html/20000"), proxies=proxies, timeout=10)
    assert r.status_code == 200 and len(r.content) == 20000
    got = 0
    with (
        pytest.raises(requests.exceptions.RequestException),
        requests.get(raw_origin.url("/html/200000"), proxies=proxies, stream=True, timeout=10) as r,
    ):
        assert r.status_code == 200  # the head reached the client: the page was streamed
        for chunk in r.iter_content(1 << 14):
            got += len(chunk)
    used = 100_000 + BOUND
    assert 50_000 < got < used
    wait_until(lambda: gw.cli("usage", str(acc))["bytes"] == used, timeout=5, what="usage flushed")


def test_parallel_tunnels_of_one_account_cannot_overspend(gateway, tls_origin, ca):
    acc, user, pw = gateway.customer(trial_bytes=3_000_000, price_cents_per_gb=BOUND_PRICE)
    results: list[int] = []
    # all four are open before any spends: a tunnel opened once the money is gone is
    # rightly refused 402, and on a loaded box a late thread would find it gone
    socks = [open_tunnel(gateway, user, pw, tls_origin.port)[0] for _ in range(4)]

    def one(s: socket.socket) -> None:
        results.append(tls_download(s, ca, "/bytes/20000000"))

    threads = [threading.Thread(target=one, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # each tunnel's TLS overhead (handshake, records, one cut short) is a few KiB
    assert len(results) == 4 and 3_000_000 - 4 * 40_000 < sum(results) < 3_000_000 + BOUND
    wait_until(
        lambda: gateway.cli("usage", str(acc))["bytes"] == 3_000_000 + BOUND,
        timeout=5,
        what="usage flushed",
    )
    assert account(gateway, acc)["trialRemainingBytes"] == 0


def test_paid_account_overdraft_is_bounded_exactly(make_gateway, tls_origin, ca):
    gw = make_gateway(max_overdraft_cents=1)
    acc, user, pw = gw.customer(trial_bytes=0, price_cents_per_gb=1000)
    gw.cli("balance", "add", str(acc), "1")
    # 1 cent + 1 cent overdraft at 1000 cents/GB = 2,000,000 bytes
    wait_until(lambda: account(gw, acc)["toppedUp"], what="top-up")
    gw.wait_for_credential(user, pw)
    from support.waiting import free_port

    # the gateway knows the top-up once a request gets past the balance check: a refused
    # connection (502) is a gateway error, not billed, so the bound below stays exact
    wait_until(
        lambda: fresh_get(gw, user, pw, f"http://127.0.0.1:{free_port()}/").status_code == 502,
        5,
        0.05,
        "top-up live",
    )
    sock, headers = open_tunnel(gw, user, pw, tls_origin.port)
    tls_download(sock, ca, "/bytes/20000000")
    rec = receipt(gw, headers["x-datorus-request-id"])
    assert rec["bytesUp"] + rec["bytesDown"] == 2_000_000
    acc_now = account(gw, acc)
    assert acc_now["balanceNanocents"] == -1 * NANO and acc_now["balanceCents"] == -1


# -- durability -----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether process *pid* still runs (a zombie waiting for its parent does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _load(gw, user, pw, url, stop: threading.Event, done: list) -> None:
    with requests.Session() as s:
        while not stop.is_set():
            try:
                r = s.get(url, proxies={"http": gw.proxy(user, pw)}, timeout=5)
                if r.status_code == 200:
                    done.append(r.headers["X-Datorus-Request-Id"])
            except requests.RequestException:
                return


def test_operator_top_ups_during_traffic_are_neither_lost_nor_doubled(make_gateway, raw_origin):
    """The gateway's in-memory balance and the CLI's writes meet in the ledger exactly."""
    gw = make_gateway()
    acc, user, pw = gw.customer(trial_bytes=0, price_cents_per_gb=10**6)  # 0.001 cent a byte
    # enough that the traffic never runs dry however slow the CLI is (each 3 KB request
    # costs 3 cents): every top-up below must meet traffic still flowing
    gw.cli("balance", "add", str(acc), "100000")
    wait_until(
        lambda: fresh_get(gw, user, pw, raw_origin.url("/")).status_code == 200,
        timeout=5,
        what="top-up live",
    )
    stop, done = threading.Event(), []
    threads = [
        threading.Thread(
            target=_load, args=(gw, user, pw, raw_origin.url("/bytes/3000"), stop, done)
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for _ in range(5):  # operator top-ups while usage flows: requests served between each
        served = len(done)
        gw.cli("balance", "add", str(acc), "7")
        wait_until(lambda n=served: len(done) >= n + 3, 10, 0.01, "traffic between top-ups")
    stop.set()
    for t in threads:
        t.join(10)
    assert gw.stop(signal.SIGTERM) == 0
    (charged, moved, served) = ledger_row(
        gw.db,
        "SELECT SUM(nanocents), SUM(bytes_up + bytes_down),"
        " SUM(CASE WHEN status = 200 THEN 1 ELSE 0 END) FROM receipts WHERE account_id = ?",
        (acc,),
    )
    (cached,) = ledger_row(gw.db, "SELECT nanocents FROM balances WHERE account_id = ?", (acc,))
    (summed,) = ledger_row(
        gw.db, "SELECT SUM(nanocents) FROM transactions WHERE account_id = ?", (acc,)
    )
    # every byte at 10^6 nanocents (no trial); every request served has its receipt (and
    # the first probe: +1), at most one per thread was cut mid-body when the money ran out
    assert charged == moved * 10**6
    assert len(done) + 1 <= served <= len(done) + 1 + len(threads) and len(done) >= 15
    assert cached == summed == (100000 + 5 * 7) * NANO - charged


def test_clean_stop_flushes_every_request(make_gateway, raw_origin):
    gw = make_gateway(flush_ms=5000, flush_events=100000)  # nothing flushes on its own
    acc, user, pw = gw.customer(trial_bytes=10**9)
    before = raw_origin.total_in + raw_origin.total_out
    with requests.Session() as s:
        for _ in range(30):
            assert (
                s.get(
                    raw_origin.url("/"), proxies={"http": gw.proxy(user, pw)}, timeout=10
                ).status_code
                == 200
            )
    assert gw.stop(signal.SIGTERM) == 0
    usage = cli(gw.db, "usage", str(acc))
    moved = raw_origin.total_in + raw_origin.total_out - before
    assert usage["requests"] == 30 and usage["bytes"] == moved


def test_kill_9_under_load_never_corrupts_or_double_charges(make_gateway, raw_origin):
    gw = make_gateway()
    accs = [gw.customer(trial_bytes=10**9) for _ in range(3)]
    stop, done = threading.Event(), []
    threads = [
        threading.Thread(target=_load, args=(gw, u, p, raw_origin.url("/bytes/2000"), stop, done))
        for _, u, p in accs
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: len(done) > 200, timeout=30, what="load running")
    serving = gw.worker_pids()
    gw.proc.kill()
    gw.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(10)
    # under datorus serve the workers outlive the launcher for their drain (SIGTERM from
    # PR_SET_PDEATHSIG) and write their last batch meanwhile: the ledger is read once they
    # are gone, not between two of their writes
    wait_until(lambda: not any(_alive(pid) for pid in serving), 30, 0.05, "workers gone")
    if not is_url(gw.db):
        assert ledger_row(gw.db, "PRAGMA integrity_check") == ("ok",)
    for acc_id, _, _ in accs:
        nc, tb = ledger_row(
            gw.db, "SELECT nanocents, trial_bytes FROM balances WHERE account_id = ?", (acc_id,)
        )
        snc, stb = ledger_row(
            gw.db,
            "SELECT SUM(nanocents), SUM(trial_bytes) FROM transactions WHERE account_id = ?",
            (acc_id,),
        )
        assert (nc, tb) == (snc, stb)
    (billed,) = ledger_row(
        gw.db, "SELECT COALESCE(SUM(requests), 0) FROM transactions WHERE kind = 'usage'"
    )
    (receipts,) = ledger_row(gw.db, "SELECT COUNT(*) FROM receipts")
    assert billed == receipts <= len(done)
    print(f"kill -9 lost {len(done) - billed} of {len(done)} requests")  # for the README
    assert billed >= len(done) - 2000  # at most the unflushed window is lost
    # a restart picks up where the ledger is and bills on
    gw.start()
    _, u, p = accs[0]
    assert fresh_get(gw, u, p, raw_origin.url("/")).status_code == 200


# -- the new user's path ------------------------------------------------------------------


def test_trial_until_402_then_top_up_and_usage_matches_to_the_byte(gateway, raw_origin):
    acc, user, pw = gateway.customer(trial_bytes=5000, price_cents_per_gb=300)
    ids = []
    for _ in range(50):
        r = fresh_get(gateway, user, pw, raw_origin.url("/bytes/1000"))
        if r.status_code == 402:
            break
        ids.append(r.headers["X-Datorus-Request-Id"])
    assert r.status_code == 402 and r.json()["error"]["code"] == "TRIAL_EXHAUSTED"
    recs = [receipt(gateway, i) for i in ids]
    assert sum(r["trialBytes"] for r in recs) == 5000
    # the request under way when the trial ran out finished; its excess is owed
    moved = sum(r["bytesUp"] + r["bytesDown"] for r in recs)
    assert 5000 < moved < 5000 + 2000 and recs[-1]["nanocents"] == (moved - 5000) * 300
    gateway.cli("balance", "add", str(acc), "100", "--reason", "test top-up")
    wait_until(
        lambda: fresh_get(gateway, user, pw, raw_origin.url("/bytes/1000")).status_code == 200,
        timeout=5,
        interval=0.1,
        what="top-up live",
    )
    paid_ids = []
    for _ in range(3):
        r = fresh_get(gateway, user, pw, raw_origin.url("/bytes/1000"))
        assert r.status_code == 200
        paid_ids.append(r.headers["X-Datorus-Request-Id"])
    for i in paid_ids:  # flushed in order: the last one's receipt means all are in
        receipt(gateway, i)
    usage = gateway.cli("usage", str(acc), "--by", "day")
    rows = ledger_row(
        gateway.db,
        "SELECT SUM(bytes_up + bytes_down), SUM(nanocents), SUM(trial_bytes)"
        " FROM receipts WHERE account_id = ?",
        (acc,),
    )
    assert usage["bytes"] == rows[0]
    assert usage["chargedNanocents"] == rows[1] == (rows[0] - 5000) * 300
    assert rows[2] == 5000
    assert usage["days"][0]["bytes"] == usage["bytes"]
    hist = gateway.cli("balance", "history", str(acc))["items"]
    assert {h["kind"] for h in hist} >= {"trial_grant", "topup", "usage"}


def test_old_receipts_are_pruned_in_the_background(make_gateway):
    """Receipts older than receipt_days go (the gateway prunes when it starts, then hourly)."""
    import uuid

    from datorus_core.envelope import request_id_floor

    gw = make_gateway(receipt_days=30)
    gw.stop()
    now_ms = int(time.time() * 1000)
    old = str(uuid.UUID(request_id_floor(now_ms - 31 * 86400 * 1000) + "7000-8000-000000000001"))
    new = str(uuid.UUID(request_id_floor(now_ms - 29 * 86400 * 1000) + "7000-8000-000000000001"))
    for rid in (old, new):
        ledger_exec(
            gw.db,
            "INSERT INTO receipts (request_id, account_id, credential_id, method, host, port,"
            " status, bytes_up, bytes_down, trial_bytes, nanocents, started_at, finished_at)"
            " VALUES (?, 1, 1, 'GET', 'h', 80, 200, 1, 1, 2, 0,"
            " '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
            (rid,),
        )
    gw.start()

    def ids():
        return {r[0] for r in ledger_rows(gw.db, "SELECT request_id FROM receipts")}

    wait_until(lambda: old not in ids(), timeout=10, what="old receipt pruned")
    assert new in ids()


def test_open_idle_tunnel_usage_reaches_the_ledger_while_it_stays_open(gateway, tls_origin, ca):
    """Tunnels reserve ahead and settle in blocks: a quiet open tunnel is settled anyway."""
    relay = CountingRelay(tls_origin.port)
    acc, user, pw = gateway.customer(trial_bytes=10**12)
    sock, _ = open_tunnel(gateway, user, pw, relay.port)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        tls.settimeout(30)
        tls.sendall(b"GET /bytes/300000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += tls.recv(65536)
        head, _, body = buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += tls.recv(65536)
        # the tunnel stays open and quiet: its usage must still reach the ledger
        wait_until(
            lambda: gateway.cli("usage", str(acc))["bytes"] == relay.up + relay.down > 300_000,
            timeout=5,
            what=f"usage of an open tunnel == relay {relay.up}+{relay.down}",
        )
    relay.close()


def test_clean_stop_bills_a_download_still_running(make_gateway, raw_origin):
    """SIGTERM mid-download, past the drain time: the bytes that crossed are billed, with
    a receipt, and the download is closed."""
    gw = make_gateway(drain_seconds=1)
    acc, user, pw = gw.customer(trial_bytes=10**12)
    before = len(raw_origin.conns)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    s.sendall(
        f"GET {raw_origin.url('/bytes/200000000')} HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
    )
    got = 0
    while got < 5_000_000:
        got += len(s.recv(1 << 16))
    assert gw.stop(signal.SIGTERM) == 0
    s.close()
    usage = cli(gw.db, "usage", str(acc))
    # at least what reached the client, at most what the origin put on the wire
    conn = raw_origin.conns[before]
    assert got <= usage["bytes"] <= conn["in"] + conn["out"] and usage["requests"] == 1
    assert ledger_row(gw.db, "SELECT COUNT(*) FROM receipts WHERE account_id = ?", (acc,)) == (1,)


def _early_answer_server() -> tuple[socket.socket, dict]:
    """A target that answers at once, then goes on reading (and counting) the upload."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen = {"in": 0, "done": threading.Event()}

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += c.recv(65536)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            n = len(buf)
            while chunk := c.recv(1 << 16):
                n += len(chunk)
                seen["in"] = n
        seen["done"].set()

    threading.Thread(target=serve, daemon=True).start()
    return srv, seen


def test_upload_that_goes_on_after_the_response_is_billed_in_full(gateway):
    acc, user, pw = gateway.customer(trial_bytes=10**12)
    srv, seen = _early_answer_server()
    port = srv.getsockname()[1]
    size = 5_000_000
    head = (
        f"POST http://127.0.0.1:{port}/up HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
        f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as s:
        s.sendall(head)
        status, headers, _ = read_response(s)  # answered before the body went out
        assert status == 200
        for _ in range(size // 100_000):
            s.sendall(b"b" * 100_000)
        wait_until(lambda: seen["in"] > size, timeout=10, what="upload relayed")
    rec = receipt(gateway, headers["x-datorus-request-id"])
    # the body and the forwarded head (no longer than the one the client sent)
    assert size < rec["bytesUp"] == seen["in"] <= size + len(head)
    srv.close()


def test_client_that_aborts_its_upload_before_any_answer_pays_for_it(gateway, raw_origin):
    acc, user, pw = gateway.customer(trial_bytes=10**12)
    before = len(raw_origin.conns)
    head = (
        f"POST {raw_origin.url('/never-answers')} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: 10000000\r\nProxy-Authorization: {basic(user, pw)}\r\n\r\n"
    ).encode()
    # the raw origin answers only once the whole body is in: this one never is
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as s:
        s.sendall(head)
        for _ in range(30):
            s.sendall(b"c" * 100_000)  # 3 MB of 10, then the client walks away
    # billed: exactly what reached the origin, the 3 MB and the forwarded head (no
    # longer than the client's): neither less nor more
    wait_until(
        lambda: (
            len(raw_origin.conns) > before
            and gateway.cli("usage", str(acc))["bytes"]
            == raw_origin.conns[before]["in"]
            > 3_000_000
        ),
        timeout=10,
        what="the aborted upload billed as the origin saw it",
    )
    assert raw_origin.conns[before]["in"] <= 3_000_000 + len(head)


def test_sigterm_drains_refuses_new_requests_and_bills_every_one_served(make_gateway, origin):
    """A clean stop: requests under way finish and are billed; new ones, on new or
    kept-alive connections, get 503 with Retry-After and are neither served nor billed."""
    gw = make_gateway(drain_seconds=10)
    acc, user, pw = gw.customer(trial_bytes=10**12)
    auth = f"Proxy-Authorization: {basic(user, pw)}\r\n"
    kept = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    kept.sendall(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    assert read_response(kept)[0] == 200
    slow = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    slow.sendall(
        f"GET {origin.url('/slow?s=2&drain=1')} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()
    )
    wait_until(lambda: any("drain=1" in r["path"] for r in origin.seen), 5, 0.01, "under way")
    gw.proc.send_signal(signal.SIGTERM)

    served = 2  # the kept-alive connection's first request and the slow one

    def refused():
        nonlocal served
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
            answer = read_response(s)
            served += answer[0] == 200  # before the stop began: served and billed
            return [answer] if answer[0] == 503 else None

    ((status, headers, body),) = wait_until(refused, 5, 0.02, "draining")
    err = assert_envelope(status, headers, body, "SERVICE_UNAVAILABLE", 503)
    assert err["details"] == {"reason": "draining"}
    assert headers["retry-after"] == "1" and headers["connection"] == "close"
    assert headers["x-datorus-ratelimit-limit"] == "50"
    # a request without credentials (a balancer's health check) hears it is draining too
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = read_response(s)
    err = assert_envelope(status, headers, body, "SERVICE_UNAVAILABLE", 503)
    assert err["details"] == {"reason": "draining"} and headers["retry-after"] == "1"
    # a kept-alive connection is refused too (a request served now would go unbilled)
    kept.sendall(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    status, headers, body = read_response(kept)
    assert_envelope(status, headers, body, "SERVICE_UNAVAILABLE", 503)
    # the request under way finishes whole
    status, _, body = read_response(slow)
    assert (status, body) == (200, b"slow")
    assert gw.proc.wait(15) == 0
    kept.close()
    slow.close()
    rows = ledger_rows(
        gw.db,
        "SELECT status, bytes_down FROM receipts WHERE account_id = ? ORDER BY request_id",
        (acc,),
    )
    assert [r[0] for r in rows] == [200] * served  # every one served, nothing else
    # each carried its body ("hello from origin" or "slow") and one response head
    assert all(4 < r[1] < 17 + 1024 for r in rows)
    usage = cli(gw.db, "usage", str(acc))
    (moved,) = ledger_row(
        gw.db, "SELECT SUM(bytes_up + bytes_down) FROM receipts WHERE account_id = ?", (acc,)
    )
    assert usage["requests"] == served and usage["bytes"] == moved
