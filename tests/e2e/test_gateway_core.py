"""The gateway on the wire: auth, forwarding, CONNECT passthrough, reserved headers, errors.

Each test drives a real ``mitmdump -s addons/datorus.py`` with real clients against
real loopback origins, and asserts exact statuses, envelope codes and headers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import ssl
import subprocess
import time
import uuid

import httpx
import pytest
import requests
from checks import UUID_RE, assert_envelope, assert_rate_headers, raw_request
from support.clients import basic, raw_connection, read_response
from support.waiting import free_port, wait_until

# -- auth ---------------------------------------------------------------------------------


BAD_AUTH = {
    "missing": None,
    "wrong_password": "WRONG",
    "unknown_user": "UNKNOWN",
    "bearer": "Bearer abc",
    "malformed_base64": "Basic !!!notbase64",
    "non_utf8": "Basic " + base64.b64encode(b"\xff\xfe:\xfa").decode(),
    "no_colon": "Basic " + base64.b64encode(b"justuser").decode(),
}


@pytest.mark.parametrize("case", list(BAD_AUTH))
@pytest.mark.parametrize("method", ["GET", "CONNECT"])
def test_bad_credentials_get_407_envelope(gateway, customer, origin, tls_origin, case, method):
    _, user, pw = customer
    value = BAD_AUTH[case]
    if value == "WRONG":
        value = basic(user, pw + "x")
    elif value == "UNKNOWN":
        value = basic("nobody", pw)
    target = origin.url("/") if method == "GET" else f"127.0.0.1:{tls_origin.port}"
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if value is not None:
        head += f"Proxy-Authorization: {value}\r\n"
    status, headers, body = raw_request(gateway.port, (head + "\r\n").encode())
    err = assert_envelope(status, headers, body, "INVALID_CREDENTIAL", 407)
    assert headers["proxy-authenticate"] == 'Basic realm="Datorus"'
    assert int(headers["content-length"]) == len(body)
    assert "x-datorus-ratelimit-limit" not in headers
    assert err["message"] == "Invalid proxy credentials."


def test_407_keeps_connection_usable_for_retry_with_credentials(gateway, customer, origin):
    _, user, pw = customer
    with raw_connection(gateway.port) as s:
        s.sendall(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert read_response(s)[0] == 407
        s.sendall(
            f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
        )
        status, headers, body = read_response(s)
        assert status == 200 and body == b"hello from origin"


def test_every_request_on_keepalive_connection_is_authenticated(gateway, customer, origin):
    _, user, pw = customer
    with raw_connection(gateway.port) as s:
        s.sendall(
            f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
        )
        assert read_response(s)[0] == 200
        s.sendall(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert read_response(s)[0] == 407


def test_connect_with_bad_credentials_then_good_on_same_connection(gateway, customer, tls_origin):
    _, user, pw = customer
    with raw_connection(gateway.port) as s:
        s.sendall(f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert read_response(s)[0] == 407
        s.sendall(
            f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
        )
        s.settimeout(10)
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200")


# -- forwarding -----------------------------------------------------------------------------


def test_forward_get_relays_origin_response_with_reserved_headers(gateway, customer, origin):
    _, user, pw = customer
    sent = time.time()
    r = requests.get(origin.url("/hello"), proxies={"http": gateway.proxy(user, pw)}, timeout=10)
    assert r.status_code == 200
    assert r.text == "hello from origin"
    assert UUID_RE.fullmatch(r.headers["X-Datorus-Request-Id"])
    assert_rate_headers(r.headers, sent, time.time(), rate=50, burst=100)


def test_origin_never_sees_proxy_authorization_or_datorus_headers(gateway, customer, origin):
    _, user, pw = customer
    r = httpx.get(
        origin.url("/headers"),
        proxy=gateway.proxy(user, pw),
        headers={
            "X-Datorus-Session-Id": "abc",
            "X-Datorus-Country": "us",
            "X-Keep": "1",
            "Proxy-Connection": "keep-alive",
        },
        timeout=10,
    )
    seen = r.json()
    assert "proxy-authorization" not in seen
    assert "proxy-connection" not in seen
    assert not [k for k in seen if k.startswith("x-datorus-")]
    assert seen["x-keep"] == "1"


def test_upstream_datorus_headers_are_replaced(gateway, customer, origin):
    """A target cannot forge the gateway's reserved headers."""
    _, user, pw = customer
    r = requests.get(origin.url("/"), proxies={"http": gateway.proxy(user, pw)}, timeout=10)
    assert r.headers["X-Datorus-Request-Id"] != "forged"


def test_50mb_download_is_byte_identical(gateway, customer, origin):
    _, user, pw = customer
    n = 50 * 1024 * 1024
    h = hashlib.sha256()
    got = 0
    with requests.get(
        origin.url(f"/bytes/{n}"),
        proxies={"http": gateway.proxy(user, pw)},
        stream=True,
        timeout=60,
    ) as r:
        assert r.status_code == 200
        for chunk in r.iter_content(1 << 20):
            h.update(chunk)
            got += len(chunk)
    block = bytes(range(256)) * 4096
    expect = hashlib.sha256()
    left = n
    while left:
        part = block[: min(len(block), left)]
        expect.update(part)
        left -= len(part)
    assert got == n and h.hexdigest() == expect.hexdigest()


