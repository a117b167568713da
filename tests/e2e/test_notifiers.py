"""Operator notifiers (issue 18): ``datorus notifier add/list/remove/test``, the ``smtp``
and ``webhook`` plugins delivering from the outbox, and their health in /stats/plugins.

A real gateway whose mail goes to an aiosmtpd server on loopback; webhook receivers on
loopback (the test ledger allows 127.0.0.0/8).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from support.ledger import cli
from support.processes import Gateway, GatewaySetup
from support.receivers import Receiver
from support.waiting import free_port, wait_until


@pytest.fixture(scope="module")
def gw_setup(smtp_server) -> GatewaySetup:
    """A gateway with its API, mailing through the test's SMTP server."""

    def ready(g: Gateway) -> None:
        g.key = cli(g.db, "key", "create", "--operator")["key"]  # type: ignore[attr-defined]

    return GatewaySetup(
        {
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp_server.port,
            "mail_from": "gw@dt.test",
            "event_retry_first_ms": 200,
        },
        api=True,
        ready=ready,
    )


def _account(gw: Gateway) -> int:
    return int(cli(gw.db, "account", "create", f"n{time.monotonic_ns()}@example.com")["id"])


def _notifier(gw: Gateway, nid: str) -> dict[str, Any]:
    items = cli(gw.db, "notifier", "list")["items"]
    return next(n for n in items if n["id"] == nid)


def test_smtp_notifier_mails_matching_events(gw: Gateway, smtp_server) -> None:
    to = f"ops{time.monotonic_ns()}@example.com"
    n = cli(gw.db, "notifier", "add", "smtp", to, "--events", "credits.purchased")
    assert n["kind"] == "smtp" and n["target"] == to and n["events"] == ["credits.purchased"]
    assert "secret" not in n
    aid = _account(gw)
    cli(gw.db, "account", "suspend", str(aid))  # not subscribed: no mail
    cli(gw.db, "balance", "add", str(aid), "700")
    mail = wait_until(
        lambda: next((m for m in smtp_server.messages if to in m["to"]), None), what="the mail"
    )
    assert "Subject: [Datorus] credits.purchased" in mail["data"]
    assert '"amount_cents": 700' in mail["data"]
    assert mail["from"] == "gw@dt.test"
    wait_until(lambda: _notifier(gw, n["id"])["lastSuccessAt"], what="its health")
    assert len([m for m in smtp_server.messages if to in m["to"]]) == 1

    smtp = next(p for p in _stats(gw)["notifiers"] if p["name"] == "smtp")
    assert smtp["healthy"] is True and smtp["subscriptions"] >= 1
    assert smtp["deliveries"]["delivered"] >= 1
    cli(gw.db, "notifier", "remove", n["id"])
    assert all(x["id"] != n["id"] for x in cli(gw.db, "notifier", "list")["items"])


