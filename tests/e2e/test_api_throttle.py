"""The REST API's throttles on the wire: sign-ups, verification mails and failed key
checks per client address, everything else per API key.

One gateway serving its API with low limits. Each test speaks from its own loopback
address (127.0.0.N as the client's source address), so the per-address limits of
one test never touch another's.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from api_helpers import assert_api_error, bearer
from support.processes import Gateway, GatewaySetup
from support.waiting import wait_until

SIGNUPS, RESENDS, FAILS, RPS, BURST = 3, 2, 3, 1, 5


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    return GatewaySetup(
        {
            "api_signups_per_hour": SIGNUPS,
            "api_resends_per_hour": RESENDS,
            "api_key_fail_limit": FAILS,
            "api_key_rps": RPS,
            "api_key_burst": BURST,
            "ws_connect_timeout": 2,
        },
        api=True,
    )


def _client(source: str) -> httpx.Client:
    """A client whose requests come from *source* (a loopback address)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30)


def _email() -> str:
    return f"t{time.monotonic_ns()}@example.com"


def _limits(r: httpx.Response) -> tuple[int, int]:
    return int(r.headers["x-ratelimit-limit"]), int(r.headers["x-ratelimit-remaining"])


def _refused(r: httpx.Response, limit: str, count: int) -> dict:
    err = assert_api_error(r, 429, "RATE_LIMITED")
    assert err["details"]["limit"] == limit
    assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
    assert int(r.headers["retry-after"]) == err["details"]["retryAfterSeconds"]
    assert _limits(r) == (count, 0)
    return err


def _customer_key(gw: Gateway) -> tuple[int, str]:
    acc = gw.cli("account", "create", _email())
    return acc["id"], gw.cli("key", "create", str(acc["id"]))["key"]


def test_signups_are_throttled_per_client_address(gw: Gateway) -> None:
    with _client("127.0.0.11") as c:
        for left in range(SIGNUPS - 1, -1, -1):
            r = c.post(f"{gw.api_url}/auth/register", json={"email": _email()})
            assert r.status_code == 201, r.text
            assert _limits(r) == (SIGNUPS, left)
        r = c.post(f"{gw.api_url}/auth/register", json={"email": _email()})
        err = _refused(r, "signup", SIGNUPS)
        assert err["details"]["setting"] == "api_signups_per_hour"
        # one sign-up per 1200 s: that is how long to wait
        assert 1100 <= int(r.headers["retry-after"]) <= 1200
        # a refused attempt makes nothing
        email = _email()
        r = c.post(f"{gw.api_url}/auth/register", json={"email": email})
        _refused(r, "signup", SIGNUPS)
        assert not gw.cli("outbox", "--to", email)["items"]
    with _client("127.0.0.12") as c:  # another address is not held back
        r = c.post(f"{gw.api_url}/auth/register", json={"email": _email()})
        assert r.status_code == 201 and _limits(r) == (SIGNUPS, SIGNUPS - 1)


def test_verification_resends_are_throttled_per_address_and_account(gw: Gateway) -> None:
    with _client("127.0.0.13") as c:
        key = c.post(f"{gw.api_url}/auth/register", json={"email": _email()}).json()
        h = bearer(key["api_key"]["key"])
        for left in range(RESENDS - 1, -1, -1):
            r = c.post(f"{gw.api_url}/auth/verify/resend", headers=h)
            assert r.status_code == 202, r.text
            assert _limits(r) == (RESENDS, left)  # the tightest limit that applied
        _refused(c.post(f"{gw.api_url}/auth/verify/resend", headers=h), "resend", RESENDS)
        # the key's other routes go on: only the mails are held back
        r = c.get(f"{gw.api_url}/account", headers=h)
        assert r.status_code == 200 and _limits(r)[0] == RPS
    with _client("127.0.0.14") as c:  # the same account from elsewhere: still held back
        _refused(c.post(f"{gw.api_url}/auth/verify/resend", headers=h), "resend", RESENDS)


