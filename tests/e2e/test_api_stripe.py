"""Stripe top-ups against localstripe (a fake Stripe API from PyPI) started by the suite.

Cards are Stripe's documented test numbers: 4242424242424242 succeeds,
4000000000000002 is declined (when it is saved), 4000000000000341 is declined when
charged, 4000002500003155 needs 3-D Secure. localstripe delivers its own signed
webhooks to the API (as Stripe does); the tests also sign deliveries themselves to
send duplicates and bad signatures. localstripe has no Checkout Sessions; the test
server (tests/localstripe_server.py) adds a minimal session endpoint, and records each
request so the idempotency keys Datorus sends can be checked.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import requests
import stripe
from api_helpers import assert_api_error, bearer, register, token_from_ledger
from support.ledger import ledger_rows, ledger_value, new_ledger, prepare_ledger
from support.processes import ApiProcess, Gateway
from support.waiting import wait_until

SECRET = "whsec_datorus_test"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, localstripe: str) -> Iterator[ApiProcess]:
    """A standalone ``datorus api`` wired to localstripe, its webhooks delivered to us."""
    db = new_ledger(tmp_path_factory.mktemp("stripe"))
    prepare_ledger(db)
    a = ApiProcess(
        db,
        {
            "stripe_api_key": "sk_test_datorus",
            "stripe_api_base": localstripe,
            "stripe_webhook_secret": SECRET,
            "trial_bytes": 1000,
        },
    ).start()
    r = httpx.post(
        f"{localstripe}/_config/webhooks/datorus-{a.port}",
        data={"url": f"{a.url}/stripe/webhook", "secret": SECRET},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    yield a
    a.stop()


@pytest.fixture(scope="module")
def client(localstripe: str) -> stripe.StripeClient:
    """What Stripe.js does in the browser: turn a card number into a PaymentMethod."""
    return stripe.StripeClient("sk_test_client", base_addresses={"api": localstripe})


def _card(client: stripe.StripeClient, number: str) -> str:
    pm = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    return pm.id


def _account(api: ApiProcess) -> tuple[int, dict[str, str]]:
    email = f"s{time.monotonic_ns()}@example.com"
    body = register(api.url, email)
    r = httpx.post(f"{api.url}/auth/verify", json={"token": token_from_ledger(api.db, email)})
    assert r.status_code == 200
    return body["user"]["id"], bearer(body["api_key"]["key"])


def _balance(api: ApiProcess, h: dict[str, str]) -> int:
    return httpx.get(f"{api.url}/account/credits", headers=h, timeout=30).json()["balance"]


@functools.cache
def _ledger_id(api: ApiProcess) -> str:
    return ledger_value(api.db, "SELECT value FROM api_secrets WHERE name = 'ledger_id'")[:16]


def _events(api: ApiProcess, external_id: str) -> list[tuple]:
    return ledger_rows(
        api.db, "SELECT id, type FROM stripe_events WHERE external_id = ?", (external_id,)
    )


def _signed(payload: bytes, secret: str = SECRET, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    sig = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={ts},v1={sig}", "Content-Type": "application/json"}


def _event(etype: str, obj: dict) -> bytes:
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "object": "event",
            "type": etype,
            "created": int(time.time()),
            "data": {"object": obj},
        }
    ).encode()


def _pi_succeeded(api: ApiProcess, account_id: int, cents: int, pi: str | None = None) -> bytes:
    return _event(
        "payment_intent.succeeded",
        {
            "id": pi or f"pi_{uuid.uuid4().hex[:24]}",
            "object": "payment_intent",
            "amount": cents,
            "amount_received": cents,
            "status": "succeeded",
            "metadata": {"datorus_account": str(account_id), "datorus_ledger": _ledger_id(api)},
        },
    )


# -- a saved card ----------------------------------------------------------------------------


def test_card_top_up_credits_once_even_after_stripes_webhook(api, client) -> None:
    account_id, h = _account(api)
    r = httpx.post(
        f"{api.url}/account/cards",
        json={"payment_method": _card(client, "4242424242424242")},
        headers=h,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    assert r.json()["last4"] == "4242"

    r = httpx.post(
        f"{api.url}/account/topups",
        json={"amount_cents": 500},
        headers={**h, "Idempotency-Key": "first-top-up"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    paid = r.json()
    assert paid["status"] == "succeeded" and paid["credited"] is True
    assert paid["balance_cents"] == 500 and paid["amount_cents"] == 500
    # localstripe now delivers payment_intent.succeeded, signed, to /stripe/webhook
    wait_until(
        lambda: _events(api, f"stripe:{paid['payment_intent']}"), 15, 0.1, "Stripe's webhook"
    )
    assert _balance(api, h) == 500
    credits = httpx.get(f"{api.url}/account/credits", headers=h).json()
    assert credits["recent_transactions"][0]["tx_type"] == "purchase"
    assert credits["recent_transactions"][0]["amount"] == 500

    # a client retry with the same Idempotency-Key charges nothing more
    r = httpx.post(
        f"{api.url}/account/topups",
        json={"amount_cents": 500},
        headers={**h, "Idempotency-Key": "first-top-up"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    assert r.json()["payment_intent"] == paid["payment_intent"] and r.json()["replayed"] is True
    assert _balance(api, h) == 500


def test_card_declined_when_saved_is_stripe_declined(api, client) -> None:
    _, h = _account(api)
    pm = _card(client, "4000000000000002")
    r = httpx.post(f"{api.url}/account/cards", json={"payment_method": pm}, headers=h)
    err = assert_api_error(r, 402, "STRIPE_DECLINED")
    assert err["details"] == {"declineCode": "card_declined"}


def test_card_declined_when_charged_is_stripe_declined(api, client) -> None:
    _, h = _account(api)
    pm = _card(client, "4000000000000341")
    assert httpx.post(f"{api.url}/account/cards", json={"payment_method": pm}, headers=h).is_success
    r = httpx.post(f"{api.url}/account/topups", json={"amount_cents": 700}, headers=h, timeout=30)
    err = assert_api_error(r, 402, "STRIPE_DECLINED")
    assert err["details"]["declineCode"] == "card_declined"
    assert _balance(api, h) == 0


def test_card_needing_3ds_is_stripe_3ds_required(api, client) -> None:
    _, h = _account(api)
    pm = _card(client, "4000002500003155")
    assert httpx.post(f"{api.url}/account/cards", json={"payment_method": pm}, headers=h).is_success
    r = httpx.post(f"{api.url}/account/topups", json={"amount_cents": 900}, headers=h, timeout=30)
    err = assert_api_error(r, 402, "STRIPE_3DS_REQUIRED")
    assert err["details"]["paymentIntentId"].startswith("pi_")
    assert _balance(api, h) == 0


def test_top_up_without_saved_card_or_with_unknown_card_is_validation_error(api) -> None:
    _, h = _account(api)
    r = httpx.post(f"{api.url}/account/topups", json={"amount_cents": 500}, headers=h)
    assert assert_api_error(r, 400, "VALIDATION_ERROR")["details"]["field"] == "payment_method"
    r = httpx.post(f"{api.url}/account/cards", json={"payment_method": "pm_nosuch"}, headers=h)
    assert assert_api_error(r, 400, "VALIDATION_ERROR")["details"]["field"] == "payment_method"
    r = httpx.post(f"{api.url}/account/topups", json={"amount_cents": 10}, headers=h)
    assert assert_api_error(r, 400, "VALIDATION_ERROR")["details"]["field"] == "amount_cents"


def test_checkout_session_returns_its_url_and_the_webhook_credits_it(api, localstripe) -> None:
    """Checkout against the minimal session endpoint the test server adds to localstripe."""
    account_id, h = _account(api)
    r = httpx.post(
        f"{api.url}/account/topups/checkout",
        json={"amount_cents": 1500},
        headers={**h, "Idempotency-Key": "cart-7"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    session = r.json()
    assert session["id"].startswith("cs_test_") and session["url"].startswith("http")
    assert session["amount_cents"] == 1500
    assert _balance(api, h) == 0  # nothing until Stripe says it is paid
    pi = f"pi_{uuid.uuid4().hex[:24]}"
    completed = _event(
        "checkout.session.completed",
        {
            "id": session["id"],
            "object": "checkout.session",
            "payment_status": "paid",
            "payment_intent": pi,
            "amount_total": 1500,
            "metadata": {"datorus_account": str(account_id), "datorus_ledger": _ledger_id(api)},
        },
    )
    for _ in range(2):
        r = httpx.post(f"{api.url}/stripe/webhook", content=completed, headers=_signed(completed))
        assert r.status_code == 200
    assert _balance(api, h) == 1500


def test_every_write_to_stripe_carries_an_idempotency_key(api, client, localstripe) -> None:
    _, h = _account(api)
    pm = _card(client, "4242424242424242")
    assert httpx.post(f"{api.url}/account/cards", json={"payment_method": pm}, headers=h)
    assert httpx.post(f"{api.url}/account/topups", json={"amount_cents": 60}, headers=h)
    seen = httpx.get(f"{localstripe}/_config/requests", timeout=30).json()
    # every POST except the test's own card making (what Stripe.js does in a browser)
    ours = [s for s in seen if s["method"] == "POST" and s["path"] != "/v1/payment_methods"]
    assert {s["path"].split("/")[2] for s in ours} >= {"customers", "payment_methods"}
    assert any(s["path"] == "/v1/payment_intents" for s in ours)
    assert all(s["idempotency_key"] for s in ours), ours


# -- webhook deliveries --------------------------------------------------------------------


def test_webhook_delivered_twice_credits_once(api) -> None:
    account_id, h = _account(api)
    payload = _pi_succeeded(api, account_id, 1234)
    first = httpx.post(f"{api.url}/stripe/webhook", content=payload, headers=_signed(payload))
    assert first.status_code == 200 and first.json()["credited"] is True
    for _ in range(3):
        again = httpx.post(f"{api.url}/stripe/webhook", content=payload, headers=_signed(payload))
        assert again.status_code == 200
        assert again.json() == {"received": True, "credited": False, "duplicate": True}
    assert _balance(api, h) == 1234


def test_same_payment_in_a_different_event_credits_once(api) -> None:
    account_id, h = _account(api)
    pi = f"pi_{uuid.uuid4().hex[:24]}"
    session = _event(
        "checkout.session.completed",
        {
            "id": f"cs_{uuid.uuid4().hex}",
            "object": "checkout.session",
            "payment_status": "paid",
            "payment_intent": pi,
            "amount_total": 2500,
            "client_reference_id": str(account_id),
            "metadata": {"datorus_account": str(account_id), "datorus_ledger": _ledger_id(api)},
        },
    )
    r = httpx.post(f"{api.url}/stripe/webhook", content=session, headers=_signed(session))
    assert r.json()["credited"] is True
    succeeded = _pi_succeeded(api, account_id, 2500, pi)
    r = httpx.post(f"{api.url}/stripe/webhook", content=succeeded, headers=_signed(succeeded))
    assert r.status_code == 200 and r.json()["credited"] is False
    assert _balance(api, h) == 2500
    assert len(_events(api, f"stripe:{pi}")) == 2


@pytest.mark.parametrize("how", ["wrong_secret", "tampered_body", "stale", "missing", "garbage"])
def test_webhook_with_bad_signature_is_rejected(api, how: str) -> None:
    account_id, h = _account(api)
    payload = _pi_succeeded(api, account_id, 999)
    headers = {
        "wrong_secret": _signed(payload, "whsec_wrong"),
        "tampered_body": _signed(payload.replace(b"999", b"9999")),
        "stale": _signed(payload, ts=int(time.time()) - 3600),
        "missing": {"Content-Type": "application/json"},
        "garbage": {"Stripe-Signature": "nonsense"},
    }[how]
    r = httpx.post(f"{api.url}/stripe/webhook", content=payload, headers=headers)
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == "Stripe-Signature"
    assert _balance(api, h) == 0


def test_webhook_for_another_ledger_or_event_type_is_acknowledged_not_credited(api) -> None:
    account_id, h = _account(api)
    other = json.loads(_pi_succeeded(api, account_id, 800))
    other["data"]["object"]["metadata"]["datorus_ledger"] = "someoneelse"
    payload = json.dumps(other).encode()
    r = httpx.post(f"{api.url}/stripe/webhook", content=payload, headers=_signed(payload))
    assert r.status_code == 200 and r.json()["credited"] is False
    failed = _event("payment_intent.payment_failed", {"id": "pi_x", "metadata": {}})
    r = httpx.post(f"{api.url}/stripe/webhook", content=failed, headers=_signed(failed))
    assert r.status_code == 200 and r.json()["credited"] is False
    assert _balance(api, h) == 0


def test_paying_lifts_trial_exhausted_at_the_gateway(api, client, origin) -> None:
    """A gateway on the same ledger: no trial (unverified) → 402; a card top-up → 200."""
    gw = Gateway(api.db).start()
    try:
        h = bearer(register(api.url, f"p{time.monotonic_ns()}@example.com")["api_key"]["key"])
        cred = httpx.post(f"{api.url}/account/credentials", headers=h, timeout=30).json()
        gw.wait_for_credential(cred["username"], cred["password"])
        proxies = {"http": gw.proxy(cred["username"], cred["password"])}
        r = requests.get(origin.url("/"), proxies=proxies, timeout=30)
        assert r.status_code == 402 and r.json()["error"]["code"] == "TRIAL_EXHAUSTED"

        pm = _card(client, "4242424242424242")
        assert httpx.post(f"{api.url}/account/cards", json={"payment_method": pm}, headers=h)
        r = httpx.post(f"{api.url}/account/topups", json={"amount_cents": 100}, headers=h)
        assert r.status_code == 201, r.text
        wait_until(
            lambda: requests.get(origin.url("/"), proxies=proxies, timeout=30).ok,
            5,
            0.1,
            "top-up reaching the gateway",
        )
    finally:
        gw.stop()
