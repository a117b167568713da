"""The REST API's accounts part, against the gateway process that serves it.

Sign-up, email verification tokens, API keys, proxy credentials, usage, and the
error envelope on every failure; SMTP delivery against a real aiosmtpd server and
token expiry against a standalone ``datorus api`` sharing the ledger.
"""

from __future__ import annotations

import math
import time

import httpx
import pytest
import requests
from api_helpers import (
    assert_api_error,
    bearer,
    register,
    token_from_ledger,
    token_from_outbox,
)
from support.ledger import cli, ledger_exec, ledger_value
from support.processes import ApiProcess, Gateway, GatewaySetup
from support.waiting import free_port, wait_http, wait_until

from datorus_core.envelope import new_request_id


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    """A gateway serving its REST API on a free port (mail to the outbox)."""
    return GatewaySetup({"trial_bytes": 5_000_000}, api=True)


def _email() -> str:
    return f"u{time.monotonic_ns()}@example.com"


def _verified(gw: Gateway) -> tuple[int, str, str]:
    """A registered and verified account: (id, email, api key)."""
    email = _email()
    body = register(gw.api_url, email)
    r = httpx.post(
        f"{gw.api_url}/auth/verify", json={"token": token_from_ledger(gw.db, email)}, timeout=30
    )
    assert r.status_code == 200, r.text
    return body["user"]["id"], email, body["api_key"]["key"]


# -- the whole path a new user takes ---------------------------------------------------------