def test_50mb_upload_is_byte_identical(gateway, customer, origin):
    _, user, pw = customer
    body = (b"0123456789abcdef" * 65536) * 50  # 50 MiB
    r = requests.post(
        origin.url("/upload"), data=body, proxies={"http": gateway.proxy(user, pw)}, timeout=60
    )
    assert r.status_code == 200
    rec = [s for s in origin.seen if s["path"] == "/upload"][-1]
    assert rec["body_len"] == len(body)
    assert rec["body_sha"] == hashlib.sha256(body).hexdigest()


def test_chunked_upload_is_relayed(gateway, customer, origin):
    _, user, pw = customer
    parts = [b"a" * 1000, b"b" * 5000, b"c" * 7]
    r = requests.post(
        origin.url("/chunked-up"),
        data=iter(parts),
        proxies={"http": gateway.proxy(user, pw)},
        timeout=30,
    )
    assert r.status_code == 200
    rec = [s for s in origin.seen if s["path"] == "/chunked-up"][-1]
    assert rec["body_sha"] == hashlib.sha256(b"".join(parts)).hexdigest()


def test_chunked_response_is_relayed_intact(gateway, customer, origin):
    _, user, pw = customer
    r = requests.get(
        origin.url("/chunked?parts=6"), proxies={"http": gateway.proxy(user, pw)}, timeout=10
    )
    expect = b"".join(f"chunk-{i}-".encode() * (i + 1) for i in range(6))
    assert r.status_code == 200 and r.content == expect


