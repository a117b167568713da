"""Events (issue 18): the log, customer webhooks from the outbox, the SSE stream.

A real gateway serving its REST API; webhook receivers on loopback (the test ledger
allows 127.0.0.0/8, as the operator would for a receiver on the box); the README's own
snippet verifies the signatures.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import assert_api_error, bearer
from support.ledger import cli
from support.processes import Gateway, GatewaySetup
from support.receivers import Receiver
from support.waiting import wait_until

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    """A gateway with its API; quick retries and keep-alives, so tests need not wait."""
    return GatewaySetup(
        {"event_retry_first_ms": 200, "event_keepalive_seconds": 1, "webhook_timeout": 3},
        api=True,
    )


def _readme_verify() -> Any:
    """``verify_datorus_signature`` as the README shows it."""
    text = README.read_text()
    m = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", text, re.S)
    assert m, "the README's verify snippet"
    scope: dict[str, Any] = {}
    exec(m.group(1), scope)  # noqa: S102 - the README's own code, run as a reader would
    return scope["verify_datorus_signature"]


def _customer(gw: Gateway) -> tuple[int, dict[str, str]]:
    """A new account and the Authorization header of an API key of it."""
    acc = cli(gw.db, "account", "create", f"e{time.monotonic_ns()}@example.com")
    key = cli(gw.db, "key", "create", str(acc["id"]))
    return acc["id"], bearer(key["key"])


def _subscribe(gw: Gateway, h: dict[str, str], url: str, events: Any) -> dict[str, Any]:
    r = httpx.post(f"{gw.api_url}/account/webhooks", json={"url": url, "events": events}, headers=h)
    assert r.status_code == 201, r.text
    return r.json()


def test_topup_reaches_the_webhook_signed(gw: Gateway) -> None:
    aid, h = _customer(gw)
    rcv = Receiver()
    try:
        hook = _subscribe(gw, h, rcv.url, ["credits.*"])
        assert hook["secret"].startswith("whsec_") and hook["events"] == ["credits.*"]
        listed = httpx.get(f"{gw.api_url}/account/webhooks", headers=h).json()["items"]
        assert [w["id"] for w in listed] == [hook["id"]]
        assert "secret" not in listed[0]

        cli(gw.db, "balance", "add", str(aid), "500")
        (got,) = wait_until(lambda: rcv.of_type("credits.purchased"), what="the webhook")
        event = json.loads(got["body"])
        assert event["type"] == "credits.purchased"
        assert set(event) == {"id", "type", "created_at", "data"}
        assert event["data"]["amount_cents"] == 500 and event["data"]["balance_cents"] == 500
        assert got["headers"]["datorus-event-id"] == event["id"]
        assert got["headers"]["content-type"] == "application/json"
        verify = _readme_verify()
        sig = got["headers"]["datorus-signature"]
        assert verify(hook["secret"], got["body"], sig)
        assert not verify(hook["secret"], got["body"] + b" ", sig)
        assert not verify("whsec_other", got["body"], sig)

        wait_until(
            lambda: httpx.get(f"{gw.api_url}/account/webhooks", headers=h).json()["items"][0][
                "last_success_at"
            ],
            what="the webhook's health",
        )
    finally:
        rcv.close()


def test_failed_deliveries_are_retried_with_the_same_event_id(gw: Gateway) -> None:
    aid, h = _customer(gw)
    rcv = Receiver(fail_first=2)
    try:
        hook = _subscribe(gw, h, rcv.url, "credits.purchased")
        cli(gw.db, "balance", "add", str(aid), "300")
        wait_until(lambda: len(rcv.seen) >= 3, what="two retries")
        ids = {s["headers"]["datorus-event-id"] for s in rcv.seen}
        assert len(ids) == 1
        body = {s["body"] for s in rcv.seen}
        assert len(body) == 1  # the same event each time

        def delivered() -> Any:
            r = httpx.get(f"{gw.api_url}/account/webhooks/{hook['id']}", headers=h).json()
            return r if r["deliveries"][0]["status"] == "delivered" else None

        w = wait_until(delivered, what="delivered")
        assert w["deliveries"][0]["attempts"] == 3
        # the receiver's answer is on record on success as on failure
        assert w["deliveries"][0]["last_status"] == 204
        assert w["deliveries"][0]["last_error"] is None
        assert w["last_failure"] == "answered 500"
        time.sleep(0.5)  # nothing more arrives once delivered (retries were 0.2-0.8 s apart)
        assert len(rcv.seen) == 3
    finally:
        rcv.close()


def test_a_dead_receiver_does_not_delay_another(gw: Gateway) -> None:
    aid, h = _customer(gw)
    dead, live = Receiver(mode="hang"), Receiver()
    try:
        _subscribe(gw, h, dead.url, ["credits.*"])
        _subscribe(gw, h, live.url, ["credits.*"])
        cli(gw.db, "balance", "add", str(aid), "100")
        wait_until(lambda: dead.seen, what="the dead receiver's first delivery")
        cli(gw.db, "balance", "add", str(aid), "200")
        # the dead one holds its first delivery for webhook_timeout (3 s); the live one
        # gets both meanwhile
        got = wait_until(
            lambda: len(live.of_type("credits.purchased")) >= 2 and live.seen, timeout=2.5
        )
        amounts = sorted(json.loads(s["body"])["data"]["amount_cents"] for s in got)
        assert amounts == [100, 200]
        assert len(dead.seen) == 1
    finally:
        dead.close()
        live.close()


def test_a_redirect_is_not_followed(gw: Gateway) -> None:
    aid, h = _customer(gw)
    target = Receiver()
    rcv = Receiver(mode="redirect", location=target.url)
    try:
        hook = _subscribe(gw, h, rcv.url, ["credits.*"])
        cli(gw.db, "balance", "add", str(aid), "100")

        def failed() -> Any:
            w = httpx.get(f"{gw.api_url}/account/webhooks/{hook['id']}", headers=h).json()
            return w if w["last_failure"] else None

        w = wait_until(failed, what="the redirect's failure")
        assert w["last_failure"] == "redirect (not followed) 302"
        assert target.seen == []
    finally:
        rcv.close()
        target.close()


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link_local"),
        ("http://10.1.2.3/hook", "private"),
        ("http://[fd00::1]/hook", "unique_local"),
    ],
)
def test_webhook_to_an_internal_address_is_refused(gw: Gateway, url: str, rule: str) -> None:
    _, h = _customer(gw)
    r = httpx.post(f"{gw.api_url}/account/webhooks", json={"url": url}, headers=h)
    err = assert_api_error(r, 403, "AUP_VIOLATION")
    assert err["details"]["rule"] == rule
    # the customer is told what may be a target instead
    assert err["details"]["hint"].startswith("Webhooks go to public http(s) destinations only")
    assert "link-local (cloud metadata)" in err["details"]["hint"]


@pytest.mark.one_node
def test_webhook_to_the_gateway_itself_is_refused(gw: Gateway) -> None:
    """Loopback is allowed on this test box, but never the gateway's own ports (behind a
    balancer its port is not a node's own: the operator denies it, as the README says)."""
    _, h = _customer(gw)
    for url in (f"{gw.api_url}/account", f"http://127.0.0.1:{gw.port}/"):
        r = httpx.post(f"{gw.api_url}/account/webhooks", json={"url": url}, headers=h)
        err = assert_api_error(r, 403, "AUP_VIOLATION")
        assert err["details"]["rule"] == "gateway_self"
        assert err["details"]["hint"] == (
            "A webhook cannot point at the gateway's own ports;"
            " use a public http(s) URL that the acceptable-use policy allows."
        )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "http://user:pw@example.com/x"}, "url"),
        ({"url": "https://example.com/x", "events": ["nothing.*"]}, "events"),
        ({"url": "https://example.com/x", "events": "proxy.*"}, "events"),  # operator events
        ({"events": ["credits.*"]}, "url"),
    ],
)
def test_webhook_validation(gw: Gateway, body: dict[str, Any], field: str) -> None:
    _, h = _customer(gw)
    r = httpx.post(f"{gw.api_url}/account/webhooks", json=body, headers=h)
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == field


