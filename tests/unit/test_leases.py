"""Leases in a real ledger file: who may lease what, and a charge exactly once."""

from __future__ import annotations

import pytest

from datorus_core import ledger
from datorus_core.egress import parse_egress_url
from datorus_core.envelope import DatorusError
from datorus_core.ledger import accounts, leases, money
from datorus_core.ledger import egress as egress_ledger

NOW = 1_800_000_000


@pytest.fixture
def db(tmp_path):
    d = ledger.open_ledger(tmp_path / "l.db")
    for url in ("direct://", "direct://127.0.0.2", "direct://127.0.0.3", "direct://127.0.0.4"):
        egress_ledger.add_egress(d, url, "us")
    d.conn.execute("UPDATE egress SET score = 0.9, status = 'active'")
    yield d
    d.conn.close()


def _account(db, email: str, cents: int) -> int:
    aid = accounts.create_account(db, email, 0, None, None, None, None, None)["id"]
    if cents:
        money.add_balance(db, aid, cents)
    return aid


def _code(fn, *args) -> tuple[str, dict]:
    with pytest.raises(DatorusError) as e:
        fn(*args)
    return e.value.code, e.value.details or {}


def test_charged_once_in_the_same_transaction_and_released(db):
    aid = _account(db, "a@example.com", 10)
    lease = leases.acquire(db, aid, {}, 300, 1, NOW)
    assert lease["credits_remaining"] == 9 and lease["expires_ts"] == NOW + 300
    assert lease["proxy"]["ip"] in ("127.0.0.2", "127.0.0.3", "127.0.0.4")  # never direct://
    rows = list(db.query("SELECT nanocents, external_id FROM transactions WHERE kind != 'topup'"))
    assert rows == [{"nanocents": -(10**9), "external_id": f"lease:{lease['lease_id']}"}]
    assert [x["lease_id"] for x in leases.for_account(db, aid, NOW)] == [lease["lease_id"]]
    assert leases.for_account(db, aid, NOW + 300) == []  # lapsed by itself
    assert leases.release(db, aid, lease["lease_id"], NOW)["released"] is True
    assert _code(leases.release, db, aid, lease["lease_id"], NOW)[0] == "RESOURCE_NOT_FOUND"
    assert accounts.show_account(db, aid)["balanceCents"] == 9  # not refunded


def test_what_cannot_be_leased(db):
    aid = _account(db, "b@example.com", 10)
    assert _code(leases.acquire, db, aid, {"country": "de"}, 300, 1, NOW)[0] == (
        "RESOURCE_NOT_FOUND"
    )
    db.conn.execute("UPDATE egress SET score = 0 WHERE url != 'direct://'")  # failing checks
    assert _code(leases.acquire, db, aid, {}, 300, 1, NOW)[0] == "RESOURCE_NOT_FOUND"
    db.conn.execute("UPDATE egress SET score = 0.9, status = 'unchecked'")  # never checked
    assert _code(leases.acquire, db, aid, {}, 300, 1, NOW)[0] == "RESOURCE_NOT_FOUND"
    db.conn.execute("UPDATE egress SET score = 0.9, status = 'active'")
    poor = _account(db, "poor@example.com", 0)
    code, details = _code(leases.acquire, db, poor, {}, 300, 1, NOW)
    assert code == "INSUFFICIENT_BALANCE" and details["requiredCents"] == 1


def test_per_account_cap_and_the_shared_reserve(db):
    a = _account(db, "c@example.com", 10)
    b = _account(db, "d@example.com", 10)
    leases.acquire(db, a, {}, 300, 1, NOW)
    code, details = _code(leases.acquire, db, a, {}, 300, 1, NOW, 1)
    assert (code, details["limit"], details["retryAfterSeconds"]) == (
        "RATE_LIMITED",
        "leases_per_account",
        300,
    )
    leases.acquire(db, b, {}, 60, 1, NOW)
    leases.acquire(db, b, {}, 60, 1, NOW)  # three of four leased: direct:// stays shared
    code, details = _code(leases.acquire, db, a, {}, 300, 1, NOW)
    assert (code, details["limit"]) == ("RATE_LIMITED", "leases")
    assert accounts.show_account(db, a)["balanceCents"] == 9  # refusals cost nothing


def test_the_reserve_keeps_one_proxy_unleased(tmp_path):
    d = ledger.open_ledger(tmp_path / "r.db")
    for url in ("direct://127.0.0.2", "direct://127.0.0.3"):
        egress_ledger.add_egress(d, url)
    d.conn.execute("UPDATE egress SET score = 0.9, status = 'active'")
    aid = _account(d, "e@example.com", 10)
    leases.acquire(d, aid, {}, 300, 1, NOW)
    code, details = _code(leases.acquire, d, aid, {}, 300, 1, NOW)
    assert (code, details["reason"]) == ("RATE_LIMITED", "pool_reserve")


def test_a_leased_egress_cannot_be_removed(db):
    aid = _account(db, "f@example.com", 10)
    lease = leases.acquire(db, aid, {}, 3600, 1, 2_000_000_000)  # lives past the test
    code, details = _code(egress_ledger.remove_egress, db, lease["proxy"]["id"])
    assert code == "VALIDATION_ERROR" and details["field"] == "egress"


def test_customers_never_see_upstream_credentials():
    spec = parse_egress_url("http://user:s3cret@proxy.example:3128")
    assert spec.customer_url() == "http://proxy.example:3128"
    assert parse_egress_url("direct://127.0.0.2").customer_url() == "direct://127.0.0.2"
