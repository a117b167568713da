"""Money comforts (issue 18): auto-recharge once per crossing against localstripe, and
``credits.low`` alerts mailed through aiosmtpd.

The accounts pay 0.01 cent a byte (10^7 cents per GB), so a crawl of a few tens of KB
through the real gateway takes a balance past its threshold.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import stripe
from api_helpers import assert_api_error, bearer
from support.ledger import cli
from support.processes import Gateway, GatewaySetup
from support.waiting import wait_until

PRICE = 10**7  # cents per GB: 0.01 cent a byte


@pytest.fixture(scope="module")
def gw_setup(localstripe: str, smtp_server) -> GatewaySetup:
    """A gateway with its API, Stripe at localstripe and mail at aiosmtpd."""
    return GatewaySetup(
        {
            "stripe_api_key": "sk_test_datorus",
            "stripe_api_base": localstripe,
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp_server.port,
            "max_overdraft_cents": 10_000,
        },
        api=True,
    )


@pytest.fixture(scope="module")
def client(localstripe: str) -> stripe.StripeClient:
    """What Stripe.js does in the browser: turn a card number into a PaymentMethod."""
    return stripe.StripeClient("sk_test_client", base_addresses={"api": localstripe})


def _customer(gw: Gateway) -> tuple[int, str, dict[str, str], str]:
    """(account id, email, API key header, proxy URL) of a paying account."""
    email = f"m{time.monotonic_ns()}@example.com"
    aid, user, pw = gw.customer(trial_bytes=0, price_cents_per_gb=PRICE)
    cli(gw.db, "account", "show", str(aid))
    key = cli(gw.db, "key", "create", str(aid))["key"]
    email = cli(gw.db, "account", "show", str(aid))["email"]
    return aid, email, bearer(key), gw.proxy(user, pw)


def _save_card(gw: Gateway, client: stripe.StripeClient, h: dict[str, str], number: str) -> None:
    pm = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    r = httpx.post(f"{gw.api_url}/account/cards", json={"payment_method": pm.id}, headers=h)
    assert r.status_code == 201, r.text


def _balance(gw: Gateway, h: dict[str, str]) -> int:
    return int(httpx.get(f"{gw.api_url}/account/credits", headers=h, timeout=30).json()["balance"])


def _events(gw: Gateway, h: dict[str, str], event_type: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{gw.api_url}/account/events", params={"limit": 500}, headers=h)
    return [e for e in r.json()["items"] if e["type"] == event_type]


def _crawl(proxy: str, origin, nbytes: int) -> None:
    r = httpx.get(origin.url(f"/bytes/{nbytes}"), proxy=proxy, timeout=30)
    assert r.status_code == 200, r.text


def _seen_top_up(proxy: str, origin) -> None:
    """Wait until the gateway (every worker) knows the top-up: a small request passes."""

    def passes() -> bool:
        return httpx.get(origin.url("/bytes/1"), proxy=proxy, timeout=10).status_code == 200

    wait_until(passes, what="the top-up reaching the gateway")


def _charges(localstripe: str, aid: int) -> list[dict[str, Any]]:
    seen = httpx.get(f"{localstripe}/_config/requests", timeout=30).json()
    return [
        s
        for s in seen
        if s["path"] == "/v1/payment_intents"
        and f"-{aid}-charge-autorecharge:{aid}:" in (s["idempotency_key"] or "")
    ]


def test_autorecharge_charges_once_per_crossing(gw: Gateway, client, localstripe, origin) -> None:
    aid, _, h, proxy = _customer(gw)
    _save_card(gw, client, h, "4242424242424242")
    cli(gw.db, "balance", "add", str(aid), "300")
    _seen_top_up(proxy, origin)
    r = httpx.put(
        f"{gw.api_url}/account/autorecharge",
        json={"threshold_cents": 200, "amount_cents": 500},
        headers=h,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"enabled": True, "threshold_cents": 200, "amount_cents": 500}
    assert httpx.get(f"{gw.api_url}/account/autorecharge", headers=h).json()["enabled"] is True

    _crawl(proxy, origin, 15_000)  # ~150 cents: the balance dips below 200
    wait_until(lambda: _balance(gw, h) >= 500, timeout=20, what="the recharge")
    # the dip is charged once, however often the gateway looks at it meanwhile
    wait_until(lambda: len(_events(gw, h, "credits.purchased")) >= 2, what="its event")
    time.sleep(2.5)  # two more passes of the alert check (every second)
    assert len(_charges(localstripe, aid)) == 1
    bought = _events(gw, h, "credits.purchased")
    assert [e["data"]["source"] for e in bought] == ["operator", "stripe"]
    assert bought[1]["data"]["amount_cents"] == 500

    _crawl(proxy, origin, 50_000)  # a second crossing: charged again, once
    wait_until(lambda: len(_charges(localstripe, aid)) == 2, timeout=20, what="a second charge")
    wait_until(lambda: len(_events(gw, h, "credits.purchased")) == 3, what="its event")

    r = httpx.delete(f"{gw.api_url}/account/autorecharge", headers=h)
    assert r.json() == {"enabled": False, "threshold_cents": None, "amount_cents": None}


def test_a_declined_recharge_is_an_event_and_not_retried(
    gw: Gateway, client, localstripe, origin, smtp_server
) -> None:
    aid, email, h, proxy = _customer(gw)
    _save_card(gw, client, h, "4000000000000341")  # saved fine, declined when charged
    cli(gw.db, "balance", "add", str(aid), "100")
    r = httpx.put(
        f"{gw.api_url}/account/autorecharge",
        json={"threshold_cents": 200, "amount_cents": 500},
        headers=h,
    )
    assert r.status_code == 200
    (failed,) = wait_until(lambda: _events(gw, h, "credits.recharge_failed"), timeout=20)
    assert failed["data"]["code"] == "STRIPE_DECLINED"
    assert failed["data"]["decline_code"] == "card_declined"  # snake_case, as all event data
    # the owner is told by mail, once (probe 8b: a decline was an event row only)
    mail = wait_until(lambda: [m for m in smtp_server.messages if email in m["to"]])
    assert "Your Datorus auto-recharge was declined" in mail[0]["data"]
    assert "card_declined" in mail[0]["data"]
    time.sleep(2.5)
    assert len(_charges(localstripe, aid)) == 1
    assert len(_events(gw, h, "credits.recharge_failed")) == 1
    assert len([m for m in smtp_server.messages if email in m["to"]]) == 1


def test_autorecharge_needs_a_saved_card(gw: Gateway) -> None:
    _, _, h, _ = _customer(gw)
    r = httpx.put(
        f"{gw.api_url}/account/autorecharge",
        json={"threshold_cents": 200, "amount_cents": 500},
        headers=h,
    )
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == "payment_method"
    r = httpx.put(
        f"{gw.api_url}/account/autorecharge",
        json={"threshold_cents": 200, "amount_cents": 10},
        headers=h,
    )
    assert assert_api_error(r, 400, "VALIDATION_ERROR")["details"]["field"] == "amount_cents"


def test_low_balance_alert_is_announced_and_mailed_once(gw: Gateway, origin, smtp_server) -> None:
    aid, email, h, proxy = _customer(gw)
    r = httpx.put(f"{gw.api_url}/account/alerts", json={"low_balance_cents": 200}, headers=h)
    assert r.json() == {"low_balance_cents": 200, "email": True}
    cli(gw.db, "balance", "add", str(aid), "300")
    _seen_top_up(proxy, origin)
    _crawl(proxy, origin, 15_000)
    (low,) = wait_until(lambda: _events(gw, h, "credits.low"), timeout=20, what="credits.low")
    assert low["data"]["threshold_cents"] == 200 and low["data"]["balance_cents"] < 200
    mail = wait_until(lambda: [m for m in smtp_server.messages if email in m["to"]])
    assert "Your Datorus balance is low" in mail[0]["data"]
    _crawl(proxy, origin, 1_000)  # still below: no second alert for the same dip
    time.sleep(2.5)
    assert len(_events(gw, h, "credits.low")) == 1
    assert len([m for m in smtp_server.messages if email in m["to"]]) == 1
    r = httpx.delete(f"{gw.api_url}/account/alerts", headers=h)
    assert r.json()["low_balance_cents"] is None