def test_signup_verify_key_credential_proxy_usage(gw: Gateway, origin) -> None:
    email = _email()
    body = register(gw.api_url, email, display_name="Alice")
    user, key = body["user"], body["api_key"]
    assert user["email"] == email and user["display_name"] == "Alice"
    assert user["verified"] is False
    assert key["key"].startswith("pp_") and len(key["key"]) == 51
    assert key["prefix"] == key["key"][:8]
    h = bearer(key["key"])

    before = httpx.get(f"{gw.api_url}/account", headers=h, timeout=30).json()
    assert before["verified"] is False and before["trial_remaining_bytes"] == 0

    token = token_from_outbox(gw.db, email)
    # the mail's link points at this API (its port), and works as it is
    (mail,) = cli(gw.db, "outbox", "--to", email)["items"][:1]
    assert f"{gw.api_url}/auth/verify?token={token}" in mail["body"]
    r = httpx.get(f"{gw.api_url}/auth/verify", params={"token": token}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["account"]["verified"] is True
    assert r.json()["account"]["trial_remaining_bytes"] == 5_000_000

    r = httpx.post(f"{gw.api_url}/account/credentials", json={"label": "scraper"}, headers=h)
    assert r.status_code == 201, r.text
    cred = r.json()
    assert cred["label"] == "scraper" and cred["password"]
    gw.wait_for_credential(cred["username"], cred["password"])

    proxies = {"http": gw.proxy(cred["username"], cred["password"])}
    resp = requests.get(origin.url("/bytes/1000"), proxies=proxies, timeout=30)
    assert resp.status_code == 200 and len(resp.content) == 1000

    def used() -> tuple | None:
        sent = time.time()
        u = httpx.get(f"{gw.api_url}/usage", headers=h, timeout=30).json()
        return (u, sent, time.time()) if u["requests"] == 1 else None

    u, sent, received = wait_until(used, 10, 0.1, "usage in GET /usage")
    assert u["account_id"] == user["id"]
    assert 1000 < u["bytes"] < 1000 + 1024  # the body, a request head and a response head
    assert u["trial_remaining_bytes"] == 5_000_000 - u["bytes"]
    assert u["days"][0]["requests"] == 1
    rl = u["rate_limit"]
    assert rl["live"] is True
    (c,) = rl["credentials"]
    assert c["username"] == cred["username"]
    assert c["remaining"] == rl["burst"] - 1 or c["remaining"] == rl["burst"]
    # when the bucket is full again: what is missing from it, at the limiter's rate
    missing, rate = rl["burst"] - c["remaining"], rl["requests_per_second"]
    lo, hi = math.floor(sent + (missing - 1) / rate), math.ceil(received + missing / rate)
    assert lo <= c["reset"] <= hi

    credits = httpx.get(f"{gw.api_url}/account/credits", headers=h, timeout=30).json()
    assert credits["balance"] == 0
    assert credits["recent_transactions"][-1]["tx_type"] == "trial"


def test_health_reports_ledger_and_version(gw: Gateway) -> None:
    r = httpx.get(f"{gw.api_url}/health", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy" and body["ledger"] == "connected"
    assert body["version"] and body["gateway"] is True
    assert r.headers["x-datorus-request-id"]


def test_openapi_document_lists_the_endpoints(gw: Gateway) -> None:
    paths = httpx.get(f"{gw.api_url}/openapi.json", timeout=30).json()["paths"]
    for p in ("/auth/register", "/auth/keys", "/account", "/account/credits", "/usage"):
        assert p in paths


# -- sign-up conflicts ---------------------------------------------------------------------


def test_register_existing_email_is_email_taken(gw: Gateway) -> None:
    email = _email()
    register(gw.api_url, email)
    r = httpx.post(f"{gw.api_url}/auth/register", json={"email": email.upper()}, timeout=30)
    assert_api_error(r, 409, "EMAIL_TAKEN")


def test_register_social_login_email_is_provider_mismatch(gw: Gateway) -> None:
    email = _email()
    gw.cli("account", "create", email, "--provider", "github")
    r = httpx.post(f"{gw.api_url}/auth/register", json={"email": email}, timeout=30)
    err = assert_api_error(r, 409, "EMAIL_PROVIDER_MISMATCH")
    assert err["details"] == {"provider": "github"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({}, "email"),
        ({"email": "a@example.com", "display_name": "x" * 101}, "display_name"),
        ([1, 2], "body"),
    ],
)
def test_register_invalid_body_is_validation_error(gw: Gateway, body, field: str) -> None:
    r = httpx.post(f"{gw.api_url}/auth/register", json=body, timeout=30)
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"]["field"] == field
    assert err["details"]["reason"]


def test_register_malformed_json_is_validation_error(gw: Gateway) -> None:
    r = httpx.post(
        f"{gw.api_url}/auth/register",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    err = assert_api_error(r, 400, "VALIDATION_ERROR")
    assert err["details"] == {"field": "body", "reason": "not valid JSON"}


# -- verification tokens -------------------------------------------------------------------


def test_token_used_twice_is_token_used_and_trial_granted_once(gw: Gateway) -> None:
    email = _email()
    key = register(gw.api_url, email)["api_key"]["key"]
    token = token_from_ledger(gw.db, email)
    assert httpx.post(f"{gw.api_url}/auth/verify", json={"token": token}).status_code == 200
    r = httpx.post(f"{gw.api_url}/auth/verify", json={"token": token}, timeout=30)
    assert_api_error(r, 409, "TOKEN_USED")
    acc = httpx.get(f"{gw.api_url}/account", headers=bearer(key), timeout=30).json()
    assert acc["trial_remaining_bytes"] == 5_000_000


@pytest.mark.parametrize("mangle", ["garbage", "tampered_signature", "tampered_payload", "empty"])
def test_bad_token_is_token_invalid(gw: Gateway, mangle: str) -> None:
    email = _email()
    register(gw.api_url, email)
    token = token_from_ledger(gw.db, email)
    payload, sig = token.split(".")
    bad = {
        "garbage": "not-a-token",
        "tampered_signature": f"{payload}.{sig[:-2]}AA",
        "tampered_payload": f"{payload[:-2]}xy.{sig}",
        "empty": ".",
    }[mangle]
    r = httpx.post(f"{gw.api_url}/auth/verify", json={"token": bad}, timeout=30)
    assert_api_error(r, 400, "TOKEN_INVALID")
    # the real token still works afterwards
    assert httpx.post(f"{gw.api_url}/auth/verify", json={"token": token}).status_code == 200


def test_expired_token_is_token_expired(gw: Gateway) -> None:
    """A standalone ``datorus api`` on the same ledger issuing tokens that expire at once."""
    api = ApiProcess(gw.db, {"email_token_ttl": 0}).start()
    try:
        email = _email()
        register(api.url, email)
        token = token_from_outbox(gw.db, email)
        for url in (api.url, gw.api_url):  # both processes read the same ledger
            r = httpx.post(f"{url}/auth/verify", json={"token": token}, timeout=30)
            err = assert_api_error(r, 410, "TOKEN_EXPIRED")
            assert err["details"]["expiredAt"]
    finally:
        api.stop()


# -- API keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [None, "Bearer pp_" + "a" * 48, "Bearer nope", "Basic dXNlcjpwYXNz", "pp_" + "a" * 48],
)
def test_missing_or_wrong_key_is_401_invalid_credential(gw: Gateway, header) -> None:
    headers = {"Authorization": header} if header else {}
    r = httpx.get(f"{gw.api_url}/account", headers=headers, timeout=30)
    assert_api_error(r, 401, "INVALID_CREDENTIAL")
    assert r.headers["www-authenticate"] == 'Bearer realm="Datorus"'


def test_keys_are_listed_by_prefix_and_revocable(gw: Gateway) -> None:
    _, _, key = _verified(gw)
    h = bearer(key)
    r = httpx.post(f"{gw.api_url}/auth/keys", json={"label": "ci"}, headers=h, timeout=30)
    assert r.status_code == 201, r.text
    second = r.json()
    assert second["key"].startswith("pp_") and second["label"] == "ci"

    listed = httpx.get(f"{gw.api_url}/auth/keys", headers=h, timeout=30).json()
    assert listed["total_count"] == 2 and listed["next_cursor"] is None
    assert [k["label"] for k in listed["items"]] == ["default", "ci"]
    assert all("key" not in k for k in listed["items"])
    assert listed["items"][1]["prefix"] == second["key"][:8]

    page1 = httpx.get(f"{gw.api_url}/auth/keys", params={"limit": 1}, headers=h).json()
    assert len(page1["items"]) == 1 and page1["next_cursor"]
    page2 = httpx.get(
        f"{gw.api_url}/auth/keys", params={"limit": 1, "cursor": page1["next_cursor"]}, headers=h
    ).json()
    assert page2["items"][0]["id"] == second["id"] and page2["next_cursor"] is None

    r = httpx.delete(f"{gw.api_url}/auth/keys/{second['id']}", headers=h, timeout=30)
    assert r.status_code == 200 and r.json() == {"id": second["id"], "revoked": True}
    r = httpx.get(f"{gw.api_url}/account", headers=bearer(second["key"]), timeout=30)
    assert_api_error(r, 401, "INVALID_CREDENTIAL")
    assert httpx.get(f"{gw.api_url}/account", headers=h, timeout=30).status_code == 200


@pytest.mark.parametrize("key_id", ["999999", "abc", "-1"])
def test_revoke_unknown_key_is_resource_not_found(gw: Gateway, key_id: str) -> None:
    _, _, key = _verified(gw)
    r = httpx.delete(f"{gw.api_url}/auth/keys/{key_id}", headers=bearer(key), timeout=30)
    assert_api_error(r, 404, "RESOURCE_NOT_FOUND")


def test_another_accounts_key_id_is_not_found(gw: Gateway) -> None:
    _, _, key_a = _verified(gw)
    _, _, key_b = _verified(gw)
    a_keys = httpx.get(f"{gw.api_url}/auth/keys", headers=bearer(key_a)).json()["items"]
    r = httpx.delete(f"{gw.api_url}/auth/keys/{a_keys[0]['id']}", headers=bearer(key_b))
    assert_api_error(r, 404, "RESOURCE_NOT_FOUND")
    assert httpx.get(f"{gw.api_url}/account", headers=bearer(key_a)).status_code == 200


# -- credentials and views -----------------------------------------------------------------


def test_credential_revoked_through_api_is_refused_by_gateway(gw: Gateway, origin) -> None:
    _, _, key = _verified(gw)
    h = bearer(key)
    cred = httpx.post(f"{gw.api_url}/account/credentials", headers=h, timeout=30).json()
    gw.wait_for_credential(cred["username"], cred["password"])
    listed = httpx.get(f"{gw.api_url}/account/credentials", headers=h).json()
    assert listed["total_count"] == 1 and listed["items"][0]["revoked"] is False
    assert "password" not in listed["items"][0]

    r = httpx.delete(f"{gw.api_url}/account/credentials/{cred['id']}", headers=h, timeout=30)
    assert r.status_code == 200 and r.json()["revoked"] is True
    proxies = {"http": gw.proxy(cred["username"], cred["password"])}

    def refused() -> bool:
        return requests.get(origin.url("/"), proxies=proxies, timeout=30).status_code == 407

    wait_until(refused, 5, 0.1, "revoked credential refused")
    r = httpx.delete(f"{gw.api_url}/account/credentials/nosuchuser", headers=h, timeout=30)
    assert_api_error(r, 404, "RESOURCE_NOT_FOUND")


def test_unverified_account_has_no_trial_at_the_gateway(gw: Gateway, origin) -> None:
    body = register(gw.api_url, _email())
    h = bearer(body["api_key"]["key"])
    cred = httpx.post(f"{gw.api_url}/account/credentials", headers=h, timeout=30).json()
    gw.wait_for_credential(cred["username"], cred["password"])
    proxies = {"http": gw.proxy(cred["username"], cred["password"])}
    r = requests.get(origin.url("/"), proxies=proxies, timeout=30)
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "TRIAL_EXHAUSTED"


def test_credential_of_suspended_account_is_refused(gw: Gateway) -> None:
    account_id, _, key = _verified(gw)
    gw.cli("account", "suspend", str(account_id))
    r = httpx.post(f"{gw.api_url}/account/credentials", headers=bearer(key), timeout=30)
    assert_api_error(r, 403, "ACCOUNT_SUSPENDED")
    assert httpx.get(f"{gw.api_url}/account", headers=bearer(key)).json()["status"] == "suspended"


def test_credits_show_operator_top_up_in_cents(gw: Gateway) -> None:
    account_id, _, key = _verified(gw)
    gw.cli("balance", "add", str(account_id), "250", "--reason", "welcome credit")
    c = httpx.get(f"{gw.api_url}/account/credits", headers=bearer(key), timeout=30).json()
    assert c["balance"] == 250
    top = c["recent_transactions"][0]
    assert top["amount"] == 250 and top["tx_type"] == "purchase"
    assert top["description"] == "welcome credit"


def test_credits_keep_top_ups_and_lease_charges_in_view_of_many_usage_flushes(
    make_gateway, origin
) -> None:
    """Usage flushed in many small rows is rolled up per day: the money stays on page one."""
    g = make_gateway(api_port=free_port(), flush_ms=20)
    wait_http(g.api_url + "/health", proc=g.proc)
    for source in ("127.0.0.2", "127.0.0.3"):  # two ways out, so one can be leased
        g.cli("egress", "add", f"direct://{source}")
    account_id, user, password = g.customer(trial_bytes=0)
    key = g.cli("key", "create", str(account_id))["key"]
    g.cli("balance", "add", str(account_id), "500", "--reason", "first top-up")

    def checked() -> bool:  # only an egress whose checks passed can be leased
        return ledger_value(g.db, "SELECT COUNT(*) FROM egress WHERE status = 'active'") == 2

    wait_until(checked, 10, 0.05, "both egress active")
    r = httpx.post(f"{g.api_url}/proxies/acquire", json={}, headers=bearer(key), timeout=30)
    assert r.status_code == 200, r.text

    def usage_rows() -> int:
        return ledger_value(
            g.db,
            "SELECT COUNT(*) FROM transactions WHERE account_id = ? AND kind = 'usage'",
            (account_id,),
        )

    proxies = {"http": g.proxy(user, password)}

    def served() -> bool:
        return requests.get(origin.url("/"), proxies=proxies, timeout=30).status_code == 200

    for n in range(1, 31):  # 30 requests, each flushed on its own: 30 usage rows
        if n == 1:  # the top-up is live within a refresh; the 402s before it are not billed
            wait_until(served, 10, 0.05, "the top-up live")
        else:
            assert served()
        wait_until(lambda n=n: usage_rows() == n, 5, 0.01, "the usage flush")
    c = httpx.get(f"{g.api_url}/account/credits", headers=bearer(key), timeout=30).json()
    rows = c["recent_transactions"]
    assert [t["tx_type"] for t in rows] == ["usage", "acquire", "purchase"] or [
        t["tx_type"] for t in rows
    ] == ["usage", "usage", "acquire", "purchase"]  # a run across midnight: two days
    usage = [t for t in rows if t["tx_type"] == "usage"]
    assert sum(t["requests"] for t in usage) == sum(t["transactions"] for t in usage) == 30
    assert usage[0]["amount_nanocents"] < 0 and usage[0]["description"].startswith("Proxy usage")
    assert (rows[-2]["amount"], rows[-1]["amount"]) == (-1, 500)
    # the rows add up to the balance, in cents and exactly
    assert sum(t["amount"] for t in rows) == c["balance"] == 499 + sum(t["amount"] for t in usage)
    assert sum(t["amount_nanocents"] for t in rows) == c["balance_nanocents"]
    acc = httpx.get(f"{g.api_url}/account", headers=bearer(key), timeout=30).json()
    assert (acc["balance_cents"], acc["balance_nanocents"]) == (
        c["balance"],
        c["balance_nanocents"],
    )
    # the ledger keeps every flush as it was written
    assert usage_rows() == 30


def test_leases_are_empty(gw: Gateway) -> None:
    _, _, key = _verified(gw)
    r = httpx.get(f"{gw.api_url}/account/leases", headers=bearer(key), timeout=30)
    assert r.json() == {"items": [], "next_cursor": None, "total_count": 0}
    r = httpx.get(f"{gw.api_url}/account/leases?cursor=%%%", headers=bearer(key), timeout=30)
    assert assert_api_error(r, 400, "VALIDATION_ERROR")["details"]["field"] == "cursor"


def test_unknown_route_and_method_are_enveloped(gw: Gateway) -> None:
    assert_api_error(httpx.get(f"{gw.api_url}/nope", timeout=30), 404, "RESOURCE_NOT_FOUND")
    r = httpx.put(f"{gw.api_url}/health", timeout=30)
    err = assert_api_error(r, 404, "RESOURCE_NOT_FOUND")
    assert err["details"]["allowed"] == ["GET"]
    assert r.headers["allow"] == "GET"


def test_topup_without_stripe_configured_is_service_unavailable(gw: Gateway) -> None:
    _, _, key = _verified(gw)
    r = httpx.post(
        f"{gw.api_url}/account/topups", json={"amount_cents": 500}, headers=bearer(key), timeout=30
    )
    assert_api_error(r, 503, "SERVICE_UNAVAILABLE")
    assert r.headers["retry-after"]


# -- mail over SMTP ------------------------------------------------------------------------


def test_verification_mail_goes_over_smtp(gw: Gateway, smtp_server) -> None:
    api = ApiProcess(
        gw.db, {"smtp_host": "127.0.0.1", "smtp_port": smtp_server.port, "mail_from": "a@dt.test"}
    ).start()
    try:
        email = _email()
        register(api.url, email)
        msg = wait_until(
            lambda: next((m for m in smtp_server.messages if email in m["to"]), None),
            10,
            0.05,
            "mail delivered",
        )
        assert msg["from"] == "a@dt.test"
        assert "Subject: Verify your Datorus account" in msg["data"]
        token = token_from_outbox(gw.db, email)
        assert token in msg["data"].replace("=\r\n", "").replace("=\n", "")
        sent = gw.cli("outbox", "--to", email)["items"][0]
        assert sent["sentAt"] and sent["error"] is None
        r = httpx.post(f"{api.url}/auth/verify", json={"token": token}, timeout=30)
        assert r.status_code == 200
    finally:
        api.stop()


def test_operator_made_account_gets_a_key_from_the_cli(gw: Gateway) -> None:
    acc = gw.cli("account", "create", _email(), "--trial-bytes", "777")
    key = gw.cli("key", "create", str(acc["id"]), "--label", "ops")
    assert key["key"].startswith("pp_") and key["label"] == "ops"
    r = httpx.get(f"{gw.api_url}/account", headers=bearer(key["key"]), timeout=30)
    assert r.status_code == 200 and r.json()["trial_remaining_bytes"] == 777
    assert gw.cli("key", "list", str(acc["id"]))["items"][0]["prefix"] == key["prefix"]
    assert gw.cli("key", "revoke", str(key["id"]))["revoked"] is True
    r = httpx.get(f"{gw.api_url}/account", headers=bearer(key["key"]), timeout=30)
    assert_api_error(r, 401, "INVALID_CREDENTIAL")


def test_resend_mails_a_fresh_token(gw: Gateway) -> None:
    email = _email()
    h = bearer(register(gw.api_url, email)["api_key"]["key"])
    first = token_from_ledger(gw.db, email)
    r = httpx.post(f"{gw.api_url}/auth/verify/resend", headers=h, timeout=30)
    assert r.status_code == 202 and r.json() == {"sent": True, "verified": False}
    second = token_from_ledger(gw.db, email)
    assert second != first
    assert httpx.post(f"{gw.api_url}/auth/verify", json={"token": second}).status_code == 200
    r = httpx.post(f"{gw.api_url}/auth/verify", json={"token": first}, timeout=30)
    assert r.status_code == 200  # the earlier token was still unused: idempotent grant
    acc = httpx.get(f"{gw.api_url}/account", headers=h, timeout=30).json()
    assert acc["trial_remaining_bytes"] == 5_000_000
    r = httpx.post(f"{gw.api_url}/auth/verify/resend", headers=h, timeout=30)
    assert r.json() == {"sent": False, "verified": True}


def test_an_operator_made_account_cannot_mint_a_trial_through_verification(gw: Gateway) -> None:
    """The operator vouches for the accounts it makes: they are created verified, so a
    customer's resend sends nothing and no verification can add trial bytes, whether the
    operator gave a trial or none."""
    for trial in ("0", "1000"):
        email = _email()
        acc = gw.cli("account", "create", email, "--trial-bytes", trial)
        h = bearer(gw.cli("key", "create", str(acc["id"]))["key"])
        r = httpx.post(f"{gw.api_url}/auth/verify/resend", headers=h, timeout=30)
        assert r.status_code == 202 and r.json() == {"sent": False, "verified": True}
        assert gw.cli("outbox", "--to", email)["items"] == []
        me = httpx.get(f"{gw.api_url}/account", headers=h, timeout=30).json()
        assert me["trial_remaining_bytes"] == int(trial)
        kinds = [t["kind"] for t in gw.cli("balance", "history", str(acc["id"]))["items"]]
        assert kinds.count("trial_grant") == (1 if trial != "0" else 0)


@pytest.mark.parametrize("text", ["a\r\nInjected: 1", "x\x1b[2J", "nul\x00", "tab\tbed", "c1\x9b"])
def test_free_text_with_control_characters_is_refused_everywhere(gw: Gateway, text: str) -> None:
    """Labels and names a customer types end up in the operator's tables and terminal:
    any control character is a 400 naming the field, and nothing is stored."""
    account_id, _, key = _verified(gw)
    h = bearer(key)
    before = len(gw.cli("credential", "list", str(account_id))["items"])
    for path, body, field in (
        ("/account/credentials", {"label": text}, "label"),
        ("/auth/keys", {"label": text}, "label"),
    ):
        r = httpx.post(f"{gw.api_url}{path}", json=body, headers=h, timeout=30)
        err = assert_api_error(r, 400, "VALIDATION_ERROR")
        assert err["details"]["field"] == field, err
    r = httpx.post(
        f"{gw.api_url}/auth/register", json={"email": _email(), "display_name": text}, timeout=30
    )
    assert assert_api_error(r, 400, "VALIDATION_ERROR")["details"]["field"] == "display_name"
    assert len(gw.cli("credential", "list", str(account_id))["items"]) == before
    cli_args = (
        ()
        if "\x00" in text
        else (  # no NUL can reach a command line
            ("credential", "create", str(account_id), "--label", text),
            ("key", "create", str(account_id), "--label", text),
            ("balance", "add", str(account_id), "5", "--reason", text),
        )
    )
    for args in cli_args:
        err = gw.cli(*args, check=False)["error"]
        assert err["code"] == "VALIDATION_ERROR" and err["details"]["field"] in ("label", "reason")
    assert len(gw.cli("credential", "list", str(account_id))["items"]) == before


# -- receipts, usage by destination, blocks (what the web console shows) ------------------


def test_receipts_and_usage_by_domain_show_the_accounts_requests(gw: Gateway, origin) -> None:
    account_id, _, key = _verified(gw)
    h = bearer(key)
    r = httpx.post(f"{gw.api_url}/account/credentials", json={}, headers=h, timeout=30)
    cred = r.json()
    gw.wait_for_credential(cred["username"], cred["password"])
    proxies = {"http": gw.proxy(cred["username"], cred["password"])}
    resp = requests.get(origin.url("/bytes/700"), proxies=proxies, timeout=30)
    assert resp.status_code == 200
    rid = resp.headers["X-Datorus-Request-Id"]

    def receipts() -> list | None:
        items = httpx.get(f"{gw.api_url}/account/receipts", headers=h, timeout=30).json()["items"]
        return items if any(i["request_id"] == rid for i in items) else None

    items = wait_until(receipts, 10, 0.1, "the receipt in GET /account/receipts")
    mine = next(i for i in items if i["request_id"] == rid)
    assert mine["host"] == "127.0.0.1" and mine["status"] == 200 and mine["method"] == "GET"
    assert mine["bytes_down"] > 700 and mine["trial_bytes"] == mine["bytes_up"] + mine["bytes_down"]
    assert [i["request_id"] for i in items] == sorted(
        (i["request_id"] for i in items), reverse=True
    )

    by = httpx.get(f"{gw.api_url}/usage/domains", headers=h, timeout=30).json()
    assert by["days"] == 30
    (local,) = [d for d in by["items"] if d["domain"] == "127.0.0.1"]
    assert local["requests"] == len(items) and local["bytes"] >= mine["bytes_up"] + 700
    # the CLI lists the same receipts
    listed = gw.cli("receipts", str(account_id))["items"]
    assert [i["requestId"] for i in listed] == [i["request_id"] for i in items]
    # two hosts of one registrable domain (receipts as the gateway writes them: loopback
    # has no names to resolve) are one row, with their sums
    for host, down, nc in (
        ("www.shop.example.co.uk", 5_000_000, 700),
        ("IMG.example.co.uk.", 3, 11),
    ):
        ledger_exec(
            gw.db,
            "INSERT INTO receipts (request_id, account_id, credential_id, method, host, port,"
            " status, bytes_up, bytes_down, trial_bytes, nanocents, started_at, finished_at)"
            " VALUES (?, ?, ?, 'CONNECT', ?, 443, 200, 100, ?, 0, ?, 0, 0)",
            (new_request_id(), account_id, cred["id"], host, down, nc),
        )
    by = httpx.get(f"{gw.api_url}/usage?by=domain", headers=h, timeout=30).json()
    assert by["by"] == "domain" and by["days"] == 30
    top = by["items"][0]
    assert (top["domain"], top["hosts"], top["requests"]) == ("example.co.uk", 2, 2)
    assert (top["bytes_up"], top["bytes_down"], top["charged_nanocents"]) == (200, 5_000_003, 711)
    assert [d["domain"] for d in by["items"]][1:] == ["127.0.0.1"]
    assert (
        httpx.get(f"{gw.api_url}/usage/domains", headers=h, timeout=30).json()["items"]
        == (by["items"])
    )
    # the CLI shows the same
    shown = gw.cli("usage", str(account_id), "--by", "domain")["items"]
    assert [(d["domain"], d["hosts"], d["bytes"]) for d in shown] == [
        (d["domain"], d["hosts"], d["bytes"]) for d in by["items"]
    ]


def test_receipts_usage_by_domain_and_blocks_refuse_bad_input_and_the_wrong_key(
    gw: Gateway,
) -> None:
    _, _, key = _verified(gw)
    h = bearer(key)
    for path, field in (
        ("/account/receipts?limit=0", "limit"),
        ("/usage/domains?days=0", "days"),
        ("/usage/domains?limit=201", "limit"),
        ("/usage?by=host", "by"),
        ("/usage?by=domain&days=367", "days"),
    ):
        r = httpx.get(f"{gw.api_url}{path}", headers=h, timeout=30)
        assert assert_api_error(r, 400, "VALIDATION_ERROR")["details"]["field"] == field, path
    for path in ("/account/receipts", "/usage/domains", "/network/blocks"):
        r = httpx.get(f"{gw.api_url}{path}", timeout=30)
        assert_api_error(r, 401, "INVALID_CREDENTIAL")
        assert r.headers["www-authenticate"].startswith("Bearer")
    # blocks are the operator's: a customer's key finds no such route
    assert_api_error(
        httpx.get(f"{gw.api_url}/network/blocks", headers=h, timeout=30), 404, "RESOURCE_NOT_FOUND"
    )
    op = gw.cli("key", "create", "--operator")["key"]
    r = httpx.get(f"{gw.api_url}/network/blocks", headers=bearer(op), timeout=30)
    assert r.status_code == 200 and r.json() == {"live": True, "items": [], "total": 0}
