"""The gateway's answers: clean heads whatever the input, and answers that explain themselves.

Issue 12: no CR or LF from a username, a header or an API field ever reaches a response
head (ids, leases and countries are matched whole: ``$`` would pass ``abc\\n``).
Issue 13: a 407 says why (``details.reason``), a 403 names the command that lets the
destination through, balances carry their exact nanocents, and every header the gateway
writes is spelled one way on every path.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket

import pytest
import requests
from checks import assert_envelope
from support.clients import basic, raw_connection
from support.origins import Origin
from support.processes import Gateway, GatewaySetup
from support.waiting import wait_until

LEASE = "ls" + "0" * 24
HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+: ?[\x20-\x7e\x80-\xff\t]*")


def _customer_with_key(g: Gateway) -> None:
    g.acc, g.user, g.pw = g.customer(trial_bytes=10**12)
    g.key = g.cli("key", "create", str(g.acc))["key"]


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    return GatewaySetup(api=True, ready=_customer_with_key)


def read_raw(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bytes]:
    """One response as ``(head, body)`` bytes, exactly as sent (Content-Length framed)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the head ended: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
    n = int(m.group(1)) if m else 0
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head, rest


def assert_clean_head(head: bytes) -> dict[str, str]:
    """Every line of *head* is a status line or ``Name: value``: no stray CR, LF or blank
    line (which would end the head early and shift the body). Returns the headers."""
    lines = head.split(b"\r\n")
    assert re.fullmatch(rb"HTTP/1\.[01] \d{3} [\x20-\x7e]*", lines[0]), head
    headers = {}
    for line in lines[1:]:
        assert HEADER_LINE.fullmatch(line), (line, head)
        name, _, value = line.partition(b":")
        headers[name.decode().lower()] = value.strip().decode("latin-1")
    return headers


def exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    with raw_connection(port) as s:
        s.sendall(request)
        return read_raw(s)


