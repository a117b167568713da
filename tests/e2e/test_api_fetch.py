"""``POST /fetch``'s own timeout and its rate-limit headers, against a real gateway.

The gateway waits ``upstream_timeout`` = 1 s for proxy traffic; a slow origin answers
after 2 s. A fetch's ``timeout`` is that request's upstream timeout at the gateway
(up to ``max_fetch_timeout``), set through a header only the in-process API can vouch
for. Fetch answers carry the proxy credential's rate-limit state, the limit that binds
a fetch, under Datorus's names and seed 001's.
"""

from __future__ import annotations

import time

import httpx
import pytest
from api_helpers import assert_api_error, bearer
from support.processes import Gateway, GatewaySetup

RPS, BURST = 7, 9  # the account's proxy limit: what fetch answers must show


def _fetcher(g: Gateway) -> None:
    acc = g.cli(
        "account", "create", "fetcher@example.com", "--trial-bytes", str(10**12),
        "--rps", str(RPS), "--burst", str(BURST),
    )  # fmt: skip
    g.key = g.cli("key", "create", str(acc["id"]))["key"]


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    # the API's per-key limit is tighter than the proxy's: fetches must not count on it
    return GatewaySetup({"upstream_timeout": 1, "api_key_burst": 2}, api=True, ready=_fetcher)


def _fetch(gw: Gateway, body: dict) -> httpx.Response:
    return httpx.post(f"{gw.api_url}/fetch", json=body, headers=bearer(gw.key), timeout=60)


def test_fetch_timeout_beyond_upstream_timeout_is_honoured(gw: Gateway, origin) -> None:
    url = origin.url("/slow?s=2")
    started = time.monotonic()
    r = _fetch(gw, {"url": url, "timeout": 4})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == 200 and r.json()["body"] == "slow"
    assert 2 <= time.monotonic() - started < 4
    # nothing of it reached the origin
    slow = [s for s in origin.seen if s["path"] == "/slow?s=2"]
    assert slow and not [h for s in slow for h in s["headers"] if h.startswith("x-datorus-")]


def test_fetch_timeout_shorter_than_the_origin_is_the_gateways_504(gw: Gateway, origin) -> None:
    started = time.monotonic()
    r = _fetch(gw, {"url": origin.url("/slow?s=3"), "timeout": 2})
    err = assert_api_error(r, 504, "GATEWAY_TIMEOUT")
    assert err["details"] == {"timeoutSeconds": 2}
    assert 2 <= time.monotonic() - started < 3
    assert r.headers["x-ratelimit-limit"] == str(RPS)


def test_proxy_clients_cannot_set_a_timeout(gw: Gateway, origin) -> None:
    _, user, password = gw.customer()
    r = httpx.get(
        origin.url("/slow?s=2"),
        proxy=gw.proxy(user, password),
        headers={"X-Datorus-Egress-Report": "1", "X-Datorus-Timeout": "guess:4"},
        timeout=30,
    )
    assert r.status_code == 504
    assert r.json()["error"]["details"] == {"timeoutSeconds": 1}


@pytest.mark.parametrize("timeout", [0, 121, 10**6])
def test_fetch_timeout_out_of_range_is_validation_error(gw: Gateway, origin, timeout) -> None:
    r = _fetch(gw, {"url": origin.url("/"), "timeout": timeout})
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == "timeout"


def test_fetch_answers_carry_the_proxy_credentials_rate_limit(gw: Gateway, origin) -> None:
    left = []
    for _ in range(4):  # more than the API's per-key burst (2): fetches are not counted there
        r = _fetch(gw, {"url": origin.url("/")})
        assert r.status_code == 200, r.text
        h = r.headers
        assert h["x-ratelimit-limit"] == h["x-datorus-ratelimit-limit"] == str(RPS)
        assert h["x-ratelimit-remaining"] == h["x-datorus-ratelimit-remaining"]
        assert int(h["x-datorus-ratelimit-reset"]) >= int(time.time()) - 1
        rl = r.json()["meta"]["rate_limit"]
        assert (rl["limit"], rl["remaining"]) == (str(RPS), h["x-ratelimit-remaining"])
        left.append(int(h["x-ratelimit-remaining"]))
    assert max(left) < BURST
    # the gateway's own refusal carries them too, and so does a refusal of the API's own
    r = _fetch(gw, {"url": "http://169.254.169.254/latest/meta-data/"})
    assert_api_error(r, 403, "AUP_VIOLATION")
    assert r.headers["x-ratelimit-limit"] == r.headers["x-datorus-ratelimit-limit"] == str(RPS)
    r = _fetch(gw, {"url": "ftp://x/"})
    assert_api_error(r, 400, "VALIDATION_ERROR")
    assert r.headers["x-ratelimit-limit"] == str(RPS) and "x-ratelimit-remaining" in r.headers
