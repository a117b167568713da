"""The event log and the outbox in the ledger (issue 18), on SQLite and PostgreSQL.

Events written in the transaction of their change (none for a change rolled back), ids
in commit order, dedupe keys, leases announced as expired once, the checks' pool events,
and the outbox's fan-out, claims and outcomes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from datorus_core import events as ev
from datorus_core.envelope import DatorusError
from datorus_core.ledger import Ledger, accounts, money, open_ledger
from datorus_core.ledger import egress as ledger_egress
from datorus_core.ledger import events as le
from datorus_core.ledger import leases as ledger_leases
from datorus_core.ledger.egress import CheckRun, CheckWrite
from datorus_core.ledger.gateway import LedgerLink
from datorus_core.runtime import Notice


@pytest.fixture
def target(ledger_target: str) -> str:
    """A fresh ledger on each backend in turn (conftest's ``ledger_target``)."""
    return ledger_target


@pytest.fixture
def db(target: str) -> Iterator[Ledger]:
    d = open_ledger(target)
    yield d
    d.close()


def _account(db: Ledger, email: str = "a@example.com") -> int:
    return int(accounts.create_account(db, email, 0)["id"])


def _types(db: Ledger, aid: int | None = None) -> list[str]:
    return [e["type"] for e in le.after(db, aid, 0, 1000)]


def test_events_are_written_with_their_change_and_never_for_a_rollback(db: Ledger) -> None:
    aid = _account(db)
    money.add_balance(db, aid, 500, "first")
    with pytest.raises(DatorusError):
        money.add_balance(db, aid, 10**10, "over the cap")  # refused: no event
    accounts.set_status(db, aid, "suspended")
    accounts.set_status(db, aid, "suspended")  # no change: no second event
    (bought, suspended) = le.after(db, aid, 0, 10)
    assert bought["type"] == "credits.purchased" and suspended["type"] == "account.suspended"
    assert bought["data"] == {
        "account_id": aid,
        "amount_cents": 500,
        "balance_cents": 500,
        "reason": "first",
        "source": "operator",
    }
    assert int(suspended["id"]) > int(bought["id"])
    assert money.credit_payment(db, aid, 200, "pi_1", "card") is True
    assert money.credit_payment(db, aid, 200, "pi_1", "card") is False  # credited once
    assert _types(db, aid).count("credits.purchased") == 2


def test_ids_increase_in_commit_order_under_concurrent_writers(target: str) -> None:
    """Several connections write events at once; every id a reader sees after id n was
    committed after n (no reader that saw n later finds a smaller id)."""
    setup = open_ledger(target)
    aid = _account(setup)
    setup.close()
    seen: list[int] = []
    stop = threading.Event()

    def write() -> None:
        d = open_ledger(target)
        for i in range(15):
            money.add_balance(d, aid, 1, f"w{i}")
        d.close()

    def read() -> None:
        d = open_ledger(target)
        last = 0
        while not stop.is_set():
            for e in le.after(d, aid, last, 100):
                seen.append(int(e["id"]))
                last = int(e["id"])
        for e in le.after(d, aid, last, 1000):
            seen.append(int(e["id"]))
        d.close()

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write) for _ in range(3)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert len(seen) == 45 and seen == sorted(seen) and len(set(seen)) == 45


def test_dedupe_keys_write_an_event_once(db: Ledger) -> None:
    aid = _account(db)
    for _ in range(3):
        le.emit_now(db, "credits.exhausted", aid, {"n": 1}, dedupe=f"x:{aid}")
    assert _types(db, aid) == ["credits.exhausted"]


def test_lease_acquired_then_expired_once(db: Ledger) -> None:
    aid = _account(db)
    money.add_balance(db, aid, 10, "for leases")
    for ip in ("127.0.0.2", "127.0.0.3"):
        e = ledger_egress.add_egress(db, f"direct://{ip}")
        db.execute("UPDATE egress SET status = 'active', score = 1 WHERE id = ?", (e["id"],))
    lease = ledger_leases.acquire(db, aid, {}, 60, 1, now=1000)
    assert le.expire_leases(db, 1059) == 0
    assert le.expire_leases(db, 1060) == 1
    assert le.expire_leases(db, 2000) == 0
    acquired, expired = (e for e in le.after(db, aid, 0, 10) if e["type"].startswith("lease."))
    assert (
        acquired["type"] == "lease.acquired" and acquired["data"]["lease_id"] == lease["lease_id"]
    )
    assert expired["type"] == "lease.expired" and expired["data"]["lease_id"] == lease["lease_id"]


