"""The web console at /console (CONTRACT.md section 8), in a real browser.

Debian's chromium (``/usr/bin/chromium``; ``scripts/test`` installs it), driven by
Playwright's Python package, never a browser build Playwright would download. One
gateway serves the API (mail over SMTP to aiosmtpd, Stripe at localstripe) and one
browser serves the module; each test has its own browser context (its own cookies).
A screenshot of every view is saved under the test run's temporary directory
(``console-shots``) for review.
"""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from email import policy
from pathlib import Path

import httpx
import pytest
from support.ledger import cli, ledger_rows
from support.processes import Gateway, GatewaySetup, start_gateway
from support.waiting import wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SECRET = "whsec_datorus_console"
LINK_RE = re.compile(r"(http://\S+/console/signin\?token=\S+)")
RETURN_RE = re.compile(r".*/console\?topup=success&session_id=(cs_test_[0-9a-f]+)$")

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="chromium is not installed (scripts/test installs it)"
)


@pytest.fixture(scope="module")
def gw_setup(smtp_server, localstripe: str) -> GatewaySetup:
    return GatewaySetup(
        {
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp_server.port,
            "mail_from": "console@dt.test",
            "stripe_api_key": "sk_test_datorus",
            "stripe_api_base": localstripe,
            "stripe_webhook_secret": SECRET,
            "trial_bytes": 1_000_000,
        },
        api=True,
    )