def _stats(gw: Gateway) -> dict[str, Any]:
    h = {"Authorization": f"Bearer {gw.key}"}  # type: ignore[attr-defined]
    r = httpx.get(f"{gw.api_url}/stats/plugins", headers=h, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_webhook_notifier_gets_every_accounts_events_by_glob(gw: Gateway) -> None:
    rcv = Receiver()
    try:
        n = cli(gw.db, "notifier", "add", "webhook", rcv.url, "--events", "account.*,lease.*")
        assert n["secret"].startswith("whsec_")
        a, b = _account(gw), _account(gw)
        cli(gw.db, "account", "suspend", str(a))
        cli(gw.db, "account", "suspend", str(b))
        cli(gw.db, "balance", "add", str(a), "100")  # credits.*: not subscribed
        got = wait_until(lambda: len(rcv.seen) >= 2 and rcv.seen, what="both suspensions")
        events = [json.loads(s["body"]) for s in got]
        assert sorted(e["data"]["account_id"] for e in events) == sorted([a, b])
        assert {e["type"] for e in events} == {"account.suspended"}
        from datorus_core.events import verify_signature

        for s in got:
            assert verify_signature(
                n["secret"], s["body"], s["headers"]["datorus-signature"], int(time.time())
            )
        cli(gw.db, "notifier", "remove", n["id"])
    finally:
        rcv.close()


def test_a_customers_failing_webhook_is_not_the_operators_plugin_health(gw: Gateway) -> None:
    ours, theirs = Receiver(), Receiver(fail_first=10**6)  # theirs answers 500, always
    try:
        n = cli(gw.db, "notifier", "add", "webhook", ours.url, "--events", "credits.*")
        aid = _account(gw)
        h = {"Authorization": f"Bearer {cli(gw.db, 'key', 'create', str(aid))['key']}"}
        r = httpx.post(
            f"{gw.api_url}/account/webhooks",
            json={"url": theirs.url, "events": ["credits.*"]},
            headers=h,
        )
        assert r.status_code == 201, r.text
        cli(gw.db, "balance", "add", str(aid), "100")
        wait_until(lambda: _notifier(gw, n["id"])["lastSuccessAt"], what="ours delivered")
        wait_until(lambda: len(theirs.seen) >= 2, what="theirs failing twice")

        def failed_since() -> Any:
            hooks = httpx.get(f"{gw.api_url}/account/webhooks", headers=h).json()["items"]
            return hooks[0]["last_failure"]

        assert wait_until(failed_since, what="theirs recorded") == "answered 500"
        stats = _stats(gw)
        webhook = next(p for p in stats["notifiers"] if p["name"] == "webhook")
        live = [x for x in cli(gw.db, "notifier", "list")["items"] if x["kind"] == "webhook"]
        assert webhook["subscriptions"] == len(live)  # the operator's, not the customer's
        assert webhook["healthy"] is True
        assert webhook["last_failure"] is None and webhook["last_failure_at"] is None
        # the customers' webhooks are counted apart
        hooks = stats["customer_webhooks"]
        assert hooks["subscriptions"] == 1
        assert hooks["deliveries"]["pending"] + hooks["deliveries"]["failed"] >= 1
        cli(gw.db, "notifier", "remove", n["id"])
    finally:
        ours.close()
        theirs.close()


def test_notifier_test_reports_a_dead_target_and_records_it(gw: Gateway) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"
    n = cli(gw.db, "notifier", "add", "webhook", dead, "--events", "proxy.*")
    err = cli(gw.db, "notifier", "test", n["id"], check=False)["error"]
    assert err["code"] == "UPSTREAM_FAILED"
    assert "ConnectError" in err["details"]["reason"]
    shown = _notifier(gw, n["id"])
    assert shown["lastFailureAt"] and "ConnectError" in shown["lastFailure"]
    webhook = next(p for p in _stats(gw)["notifiers"] if p["name"] == "webhook")
    assert webhook["last_failure_at"] is not None

    rcv = Receiver()
    try:
        ok = cli(gw.db, "notifier", "add", "webhook", rcv.url, "--events", "proxy.*")
        out = cli(gw.db, "notifier", "test", ok["id"])
        assert out["delivered"] is True
        (seen,) = rcv.seen
        assert seen["headers"]["datorus-event-type"] == "notifier.test"
        assert _notifier(gw, ok["id"])["lastSuccessAt"]
    finally:
        rcv.close()
    cli(gw.db, "notifier", "remove", n["id"])
    cli(gw.db, "notifier", "remove", ok["id"])


@pytest.mark.parametrize(
    ("args", "code", "field"),
    [
        (("webhook", "http://169.254.169.254/", "--events", "proxy.*"), "AUP_VIOLATION", None),
        (("webhook", "ftp://x.example/", "--events", "proxy.*"), "VALIDATION_ERROR", "target"),
        (("smtp", "not-an-address", "--events", "proxy.*"), "VALIDATION_ERROR", "target"),
        (("pager", "x", "--events", "proxy.*"), "VALIDATION_ERROR", "kind"),
        (("smtp", "a@example.com", "--events", "nothing.*"), "VALIDATION_ERROR", "events"),
    ],
)
def test_notifier_add_refusals(gw: Gateway, args: tuple[str, ...], code: str, field: Any) -> None:
    err = cli(gw.db, "notifier", "add", *args, check=False)["error"]
    assert err["code"] == code
    if field is not None:
        assert err["details"]["field"] == field
    else:
        assert err["details"]["rule"] == "link_local"
        assert err["details"]["hint"].startswith("Webhooks go to public http(s) destinations")


def test_a_refused_webhook_tells_a_person_what_may_be_one(gw: Gateway) -> None:
    """Without --json the one sentence carries the hint too (probe 8b: it said only that
    the URL is not allowed)."""
    import subprocess

    from support.ledger import DATORUS

    args = ["notifier", "add", "webhook", "http://169.254.169.254/", "--events", "proxy.*"]
    p = subprocess.run(
        [DATORUS, "--db", str(gw.db), *args], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith(
        "This webhook URL is not an allowed destination. Webhooks go to public http(s)"
    ), p.stderr
    assert "datorus policy allow CIDR" in p.stderr


def test_datorus_deliver_sends_the_outbox_without_a_gateway(tmp_path) -> None:
    import signal
    import subprocess

    from support.ledger import DATORUS, new_ledger, prepare_ledger

    db = new_ledger(tmp_path)
    prepare_ledger(db)
    rcv = Receiver()
    proc = None
    try:
        cli(db, "notifier", "add", "webhook", rcv.url, "--events", "credits.*")
        aid = cli(db, "account", "create", "d@example.com")["id"]
        cli(db, "balance", "add", str(aid), "42")
        proc = subprocess.Popen(
            [DATORUS, "--db", str(db), "deliver"], stderr=subprocess.PIPE, text=True
        )
        (got,) = wait_until(lambda: rcv.of_type("credits.purchased"), timeout=20)
        assert json.loads(got["body"])["data"]["amount_cents"] == 42
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        wait_until(lambda: cli(db, "notifier", "list")["items"][0]["lastSuccessAt"])
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        rcv.close()