def forward(target: str, auth: str | None, *extra: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"]
    if auth is not None:
        lines.append(f"Proxy-Authorization: {auth}")
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def connect(authority: str, auth: str | None, *extra: str) -> bytes:
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if auth is not None:
        lines.append(f"Proxy-Authorization: {auth}")
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def raw_basic(user: bytes, password: bytes) -> str:
    return "Basic " + base64.b64encode(user + b":" + password).decode()


# -- issue 12: nothing a client sends reaches a response head ----------------------------

TAILS = {"lf": "\n", "crlf": "\r\n", "cr": "\r", "nul": "\x00", "space": " ", "tab": "\t"}


def _usernames(user: str) -> dict[str, str]:
    out = {}
    for name, tail in TAILS.items():
        out[f"session_{name}"] = f"{user}-session-abc{tail}"
        out[f"country_{name}"] = f"{user}-country-us{tail}"
        out[f"lease_{name}"] = f"{user}-lease-{LEASE}{tail}"
        out[f"plain_{name}"] = f"{user}{tail}"
        out[f"session_inner_{name}"] = f"{user}-session-a{tail}b"
    return out


USERNAME_CASES = list(_usernames("u"))


@pytest.mark.parametrize("method", ["GET", "CONNECT"])
@pytest.mark.parametrize("case", USERNAME_CASES)
def test_username_with_control_or_space_gets_407_and_a_clean_head(gw, origin, method, case):
    """The right password, a username with a trailing (or inner) CR/LF/space: refused."""
    username = _usernames(gw.user)[case]
    auth = basic(username, gw.pw)
    target = origin.url("/") if method == "GET" else f"127.0.0.1:{origin.port}"
    req = forward(target, auth) if method == "GET" else connect(target, auth)
    seen = len(origin.seen)
    head, body = exchange(gw.port, req)
    headers = assert_clean_head(head)
    status = int(head.split(b" ")[1])
    err = assert_envelope(status, headers, body, "INVALID_CREDENTIAL", 407)
    assert err["details"]["reason"] in ("malformed", "bad_option"), err
    assert "x-datorus-session-id" not in headers
    assert gw.pw not in body.decode()
    assert len(origin.seen) == seen


def test_python_http_client_reads_the_origin_body_exactly(gw, origin):
    """Issue 12's report: http.client read b'\\r\\nhello origi' through the shifted head."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        for username, status in ((f"{gw.user}-session-abc\n", 407), (gw.user, 200)):
            conn.request(
                "GET",
                origin.url("/"),
                headers={"Proxy-Authorization": basic(username, gw.pw)},
            )
            r = conn.getresponse()
            body = r.read()
            assert r.status == status, body
            assert r.getheader("X-Datorus-Session-Id") is None
            if status == 200:
                assert body == b"hello from origin"
            else:
                assert json.loads(body)["error"]["details"]["reason"] == "malformed"
    finally:
        conn.close()


HEADER_VALUES = {
    "session_trailing_space": ("X-Datorus-Session-Id", "abc   ", "abc"),
    "session_trailing_tab": ("X-Datorus-Session-Id", "abc\t", "abc"),
    "session_inner_space": ("X-Datorus-Session-Id", "a b", None),
    "session_too_long": ("X-Datorus-Session-Id", "a" * 129, None),
    "session_unicode": ("X-Datorus-Session-Id", "abc\u00e9", None),
    "country_trailing_space": ("X-Datorus-Country", "us  ", None),
    "geo_trailing_tab": ("X-Geo", "US\t", None),
}


@pytest.mark.parametrize("method", ["GET", "CONNECT"])
@pytest.mark.parametrize("case", list(HEADER_VALUES))
def test_header_values_with_whitespace_never_reach_the_head(gw, origin, tls_origin, method, case):
    name, value, echoed = HEADER_VALUES[case]
    auth = basic(gw.user, gw.pw)
    extra = f"{name}: {value}"  # sent as UTF-8
    if method == "GET":
        req = forward(origin.url("/"), auth, extra)
    else:
        req = connect(f"127.0.0.1:{tls_origin.port}", auth, extra)
    head, _ = exchange(gw.port, req)
    headers = assert_clean_head(head)
    assert head.split(b" ")[1] == b"200", head
    assert headers.get("x-datorus-session-id") == echoed


@pytest.mark.parametrize(
    "value, status",
    [
        ("abc\r", 200),  # trailing CR, VT: whitespace the parser strips ("abc" is echoed)
        ("abc\x0b", 200),
        ("abc\rX: y", 400),  # inside the value: refused
        ("a\x0bb", 400),
        ("abc\x00", 400),
    ],
)
def test_header_values_with_control_characters_never_reach_the_head(gw, origin, value, status):
    extra = f"X-Datorus-Session-Id: {value}"
    head, body = exchange(gw.port, forward(origin.url("/"), basic(gw.user, gw.pw), extra))
    headers = assert_clean_head(head)
    assert int(head.split(b" ")[1]) == status, head
    if status == 400:
        assert_envelope(400, headers, body, "VALIDATION_ERROR", 400)
        assert "x-datorus-session-id" not in headers
    else:
        assert headers["x-datorus-session-id"] == "abc"
        assert b"\r\nX-Datorus-Session-Id: abc\r\n" in head + b"\r\n"


def test_lease_header_with_trailing_whitespace_is_not_a_lease(gw, origin):
    """A lease id is matched whole: ``LEASE\\t`` names no lease of this account (404)."""
    for value in (f"{LEASE}\t", f"{LEASE} x"):
        extra = f"X-Datorus-Lease-Id: {value}"
        head, body = exchange(gw.port, forward(origin.url("/"), basic(gw.user, gw.pw), extra))
        headers = assert_clean_head(head)
        err = assert_envelope(int(head.split(b" ")[1]), headers, body, "RESOURCE_NOT_FOUND", 404)
        assert err["details"]["lease"] == value.strip()


def _api(gw: Gateway, method: str, path: str, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {gw.key}", **kw.pop("headers", {})}
    return requests.request(method, gw.api_url + path, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize("sid", ["abc\n", "abc\r\n", "abc ", "a\nb"])
def test_fetch_refuses_a_session_id_with_a_trailing_newline(gw, origin, sid):
    r = _api(gw, "POST", "/fetch", json={"url": origin.url("/"), "session_id": sid})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["details"]["field"] == "session_id"
    r = _api(gw, "POST", "/fetch", json={"url": origin.url("/"), "country": "us\n"})
    assert r.status_code == 400, r.text


def test_debug_pick_matches_session_and_country_whole(gw, origin):
    url = origin.url("/")
    r = _api(gw, "GET", "/debug/pick", params={"url": url, "session_id": "abc\n"})
    assert r.status_code == 200 and r.json()["session_id"] is None
    r = _api(gw, "GET", "/debug/pick", params={"url": url, "session_id": "abc"})
    assert r.status_code == 200 and r.json()["session_id"] == "abc"
    r = _api(gw, "GET", "/debug/pick", params={"url": url, "country": "us\n"})
    assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "country"


def test_ws_relay_refuses_a_session_id_with_a_trailing_newline(gw):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as ws_connect

    for message, reason in (
        ({"sessionId": "abc\n"}, "invalid session id"),
        ({"country": "us\n"}, "invalid geo code"),
    ):
        url = f"ws://127.0.0.1:{gw.settings['api_port']}/ws"
        with ws_connect(url, open_timeout=10) as ws:
            ws.send(json.dumps({"apiKey": gw.key, "url": "ws://127.0.0.1:9/", **message}))
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=15)
        assert (e.value.rcvd.code, e.value.rcvd.reason) == (1008, reason)


# -- issue 13: a 407 says why --------------------------------------------------------------


def _407(gw: Gateway, origin: Origin, auth: str | None, method: str = "GET") -> dict:
    target = origin.url("/") if method == "GET" else f"127.0.0.1:{origin.port}"
    req = forward(target, auth) if method == "GET" else connect(target, auth)
    head, body = exchange(gw.port, req)
    headers = assert_clean_head(head)
    err = assert_envelope(int(head.split(b" ")[1]), headers, body, "INVALID_CREDENTIAL", 407)
    assert headers["proxy-authenticate"] == 'Basic realm="Datorus"'
    assert "x-datorus-ratelimit-limit" not in headers
    return err


@pytest.mark.parametrize("method", ["GET", "CONNECT"])
def test_407_details_say_why(gw, origin, method):
    u, pw = gw.user, gw.pw
    cases = {
        None: {"reason": "missing"},
        "Bearer abc": {"reason": "malformed"},
        "Basic !!!notbase64": {"reason": "malformed"},
        "Basic " + base64.b64encode(b"justuser").decode(): {"reason": "malformed"},
        raw_basic(b"\xff\xfe", b"\xfa"): {"reason": "malformed"},
        basic("", pw): {"reason": "malformed"},
        basic(u + "\n", pw): {"reason": "malformed"},
        basic(u, pw + "x"): {"reason": "invalid"},
        basic("nobody", pw): {"reason": "invalid"},
        basic(f"{u}-country-usa", pw): {"reason": "bad_option", "option": "-country-usa"},
        basic(f"{u}-country-usa-session-x", pw): {"reason": "bad_option", "option": "-country-usa"},
        basic(f"{u}-bogus-1", pw): {"reason": "bad_option", "option": "-bogus"},
        basic(f"{u}-session-", pw): {"reason": "bad_option", "option": "-session-"},
        basic(f"{u}-lease-ls12", pw): {"reason": "bad_option", "option": "-lease-ls12"},
        basic(f"{u}-", pw): {"reason": "bad_option", "option": "-"},
        basic(f"{u}-country-us-", pw): {"reason": "bad_option", "option": "-"},
    }
    for auth, details in cases.items():
        err = _407(gw, origin, auth, method)
        assert err["details"] == details, (auth, err)
        assert err["message"] == "Invalid proxy credentials."


def test_407_never_tells_an_unknown_username_from_a_wrong_password(gw, origin):
    wrong = _407(gw, origin, basic(gw.user, "guess-" + gw.pw))
    unknown = _407(gw, origin, basic("dt000000000000", "guess-" + gw.pw))
    assert wrong["details"] == unknown["details"] == {"reason": "invalid"}
    assert wrong["message"] == unknown["message"]


def test_407_never_repeats_the_password(gw, origin):
    secret = "S3cr3t-pass-word"
    for user in (gw.user, f"{gw.user}-country-usa", f"{gw.user}-session-x\n", "nobody"):
        for method in ("GET", "CONNECT"):
            target = origin.url("/") if method == "GET" else f"127.0.0.1:{origin.port}"
            auth = basic(user, secret)
            req = forward(target, auth) if method == "GET" else connect(target, auth)
            head, body = exchange(gw.port, req)
            assert secret.encode() not in head + body
            assert auth.split()[1].encode() not in head + body


# -- issue 13: one spelling for every header the gateway writes ---------------------------

CANONICAL = {
    n.lower(): n
    for n in (
        "X-Datorus-Request-Id",
        "X-Datorus-RateLimit-Limit",
        "X-Datorus-RateLimit-Remaining",
        "X-Datorus-RateLimit-Reset",
        "X-Datorus-Session-Id",
        "X-Datorus-Used-Bytes",
        "Retry-After",
        "Proxy-Status",
        "Proxy-Authenticate",
    )
}
ENVELOPE_ONLY = {n.lower(): n for n in ("Content-Type", "Content-Length", "Connection")}


def _names(head: bytes) -> list[str]:
    return [line.split(b":")[0].decode() for line in head.split(b"\r\n")[1:]]


def assert_one_spelling(head: bytes, envelope: bool) -> None:
    """Every header the gateway wrote is spelled canonically (the origin's are its own)."""
    assert_clean_head(head)
    expected = {**CANONICAL, **(ENVELOPE_ONLY if envelope else {})}
    for name in _names(head):
        if name.lower() in expected:
            assert name == expected[name.lower()], head
        elif name.lower().startswith("x-datorus-"):
            raise AssertionError(f"unknown reserved header {name}: {head!r}")


def _status_is(port: int, req: bytes, status: bytes) -> bytes | None:
    head, _ = exchange(port, req)
    return head if head.split(b" ")[1] == status else None


def test_header_names_are_spelled_one_way_on_every_path(gw, origin, tls_origin, make_gateway):
    auth = basic(gw.user, gw.pw)
    sid = "X-Datorus-Session-Id: s-1"
    paths = {
        "relayed": (forward(origin.url("/"), auth, sid), 200, False),
        "connect_200": (connect(f"127.0.0.1:{tls_origin.port}", auth, sid), 200, False),
        "407": (forward(origin.url("/"), None, sid), 407, True),
        "407_connect": (connect(f"127.0.0.1:{origin.port}", basic("x", "y"), sid), 407, True),
        "403": (forward(f"http://127.0.0.1:{gw.port}/", auth, sid), 403, True),
        "502": (forward("http://127.0.0.1:1/", auth, sid), 502, True),
        "502_connect": (connect("127.0.0.1:1", auth, sid), 502, True),
        "400_header": (forward(origin.url("/"), auth, "X-Bad: a\x01b"), 400, True),
        "400_parse": (b"NONSENSE\r\n\r\n", 400, True),
        "400_country": (forward(origin.url("/"), auth, "X-Datorus-Country: usa"), 400, True),
    }
    for name, (req, status, envelope) in paths.items():
        head, _ = exchange(gw.port, req)
        assert int(head.split(b" ")[1]) == status, (name, head)
        assert_one_spelling(head, envelope)
        assert b"X-Datorus-Request-Id: " in head, name
        if status not in (407, 400) and b"s-1" in req:
            assert b"\r\nX-Datorus-Session-Id: s-1" in head, (name, head)
    # 429 (Retry-After beside the rate-limit headers) and 402 (X-Datorus-Used-Bytes)
    small = make_gateway()
    _, user, pw = small.customer(trial_bytes=0, rps=1, burst=1)
    req = forward(origin.url("/"), basic(user, pw))
    heads = {b"402": wait_until(lambda: _status_is(small.port, req, b"402"), 5, 0.3, "402")}
    heads[b"429"] = exchange(small.port, req)[0]  # the burst of 1 is spent: 429 at once
    for head in heads.values():
        assert_one_spelling(head, True)
    assert b"\r\nX-Datorus-Used-Bytes: 0" in heads[b"402"]
    assert b"\r\nRetry-After: " in heads[b"429"]
    assert b"\r\nX-Datorus-RateLimit-Limit: 1" in heads[b"429"]


# -- issue 13: exact balances ---------------------------------------------------------------


def test_a_trial_debt_shows_its_exact_nanocents(gw, origin):
    """A trial account that ran past its allowance owes a fraction of a cent: the rounded
    ``balanceCents`` (toward minus infinity: -1) comes with the exact ``balanceNanocents``."""
    acc, user, pw = gw.customer(trial_bytes=10, price_cents_per_gb=3)
    r = requests.get(origin.url("/"), proxies={"http": gw.proxy(user, pw)}, timeout=10)
    assert r.status_code == 200

    def billed() -> dict:
        shown = gw.cli("account", "show", str(acc))
        return shown if shown["usedBytes"] > 10 else {}

    shown = billed() or wait_until(billed, 5, 0.05, "usage written")
    owed = (shown["usedBytes"] - 10) * 3  # nanocents: 3 cents/GB is 3 nanocents a byte
    assert shown["balanceNanocents"] == -owed
    assert shown["balanceCents"] == -1
    usage = gw.cli("usage", str(acc))
    assert (usage["balanceCents"], usage["balanceNanocents"]) == (-1, -owed)
    key = gw.cli("key", "create", str(acc))["key"]
    auth = {"Authorization": f"Bearer {key}"}
    account = requests.get(gw.api_url + "/account", headers=auth, timeout=10).json()
    assert (account["balance_cents"], account["balance_nanocents"]) == (-1, -owed)
    usage = requests.get(gw.api_url + "/usage", headers=auth, timeout=10).json()
    assert (usage["balance_cents"], usage["balance_nanocents"]) == (-1, -owed)
    credits = requests.get(gw.api_url + "/account/credits", headers=auth, timeout=10).json()
    assert (credits["balance"], credits["balance_nanocents"]) == (-1, -owed)


def test_402_insufficient_balance_carries_exact_nanocents(make_gateway, origin):
    g = make_gateway(min_balance_cents=2)
    acc, user, pw = g.customer(trial_bytes=0)
    g.cli("balance", "add", str(acc), "1")
    wait_until(
        lambda: (
            b"INSUFFICIENT_BALANCE"
            in exchange(g.port, forward(origin.url("/"), basic(user, pw)))[1]
        ),
        5,
        0.05,
        "top-up live",
    )
    head, body = exchange(g.port, forward(origin.url("/"), basic(user, pw)))
    err = assert_envelope(402, assert_clean_head(head), body, "INSUFFICIENT_BALANCE", 402)
    assert err["details"]["currentBalanceCents"] == 1
    assert err["details"]["currentBalanceNanocents"] == 10**9
    assert err["details"]["requiredCents"] == 2