def test_failed_key_checks_are_throttled_per_address_and_a_correct_key_still_passes(
    gw: Gateway,
) -> None:
    _, good = _customer_key(gw)
    wrong = bearer("pp_" + "x" * 48)
    with _client("127.0.0.15") as c:
        for left in range(FAILS - 1, -1, -1):
            r = c.get(f"{gw.api_url}/account", headers=wrong)
            assert_api_error(r, 401, "INVALID_CREDENTIAL")
            assert _limits(r) == (FAILS, left)
        r = c.get(f"{gw.api_url}/account", headers=wrong)
        err = _refused(r, "key_fail", FAILS)
        assert err["details"]["setting"] == "api_key_fail_limit"
        assert 1 <= int(r.headers["retry-after"]) <= 60 // FAILS
        _refused(
            c.get(f"{gw.api_url}/auth/keys", headers={"Authorization": "Basic eDp5"}),
            "key_fail",
            FAILS,
        )
        # a correct key from the same address is never refused for those failures
        r = c.get(f"{gw.api_url}/account", headers=bearer(good))
        assert r.status_code == 200, r.text
        # no key at all is no attempt: plain 401
        assert_api_error(c.get(f"{gw.api_url}/account"), 401, "INVALID_CREDENTIAL")
    with _client("127.0.0.16") as c:  # another address: a plain 401
        r = c.get(f"{gw.api_url}/account", headers=wrong)
        assert_api_error(r, 401, "INVALID_CREDENTIAL")
        assert _limits(r) == (FAILS, FAILS - 1)


def test_requests_are_throttled_per_api_key(gw: Gateway) -> None:
    account_id, key = _customer_key(gw)
    h = bearer(key)
    with httpx.Client(timeout=30) as c:
        seen = []
        for _ in range(BURST + 3):  # the burst, then refused (a slow box may refill one)
            r = c.get(f"{gw.api_url}/account", headers=h)
            if r.status_code != 200:
                break
            seen.append(_limits(r))
        assert [limit for limit, _ in seen] == [RPS] * len(seen)
        assert seen[0][1] == BURST - 1 and BURST <= len(seen) <= BURST + 2
        assert [left for _, left in seen] == sorted((left for _, left in seen), reverse=True)
        err = _refused(r, "key", RPS)
        assert r.headers["retry-after"] == "1" and err["details"]["setting"] == "api_key_rps"
        # another key (even of the same account) has its own bucket
        other = gw.cli("key", "create", str(account_id))["key"]
        r = c.get(f"{gw.api_url}/account", headers=bearer(other))
        assert r.status_code == 200 and _limits(r) == (RPS, BURST - 1)
        # the bucket refills at api_key_rps
        wait_until(
            lambda: c.get(f"{gw.api_url}/account", headers=h).status_code == 200,
            5,
            0.1,
            "the key's bucket to refill",
        )


def test_unthrottled_routes_carry_no_limit(gw: Gateway) -> None:
    r = httpx.get(f"{gw.api_url}/health", timeout=30)
    assert r.status_code == 200 and "x-ratelimit-limit" not in r.headers


def test_ws_relay_counts_wrong_keys_against_the_address(gw: Gateway) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    port = int(gw.api_url.rsplit(":", 1)[1])

    def close_of(source: str) -> tuple[int, str]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        with connect(f"ws://127.0.0.1:{port}/ws", sock=sock, open_timeout=10) as ws:
            ws.send(json.dumps({"apiKey": "pp_" + "y" * 48, "url": "ws://127.0.0.1:9/"}))
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=10)
        return e.value.rcvd.code, e.value.rcvd.reason

    for _ in range(FAILS):
        assert close_of("127.0.0.17") == (1008, "invalid API key")
    assert close_of("127.0.0.17") == (1008, "rate limit exceeded")
    assert close_of("127.0.0.18") == (1008, "invalid API key")