def test_curl_forward_and_https_through_tunnel(gateway, customer, origin, tls_origin, ca_file):
    _, user, pw = customer
    out = subprocess.run(
        ["curl", "-sS", "-x", gateway.proxy(user, pw), origin.url("/")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout == "hello from origin"
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-v",
            "--cacert",
            ca_file,
            "-x",
            gateway.proxy(user, pw),
            f"https://localhost:{tls_origin.port}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from origin"
    # the CONNECT 200 as curl -v shows it carries the reserved headers, and no Content-Length
    lines = [x for x in out.stderr.splitlines() if x.startswith("< ")]
    start = next(i for i, x in enumerate(lines) if "200 Connection established" in x)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("< HTTP/"))
    block = "\n".join(lines[start:end]).lower()
    assert re.search(r"< x-datorus-request-id: [0-9a-f-]{36}", block), block
    assert "< x-datorus-ratelimit-limit: 50" in block
    assert "< x-datorus-ratelimit-remaining: " in block and "< x-datorus-ratelimit-reset: " in block
    assert "content-length" not in block


def test_connect_is_passthrough_client_sees_origin_certificate(gateway, customer, tls_origin, ca):
    _, user, pw = customer
    with raw_connection(gateway.port) as s:
        s.sendall(
            f"CONNECT localhost:{tls_origin.port} HTTP/1.1\r\nHost: localhost:{tls_origin.port}\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"x-datorus-request-id" in head.lower()
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)  # only the origin's CA is trusted: no interception possible
        with ctx.wrap_socket(s, server_hostname="localhost") as tls:
            cert = tls.getpeercert()
            issuer = dict(x[0] for x in cert["issuer"])
            assert "trustme" in json.dumps(issuer).lower()
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
            assert data.endswith(b"hello from origin")


def test_websocket_upgrade_through_forward_proxy(gateway, customer):
    """A plain-HTTP WebSocket echo through the gateway (absolute-form upgrade)."""
    import asyncio

    import websockets

    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)

    async def run():
        async with websockets.serve(echo, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            _, user, pw = customer
            async with websockets.connect(
                f"ws://127.0.0.1:{port}/", proxy=gateway.proxy(user, pw), open_timeout=10
            ) as ws:
                await ws.send("ping")
                assert await asyncio.wait_for(ws.recv(), 10) == "ping"
                await ws.send(b"x" * 100_000)
                assert len(await asyncio.wait_for(ws.recv(), 10)) == 100_000

    asyncio.run(run())


# -- errors ---------------------------------------------------------------------------------


def test_refused_upstream_is_502_upstream_failed(gateway, customer):
    _, user, pw = customer
    port = free_port()
    r = requests.get(
        f"http://127.0.0.1:{port}/", proxies={"http": gateway.proxy(user, pw)}, timeout=10
    )
    err = assert_envelope(r.status_code, r.headers, r.content, "UPSTREAM_FAILED", 502)
    assert r.headers["X-Datorus-RateLimit-Limit"] == "50"
    assert err["message"] == "The upstream destination failed."


def test_refused_upstream_on_connect_is_502_envelope(gateway, customer):
    _, user, pw = customer
    port = free_port()
    status, headers, body = raw_request(
        gateway.port,
        f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode(),
    )
    assert_envelope(status, headers, body, "UPSTREAM_FAILED", 502)


def test_unresolvable_host_is_502(gateway, customer):
    _, user, pw = customer
    r = requests.get(
        "http://no-such-host.invalid/", proxies={"http": gateway.proxy(user, pw)}, timeout=30
    )
    err = assert_envelope(r.status_code, r.headers, r.content, "UPSTREAM_FAILED", 502)
    assert err["details"]["reason"] == "dns_resolution_failed"


def test_malformed_upstream_response_is_502(gateway, customer):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    import threading

    def serve():
        c, _ = srv.accept()
        c.recv(65536)
        c.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    _, user, pw = customer
    r = requests.get(
        f"http://127.0.0.1:{port}/", proxies={"http": gateway.proxy(user, pw)}, timeout=10
    )
    assert_envelope(r.status_code, r.headers, r.content, "UPSTREAM_FAILED", 502)
    srv.close()


def test_malformed_request_is_400_validation_error(gateway):
    status, headers, body = raw_request(gateway.port, b"GARBAGE\r\n\r\n")
    assert_envelope(status, headers, body, "VALIDATION_ERROR", 400)


def test_slow_upstream_is_504_gateway_timeout(make_gateway, origin, tls_origin):
    gw = make_gateway(upstream_timeout=1)
    _, user, pw = gw.customer(trial_bytes=10**9)
    t0 = time.monotonic()
    r = requests.get(origin.url("/slow?s=5"), proxies={"http": gw.proxy(user, pw)}, timeout=20)
    elapsed = time.monotonic() - t0
    err = assert_envelope(r.status_code, r.headers, r.content, "GATEWAY_TIMEOUT", 504)
    assert err["message"] == "The upstream destination timed out."
    assert err["details"] == {"timeoutSeconds": 1}
    assert elapsed < 4


def test_suspension_and_revocation_take_effect_live(gateway, origin):
    acc, user, pw = gateway.customer(trial_bytes=10**9)
    proxies = {"http": gateway.proxy(user, pw)}
    assert requests.get(origin.url("/"), proxies=proxies, timeout=10).status_code == 200
    gateway.cli("account", "suspend", str(acc))

    def suspended():
        sent = time.time()
        r = requests.get(origin.url("/"), proxies=proxies, timeout=10)
        return [(r, sent, time.time())] if r.status_code == 403 else None

    ((r, sent, received),) = wait_until(suspended, timeout=2.5, interval=0.1, what="suspension")
    assert_envelope(r.status_code, r.headers, r.content, "ACCOUNT_SUSPENDED", 403)
    # the credential is known: the rate-limit headers are on the refusal too
    assert_rate_headers(r.headers, sent, received, rate=50, burst=100)
    gateway.cli("account", "unsuspend", str(acc))
    wait_until(
        lambda: requests.get(origin.url("/"), proxies=proxies, timeout=10).status_code == 200,
        timeout=2.5,
        interval=0.1,
        what="unsuspension live",
    )
    gateway.cli("credential", "revoke", user)
    wait_until(
        lambda: requests.get(origin.url("/"), proxies=proxies, timeout=10).status_code == 407,
        timeout=2.5,
        interval=0.1,
        what="revocation live",
    )


def test_new_credential_works_without_restart(gateway, origin):
    acc, _, _ = gateway.customer(trial_bytes=10**9)
    cred = gateway.cli("credential", "create", str(acc))
    proxies = {"http": gateway.proxy(cred["username"], cred["password"])}

    def works():
        r = requests.get(origin.url("/"), proxies=proxies, timeout=10)
        return [r] if r.status_code == 200 else None

    (r,) = wait_until(works, timeout=2.5, interval=0.1, what="new credential live")
    assert r.text == "hello from origin"


def test_request_id_is_unique_per_request(gateway, customer, origin):
    _, user, pw = customer
    ids = {
        requests.get(
            origin.url("/"), proxies={"http": gateway.proxy(user, pw)}, timeout=10
        ).headers["X-Datorus-Request-Id"]
        for _ in range(5)
    }
    assert len(ids) == 5 and all(uuid.UUID(i) for i in ids)


def test_a_credential_tried_before_the_gateway_knows_it_works_once_it_does(gateway, origin):
    """A failed try (unknown username, same slow hash as a wrong password) is remembered
    only until the next operator change: a brand-new credential is never kept out for
    the failure cache's 5 s."""
    acc = gateway.cli("account", "create", f"early{time.monotonic_ns()}@example.com")
    cred = gateway.cli("credential", "create", str(acc["id"]))
    proxies = {"http": gateway.proxy(cred["username"], cred["password"])}
    started = time.monotonic()
    first = requests.get(origin.url("/"), proxies=proxies, timeout=10).status_code
    assert first in (200, 407)  # 407 while the gateway has not read the new credential
    wait_until(
        lambda: requests.get(origin.url("/"), proxies=proxies, timeout=10).status_code == 200,
        4,
        0.05,
        "the new credential accepted",
    )
    assert time.monotonic() - started < 4.5  # within a refresh, not the 5 s failure cache