def test_checks_announce_dead_recovered_and_pool_low_once_per_crossing(target: str) -> None:
    db = open_ledger(target)
    e = ledger_egress.add_egress(db, "http://u:secret@127.0.0.9:3128")
    eid = int(e["id"])
    db.close()

    def check(status: str) -> CheckWrite:
        run = CheckRun("tcp_connect", 1, status == "active", detail="refused")
        return CheckWrite(eid, (run,), status, 0, 1.0 if status == "active" else 0.0, 50.0, None)

    async def run() -> None:
        link = LedgerLink(target)
        await link.open()
        link.pool_low = 1
        for status in ("active", "active", "dead", "dead", "active"):
            await link.store_checks([check(status)])
        await link.write_events([Notice("credits.exhausted", None, {}, "k:", per_topup=True)])
        await link.close()

    asyncio.run(run())
    db = open_ledger(target)
    got = le.after(db, None, 0, 100)
    db.close()
    types = [g["type"] for g in got]
    # unchecked -> active is no news; active -> dead and dead -> active are; the pool (one
    # egress) went low when it died, once, and is not low again until it recovered
    assert types == ["proxy.dead", "proxy.pool_low", "proxy.recovered", "credits.exhausted"]
    dead = next(g for g in got if g["type"] == "proxy.dead")
    assert dead["data"] == {"proxy_id": str(eid), "url": "http://127.0.0.9:3128",
                            "detail": "refused"}  # fmt: skip
    # the operator's pool view says why an egress died: its newest failed check
    db = open_ledger(target)
    assert ledger_egress.last_failures(db, [eid])[eid]["detail"] == "refused"
    assert ledger_egress.last_failures(db, [eid + 1]) == {}
    db.close()


def test_payment_history_lists_top_ups_and_declined_recharges_newest_first(db: Ledger) -> None:
    from datorus_core.api.routes_console import payment_history

    a = _account(db)
    money.credit_payment(db, a, 700, "pi_one", "Stripe Checkout (confirmed on return)")
    le.emit_now(
        db,
        "credits.recharge_failed",
        a,
        {"account_id": a, "amount_cents": 2000, "code": "STRIPE_DECLINED", "decline_code": "x"},
    )
    money.add_balance(db, a, 300, "operator top-up")
    got = payment_history(db, a)
    # newest first (the three may share a second: then money rows keep the ledger's order)
    assert [(h["what"], h["amount"]) for h in got if not h["declined"]] == [
        ("Top-up", 300),
        ("Top-up", 700),
    ]
    assert [h["at"] for h in got] == sorted((h["at"] for h in got), reverse=True)
    declined = [h for h in got if h["declined"]]
    assert [(h["what"], h["amount"], h["description"]) for h in declined] == [
        ("Auto-recharge declined", 2000, "x")
    ]


def test_outbox_fans_out_claims_one_at_a_time_and_records(db: Ledger) -> None:
    a, b = _account(db, "a@example.com"), _account(db, "b@example.com")
    hook = le.add_subscription(db, a, "webhook", "http://127.0.0.1:9/h", ("credits.*",))
    ops = le.add_subscription(db, None, "smtp", "ops@example.com", ("account.*",))
    money.add_balance(db, a, 100, "x")
    money.add_balance(db, a, 200, "y")
    money.add_balance(db, b, 300, "not a's")
    accounts.set_status(db, b, "suspended")
    assert le.dispatch(db, 1000) == 4
    assert le.dispatch(db, 1000) == 0
    due = le.claim_due(db, 1000, 30_000, 10)
    # one per subscription at a time: a's first purchase, and b's suspension for the operator
    assert sorted((d["subscription_id"], d["event"]["type"]) for d in due) == sorted(
        [(int(hook["id"]), "credits.purchased"), (int(ops["id"]), "account.suspended")]
    )
    assert le.claim_due(db, 1001, 30_000, 10) == []  # both still under way
    first = next(d for d in due if d["subscription_id"] == int(hook["id"]))
    le.record(db, first["id"], first["subscription_id"], False, 500, "answered 500", 5000)
    (second,) = [d for d in le.claim_due(db, 1002, 30_000, 10)]
    assert second["event"]["data"]["amount_cents"] == 200  # the next one, not the retry yet
    le.record(db, second["id"], second["subscription_id"], True, 204, None, None)
    (retry,) = le.claim_due(db, 5000, 30_000, 10)
    assert retry["id"] == first["id"] and retry["attempts"] == 1
    le.record(db, retry["id"], retry["subscription_id"], False, None, "gave up", None)
    rows = {d["status"] for d in le.deliveries(db, a, int(hook["id"]))}
    assert rows == {"failed", "delivered"}
    health = le.plugin_health(db, customers=True)
    assert health["webhook"]["deliveries"] == {"failed": 1, "delivered": 1}
    assert health["webhook"]["last_failure"] == "gave up"
    # the operator's notifier is apart: the customer's failures are not its health
    ops_health = le.plugin_health(db)
    assert "webhook" not in ops_health  # the operator has no webhook notifier
    assert ops_health["smtp"]["subscriptions"] == 1 and ops_health["smtp"]["last_failure"] is None
    assert ops_health["smtp"]["deliveries"] == {"pending": 1}


def test_patterns() -> None:
    assert ev.parse_patterns("proxy.*, credits.low") == ("proxy.*", "credits.low")
    for bad in ("", "nothing.*", "credits.*;drop", ","):
        with pytest.raises(ValueError):
            ev.parse_patterns(bad)
    assert ev.matches(("*",), "lease.expired")