def test_webhook_delete_and_errors(gw: Gateway) -> None:
    _, h = _customer(gw)
    _, other = _customer(gw)
    hook = _subscribe(gw, h, "http://127.0.0.1:9/hook", ["lease.*"])
    r = httpx.delete(f"{gw.api_url}/account/webhooks/{hook['id']}", headers=other)
    assert_api_error(r, 404, "RESOURCE_NOT_FOUND")
    r = httpx.delete(f"{gw.api_url}/account/webhooks/{hook['id']}", headers=h)
    assert r.status_code == 200 and r.json() == {"id": hook["id"], "deleted": True}
    r = httpx.delete(f"{gw.api_url}/account/webhooks/{hook['id']}", headers=h)
    assert_api_error(r, 404, "RESOURCE_NOT_FOUND")
    assert httpx.get(f"{gw.api_url}/account/webhooks", headers=h).json()["items"] == []
    r = httpx.get(f"{gw.api_url}/account/webhooks")
    assert_api_error(r, 401, "INVALID_CREDENTIAL")


def _sse(lines: Any, until: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Read SSE messages off *lines* until *until* events came; (events, comments)."""
    events: list[dict[str, Any]] = []
    comments: list[str] = []
    msg: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            comments.append(line)
        elif line == "":
            if "data" in msg:
                events.append(msg)
                if len(events) >= until:
                    break
            msg = {}
        else:
            k, _, v = line.partition(": ")
            msg[k] = v
    return events, comments


def test_events_stream_resumes_without_repeats_or_gaps(gw: Gateway) -> None:
    aid, h = _customer(gw)
    _, other = _customer(gw)
    cli(gw.db, "balance", "add", str(aid), "100")
    sse = {**h, "Accept": "text/event-stream"}
    url = f"{gw.api_url}/account/events"
    with httpx.stream("GET", url, headers=sse, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        (first,), _ = _sse(lines, 1)
        assert first["event"] == "credits.purchased"
        data = json.loads(first["data"])
        assert data["id"] == first["id"] and data["data"]["amount_cents"] == 100
        cli(gw.db, "account", "suspend", str(aid))  # live, while the stream is open
        (second,), comments = _sse(lines, 1)
        assert second["event"] == "account.suspended"
        assert int(second["id"]) > int(first["id"])
        # quiet for over event_keepalive_seconds (1): a keep-alive comment comes
        _, comments = _sse(iter([*_take_until_comment(lines)]), 1)
        assert any(c.startswith(": keep-alive") for c in comments)
    cli(gw.db, "account", "unsuspend", str(aid))
    cli(gw.db, "balance", "add", str(aid), "200")
    with httpx.stream("GET", url, headers={**sse, "Last-Event-ID": first["id"]}, timeout=10) as r:
        got, _ = _sse(r.iter_lines(), 2)
    assert [e["id"] for e in got] == [
        second["id"],
        str(json.loads(got[1]["data"])["id"]),
    ]
    assert got[1]["event"] == "credits.purchased"
    assert json.loads(got[1]["data"])["data"]["amount_cents"] == 200

    # the JSON page, for polling: the same events, after an id; another account sees none
    page = httpx.get(url, params={"after": first["id"]}, headers=h).json()
    assert [e["id"] for e in page["items"]] == [e["id"] for e in got]
    assert page["next_after"] == got[1]["id"]
    assert httpx.get(url, params={"after": page["next_after"]}, headers=h).json()["items"] == []
    assert httpx.get(url, headers=other).json()["items"] == []
    assert_api_error(httpx.get(url, params={"after": "x"}, headers=h), 400, "VALIDATION_ERROR")


def test_events_page_counts_every_event_and_ends_empty(gw: Gateway) -> None:
    aid, h = _customer(gw)
    for cents in (1, 2, 3, 4):
        cli(gw.db, "balance", "add", str(aid), str(cents))
    url = f"{gw.api_url}/account/events"
    first = httpx.get(url, params={"limit": 2}, headers=h).json()
    assert len(first["items"]) == 2 and first["total_count"] == 4  # all of them, not the page
    rest = httpx.get(url, params={"limit": 2, "after": first["next_after"]}, headers=h).json()
    assert len(rest["items"]) == 2 and rest["total_count"] == 4
    # the end: an empty page, the cursor kept where it was
    end = httpx.get(url, params={"after": rest["next_after"]}, headers=h).json()
    assert end == {"items": [], "next_after": rest["next_after"], "total_count": 4}


def test_a_revoked_key_ends_its_open_stream(gw: Gateway) -> None:
    aid, h = _customer(gw)
    key = httpx.post(f"{gw.api_url}/auth/keys", json={"label": "leaky"}, headers=h).json()
    sse = {**bearer(key["key"]), "Accept": "text/event-stream"}
    with httpx.stream("GET", f"{gw.api_url}/account/events", headers=sse, timeout=10) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        cli(gw.db, "balance", "add", str(aid), "100")
        (got,), _ = _sse(lines, 1)
        assert got["event"] == "credits.purchased"  # it streams while the key lives
        revoked = httpx.delete(f"{gw.api_url}/auth/keys/{key['id']}", headers=h)
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        at = time.monotonic()
        rest = list(lines)  # the stream ends (the read timeout, 10 s, would fail it)
        took = time.monotonic() - at
    assert took < 2.0, f"the stream ended {took:.2f} s after the key was revoked"
    assert not any(line.startswith(("id:", "data:")) for line in rest), rest
    assert ": the API key was revoked; the stream ends" in rest
    # nothing of what came after the revocation reached it, and the key is refused
    cli(gw.db, "balance", "add", str(aid), "200")
    r = httpx.get(f"{gw.api_url}/account/events", headers=bearer(key["key"]))
    assert_api_error(r, 401, "INVALID_CREDENTIAL")
    assert r.headers["www-authenticate"].startswith("Bearer")


def _take_until_comment(lines: Any) -> Any:
    for line in lines:
        yield line
        if line.startswith(":"):
            yield ""
            return


def _events(gw: Gateway, h: dict[str, str], event_type: str) -> list[dict[str, Any]]:
    items = httpx.get(f"{gw.api_url}/account/events", params={"limit": 500}, headers=h).json()
    return [e for e in items["items"] if e["type"] == event_type]


def test_the_first_refusal_for_money_is_one_credits_exhausted(gw: Gateway, origin) -> None:
    aid, user, pw = gw.customer(trial_bytes=0)
    h = bearer(cli(gw.db, "key", "create", str(aid))["key"])
    proxies = {"http": gw.proxy(user, pw)}
    for _ in range(3):
        r = httpx.get(origin.url("/"), proxy=proxies["http"], timeout=10)
        assert r.status_code == 402 and r.json()["error"]["code"] == "TRIAL_EXHAUSTED"
    (first,) = wait_until(lambda: _events(gw, h, "credits.exhausted"), what="credits.exhausted")
    assert first["data"] == {"account_id": aid, "code": "TRIAL_EXHAUSTED", "balance_cents": 0}

    # money in, then taken back: the next refusal is news again, once
    cli(gw.db, "balance", "add", str(aid), "100")
    cli(gw.db, "balance", "add", str(aid), "-100", "--reason", "mistaken top-up")

    def refused_for_balance() -> bool:
        r = httpx.get(origin.url("/"), proxy=proxies["http"], timeout=10)
        return r.status_code == 402 and r.json()["error"]["code"] == "INSUFFICIENT_BALANCE"

    wait_until(refused_for_balance, what="the correction reaching the gateway")
    refused_for_balance()
    got = wait_until(lambda: len(_events(gw, h, "credits.exhausted")) >= 2 and _events(
        gw, h, "credits.exhausted"
    ))  # fmt: skip
    assert [e["data"]["code"] for e in got] == ["TRIAL_EXHAUSTED", "INSUFFICIENT_BALANCE"]


def test_the_console_shows_webhooks_alerts_and_recent_events(gw: Gateway) -> None:
    aid, h = _customer(gw)
    _subscribe(gw, h, "http://127.0.0.1:9/hook", ["credits.*"])
    httpx.put(f"{gw.api_url}/account/alerts", json={"low_balance_cents": 250}, headers=h)
    cli(gw.db, "balance", "add", str(aid), "100")
    key = h["Authorization"].removeprefix("Bearer ")
    with httpx.Client(base_url=gw.api_url, timeout=10) as c:
        page = c.get("/console").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        r = c.post("/console/signin/key", data={"key": key, "csrf": csrf})
        assert r.status_code == 303
        page = c.get("/console").text
    section = page[page.index('id="events"') :]
    assert "Events and alerts" in section
    assert "below $2.50, mailed to you" in section
    assert "http://127.0.0.1:9/hook" in section and "credits.*" in section
    assert "credits.purchased" in section