@pytest.fixture(scope="module")
def api(gw: Gateway, localstripe: str) -> str:
    """The gateway's API, with localstripe delivering its webhooks to it."""
    r = httpx.post(
        f"{localstripe}/_config/webhooks/console-{gw.port}",
        data={"url": f"{gw.api_url}/stripe/webhook", "secret": SECRET},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return gw.api_url


@pytest.fixture(scope="module")
def nohook(localstripe: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with Stripe but no webhook secret, as in the README's local recipe."""
    setup = GatewaySetup(
        {"stripe_api_key": "sk_test_datorus", "stripe_api_base": localstripe}, api=True
    )
    g = start_gateway(tmp_path_factory.mktemp("gw-nohook"), setup)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(20_000)
    p = context.new_page()
    # the CSP forbids inline code: a violation (or any script error) shows up here
    p.errors = []  # type: ignore[attr-defined]
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    p.on("console", lambda m: "Content Security Policy" in m.text and p.errors.append(m.text))
    yield p
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-shots")


def _email() -> str:
    return f"web{time.monotonic_ns()}@example.com"


def _mailed_link(smtp_server, to: str) -> str:
    def find() -> str | None:
        for m in smtp_server.messages:
            if to in m["to"]:
                body = email.message_from_string(m["data"], policy=policy.default)
                text = body.get_body().get_content()  # type: ignore[union-attr]
                found = LINK_RE.search(text)
                return found.group(1) if found else None
        return None

    return wait_until(find, 15, 0.05, f"the sign-in mail to {to}")


def _sign_in_by_key(page, api: str, key: str) -> None:
    page.goto(f"{api}/console")
    page.fill("#key", key)
    with page.expect_navigation():
        page.click("#key-form button")
    assert page.url == f"{api}/console", page.content()


def _curl(gw: Gateway, user: str, password: str, url: str) -> int:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20"]
        + ["-x", gw.proxy(user, password), url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(out.stdout or 0)


def _credits(db, account_id: int) -> list[tuple]:
    """The account's Stripe credits in the ledger: (external id, nanocents)."""
    return ledger_rows(
        db,
        "SELECT external_id, nanocents FROM transactions"
        " WHERE account_id = ? AND external_id LIKE 'stripe:%'",
        (account_id,),
    )


def _pay(page, amount: str) -> str:
    """Top up *amount* dollars from the console through (fake) Checkout; the session id."""
    page.fill("#amount", amount)
    with page.expect_navigation():
        page.click("#topup-form button")
    assert "/checkout/cs_test_" in page.url
    with page.expect_navigation(url=RETURN_RE):
        page.click("#pay")
    found = RETURN_RE.match(page.url)
    assert found is not None
    return found.group(1)


def _no_horizontal_overflow(page) -> None:
    widths = page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert widths[0] <= widths[1], f"the page is {widths[0]} px wide in a {widths[1]} px view"


# -- the customer --------------------------------------------------------------------------


def test_customer_signs_in_by_mailed_link_makes_uses_and_revokes_a_credential_and_tops_up(
    gw: Gateway, api: str, page, smtp_server, origin, shots: Path
) -> None:
    who = _email()
    acc = gw.cli("account", "create", who, "--trial-bytes", "0")
    gw.cli("balance", "add", str(acc["id"]), "1234")

    first = page.goto(f"{api}/console")
    csp = first.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    assert first.headers["x-frame-options"] == "DENY"
    page.screenshot(path=shots / "01-sign-in.png", full_page=True)
    page.fill("#email", who)
    with page.expect_navigation():
        page.click("#mail-form button")
    assert who in page.inner_text("#sent")
    page.screenshot(path=shots / "01b-mail-sent.png", full_page=True)

    link = _mailed_link(smtp_server, who)
    page.goto(link)
    with page.expect_navigation():
        page.click("#link-form button")
    assert page.url == f"{api}/console"
    cookie = next(c for c in page.context.cookies() if c["name"] == "datorus_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert page.inner_text("#balance") == "$12.34"  # what the CLI set
    # the link works once
    page2 = page.context.new_page()
    page2.goto(link)
    with page2.expect_navigation():
        page2.click("#link-form button")
    assert page2.inner_text("#error-code") == "TOKEN_USED"
    page2.close()

    # a credential with a hostile label: shown as text, never run
    hostile = '<img src=x id=pwned onerror="document.title=1">'
    page.fill("#label", hostile)
    page.fill("#max_bytes", "50000000")
    with page.expect_navigation():
        page.click("#credential-form button")
    user = page.inner_text("#shown-username")
    password = page.inner_text("#shown-password")
    assert len(password) >= 16
    page.screenshot(path=shots / "02-credential-created.png", full_page=True)
    assert page.locator("#pwned").count() == 0
    assert hostile in page.inner_text("#credentials")

    gw.wait_for_credential(user, password)
    assert _curl(gw, user, password, origin.url("/console-test")) == 200

    # the request shows in receipts and by domain once the gateway flushed it (1 s)
    def listed() -> bool:
        page.goto(f"{api}/console")
        return "127.0.0.1" in page.inner_text("#receipts")

    wait_until(listed, 15, 0.5, "the request in the receipts")
    assert "127.0.0.1" in page.inner_text("#domains")
    assert page.locator("#shown-password").count() == 0  # the password was shown once
    assert page.inner_text("#balance") != "$12.34"  # the request was paid for
    page.screenshot(path=shots / "03-customer.png", full_page=True)

    row = page.locator("#credentials tr", has_text=user)
    page.once("dialog", lambda d: d.accept())
    with page.expect_navigation():
        row.locator("button", has_text="Revoke").click()
    assert "revoked" in page.locator("#credentials tr", has_text=user).inner_text()
    wait_until(
        lambda: _curl(gw, user, password, origin.url("/")) == 407, 5, 0.1, "the credential refused"
    )

    # top up through Stripe Checkout (localstripe's page), back to the console
    before = page.inner_text("#balance")
    page.fill("#amount", "15")
    with page.expect_navigation():
        page.click("#topup-form button")
    assert "/checkout/cs_test_" in page.url
    page.screenshot(path=shots / "03b-stripe-checkout.png", full_page=True)
    with page.expect_navigation(url=RETURN_RE):
        page.click("#pay")
    assert "top-up of $15.00 is paid and credited" in page.inner_text("#notice")
    page.screenshot(path=shots / "03c-topped-up.png", full_page=True)
    balance = float(page.inner_text("#balance").lstrip("$"))
    assert balance == pytest.approx(float(before.lstrip("$")) + 15, abs=0.01)
    assert page.errors == []  # no CSP violation, no script error


def test_checkout_without_a_webhook_secret_is_credited_when_the_payer_comes_back(
    nohook: Gateway, page, shots: Path
) -> None:
    api = nohook.api_url
    acc = nohook.cli("account", "create", _email())
    key = nohook.cli("key", "create", str(acc["id"]))["key"]
    r = httpx.post(f"{api}/stripe/webhook", content=b"{}", timeout=30)
    assert r.status_code == 503  # no webhook will ever credit this Datorus
    _sign_in_by_key(page, api, key)
    assert page.inner_text("#balance") == "$0.00"
    _pay(page, "7")
    assert "top-up of $7.00 is paid and credited" in page.inner_text("#notice")
    assert page.inner_text("#balance") == "$7.00"
    assert "Top-up" in page.inner_text("#payments") and "$7.00" in page.inner_text("#payments")
    page.screenshot(path=shots / "03d-credited-on-return.png", full_page=True)
    page.reload()  # the return page again: Stripe is asked again, nothing credited twice
    assert page.inner_text("#balance") == "$7.00"
    assert [n for _, n in _credits(nohook.db, acc["id"])] == [700 * 10**9]
    assert page.errors == []


def test_api_checkout_is_credited_when_the_payer_returns_signed_out(
    nohook: Gateway, localstripe: str
) -> None:
    """The API's Checkout returns the payer to the console: credited even without a
    console session (the account is the one that opened the session, as Stripe says)."""
    api = nohook.api_url
    acc = nohook.cli("account", "create", _email())
    h = {"Authorization": f"Bearer {nohook.cli('key', 'create', str(acc['id']))['key']}"}
    r = httpx.post(f"{api}/account/topups/checkout", json={"amount_cents": 250}, headers=h)
    assert r.status_code == 201, r.text
    paid = httpx.post(f"{localstripe}/checkout/{r.json()['id']}/pay", timeout=30)
    back = paid.headers["location"]
    assert back == f"{api}/console?topup=success&session_id={r.json()['id']}"
    assert httpx.get(f"{api}/account/credits", headers=h, timeout=30).json()["balance"] == 0
    page = httpx.get(back, timeout=30)  # a browser without the console's cookie
    assert page.status_code == 200 and "$2.50 is paid and credited" in page.text
    for _ in range(2):
        assert httpx.get(back, timeout=30).status_code == 200
    assert httpx.get(f"{api}/account/credits", headers=h, timeout=30).json()["balance"] == 250
    # a session id Stripe does not know, or not an id at all: nothing credited, no error
    for sid in ("cs_test_nosuch", "x' OR 1=1"):
        r = httpx.get(f"{api}/console", params={"topup": "success", "session_id": sid})
        assert r.status_code == 200 and "credited" not in r.text


def test_checkout_is_credited_once_whether_the_webhook_or_the_return_comes_first(
    gw: Gateway, api: str, localstripe: str, page
) -> None:
    acc = gw.cli("account", "create", _email())
    key = gw.cli("key", "create", str(acc["id"]))["key"]
    _sign_in_by_key(page, api, key)
    # the return first, the webhook later
    httpx.post(f"{localstripe}/_config/hold", timeout=30).raise_for_status()
    try:
        late = _pay(page, "9")
        assert page.inner_text("#balance") == "$9.00"
    finally:
        released = httpx.post(f"{localstripe}/_config/release", timeout=30).json()
    assert released["delivered"] == 1
    # the webhook arrived (its event is recorded) and credited nothing more
    assert (
        len(ledger_rows(gw.db, "SELECT id FROM stripe_events WHERE account_id = ?", (acc["id"],)))
        == 1
    )
    # the webhook first (delivered before the payer is sent back), then the return
    first = _pay(page, "4")
    assert "top-up of $4.00 is paid and credited" in page.inner_text("#notice")
    assert page.inner_text("#balance") == "$13.00"
    # the API's own confirmation, many at once: nothing more
    h = {"Authorization": f"Bearer {key}"}
    for sid in (late, first):
        r = httpx.get(f"{api}/account/topups/checkout/{sid}", headers=h, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["paid"] is True and r.json()["credited"] is False
    assert sorted(n for _, n in _credits(gw.db, acc["id"])) == [400 * 10**9, 900 * 10**9]
    # another account's session: as if it did not exist, in the API and on the page
    other = gw.cli("account", "create", _email())
    other_key = gw.cli("key", "create", str(other["id"]))["key"]
    r = httpx.get(
        f"{api}/account/topups/checkout/{late}",
        headers={"Authorization": f"Bearer {other_key}"},
        timeout=30,
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "RESOURCE_NOT_FOUND"
    assert page.errors == []


def test_api_checkout_confirmed_concurrently_is_credited_once(
    gw: Gateway, api: str, localstripe: str
) -> None:
    """Paid with the webhook held back: eight confirmations and the webhook at once."""
    import concurrent.futures

    acc = gw.cli("account", "create", _email())
    h = {"Authorization": f"Bearer {gw.cli('key', 'create', str(acc['id']))['key']}"}
    r = httpx.post(f"{api}/account/topups/checkout", json={"amount_cents": 1100}, headers=h)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    httpx.post(f"{localstripe}/_config/hold", timeout=30).raise_for_status()
    try:
        paid = httpx.post(f"{localstripe}/checkout/{sid}/pay", timeout=30)
        assert paid.status_code == 303
        # the API's default return URL is the console's, with the session's id
        assert paid.headers["location"].endswith(f"/console?topup=success&session_id={sid}")
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            confirms = [
                pool.submit(
                    httpx.get, f"{api}/account/topups/checkout/{sid}", headers=h, timeout=30
                )
                for _ in range(8)
            ]
            hook = pool.submit(httpx.post, f"{localstripe}/_config/release", timeout=30)
            answers = [f.result() for f in confirms]
            assert hook.result().json()["delivered"] == 1
    finally:
        httpx.post(f"{localstripe}/_config/release", timeout=30)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert sum(a.json()["credited"] for a in answers) <= 1
    assert [n for _, n in _credits(gw.db, acc["id"])] == [1100 * 10**9]
    r = httpx.get(f"{api}/account/credits", headers=h, timeout=30)
    assert r.json()["balance"] == 1100


def test_without_a_stripe_key_top_ups_are_not_offered(
    tmp_path_factory: pytest.TempPathFactory, page
) -> None:
    g = start_gateway(tmp_path_factory.mktemp("gw-nostripe"), GatewaySetup({}, api=True))
    try:
        acc = g.cli("account", "create", _email())
        _sign_in_by_key(page, g.api_url, g.cli("key", "create", str(acc["id"]))["key"])
        assert "Top-ups are not available" in page.inner_text("#topup-off")
        assert page.locator("#topup-form button").is_disabled()
        token = page.get_attribute("#topup-form input[name=csrf]", "value")
        r = page.request.post(f"{g.api_url}/console/topup", form={"csrf": token, "amount": "5"})
        assert r.status == 503 and "Top-ups are not available" in r.text()
        assert "/checkout/" not in r.url
    finally:
        g.stop()


def test_topup_amounts_out_of_range_are_refused_in_dollars(gw: Gateway, api: str, page) -> None:
    acc = gw.cli("account", "create", _email())
    _sign_in_by_key(page, api, gw.cli("key", "create", str(acc["id"]))["key"])
    token = page.get_attribute("#topup-form input[name=csrf]", "value")
    for amount, says in (
        ("0", "at least $0.50"),
        ("-5", "at least $0.50"),
        ("0.49", "at least $0.50"),
        ("1000000", "at most $10,000.00"),
        ("10000.01", "at most $10,000.00"),
    ):
        r = page.request.post(f"{api}/console/topup", form={"csrf": token, "amount": amount})
        assert r.status == 400, (amount, r.status)
        assert says in r.text(), (amount, r.text())
        assert "cents" not in r.text() and "greater than" not in r.text()


def test_forms_without_their_token_are_refused_and_customers_reach_only_their_own(
    gw: Gateway, api: str, page, shots: Path
) -> None:
    acc = gw.cli("account", "create", _email())
    key = gw.cli("key", "create", str(acc["id"]))["key"]
    other = gw.cli("account", "create", _email())
    theirs = gw.cli("credential", "create", str(other["id"]))
    _sign_in_by_key(page, api, key)

    # the form's token removed: refused, nothing made
    page.evaluate("() => document.querySelector('#credential-form input[name=csrf]').remove()")
    with page.expect_navigation():
        page.click("#credential-form button")
    assert page.inner_text("#error-status") == "400"
    assert page.inner_text("#error-code") == "VALIDATION_ERROR"
    assert "csrf" in page.inner_text("#error")
    page.screenshot(path=shots / "04-csrf-refused.png", full_page=True)
    assert cli(gw.db, "credential", "list", str(acc["id"]))["items"] == []

    # without the cookie (another site's form): the same refusal, as a page
    r = httpx.post(f"{api}/console/credentials", data={"label": "x"}, timeout=30)
    assert r.status_code == 400 and "VALIDATION_ERROR" in r.text
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["x-datorus-request-id"] in r.text

    page.goto(f"{api}/console")
    token = page.get_attribute("#credential-form input[name=csrf]", "value")
    # another account's credential, and any operator page: as if they did not exist
    for path in (
        f"/console/credentials/{theirs['id']}/revoke",
        f"/console/credentials/{theirs['username']}/revoke",
        f"/console/ops/accounts/{other['id']}/suspend",
        f"/console/ops/accounts/{acc['id']}/topup",
    ):
        r = page.request.post(f"{api}{path}", form={"csrf": token, "amount": "5"})
        assert r.status == 404, (path, r.status)
        assert "RESOURCE_NOT_FOUND" in r.text()
    assert cli(gw.db, "account", "show", str(other["id"]))["status"] == "active"
    assert not cli(gw.db, "credential", "list", str(other["id"]))["items"][0]["revoked"]


# -- the operator --------------------------------------------------------------------------


def test_operator_suspends_an_account_and_its_next_request_gets_403(
    gw: Gateway, api: str, page, origin, shots: Path
) -> None:
    account_id, user, password = gw.customer(trial_bytes=10**9)
    who = cli(gw.db, "account", "show", str(account_id))["email"]
    assert _curl(gw, user, password, origin.url("/")) == 200
    op_key = gw.cli("key", "create", "--operator", "--label", "console test")["key"]
    _sign_in_by_key(page, api, op_key)
    for section in ("#accounts", "#pool", "#sources", "#blocks"):
        assert page.locator(section).is_visible()
    page.screenshot(path=shots / "05-operator.png", full_page=True)

    page.fill("#q", who)
    with page.expect_navigation():
        page.click("#search-form button")
    row = page.locator(f"#account-{account_id}")
    assert who in row.inner_text() and page.locator("#accounts tbody tr").count() == 1
    page.once("dialog", lambda d: d.accept())
    with page.expect_navigation():
        row.locator("button", has_text="Suspend").click()
    assert "suspended" in page.locator(f"#account-{account_id}").inner_text()
    assert cli(gw.db, "account", "show", str(account_id))["status"] == "suspended"
    wait_until(
        lambda: _curl(gw, user, password, origin.url("/")) == 403, 5, 0.1, "the account refused"
    )
    page.screenshot(path=shots / "06-operator-suspended.png", full_page=True)
    assert page.errors == []


# -- a phone -------------------------------------------------------------------------------


def test_pages_fit_a_phone_screen(gw: Gateway, api: str, browser, shots: Path) -> None:
    acc = gw.cli("account", "create", _email())
    key = gw.cli("key", "create", str(acc["id"]), "--label", "a-very-long-label-" * 4)["key"]
    gw.cli("credential", "create", str(acc["id"]), "--label", "x" * 90)
    op_key = gw.cli("key", "create", "--operator")["key"]
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
    )
    try:
        page = context.new_page()
        _sign_in_by_key(page, api, key)
        _no_horizontal_overflow(page)
        page.screenshot(path=shots / "07-phone-customer.png", full_page=True)
        page.context.clear_cookies()
        _sign_in_by_key(page, api, op_key)
        _no_horizontal_overflow(page)
        page.screenshot(path=shots / "08-phone-operator.png", full_page=True)
    finally:
        context.close()
