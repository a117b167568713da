"""The ledger on both backends: a SQLite file and a real PostgreSQL database (issue 16).

Every test here takes ``target``, run once with a SQLite path and once with the URL of
a fresh database on the tests' own PostgreSQL cluster (``postgres_url``), and goes
through the ledger package as the CLI, the API and the gateway do: the same calls must
give the same answers, with integers (never Decimal) for every amount. The tests that
only PostgreSQL needs (a lost server, migrating from two processes at once, the CLI on a
URL) follow.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from support.paths import DATORUS
from support.postgres import PostgresCluster

from datorus_core.envelope import DatorusError, new_request_id
from datorus_core.ledger import (
    IntegrityError,
    Ledger,
    accounts,
    connect,
    money,
    open_ledger,
    policy_rules,
    usage,
)
from datorus_core.ledger import api as ledger_api
from datorus_core.ledger import egress as ledger_egress
from datorus_core.ledger import leases as ledger_leases
from datorus_core.ledger.db import migrate_file
from datorus_core.ledger.gateway import LedgerLink
from datorus_core.ledger.schema import MIGRATIONS
from datorus_core.ledger.schema_postgres import MIGRATIONS as PG_MIGRATIONS
from datorus_core.runtime import UsageBatch

NANO = 10**9
DAY = "2026-01-02"


@pytest.fixture
def target(ledger_target: str) -> str:
    """A fresh ledger on each backend in turn (conftest's ``ledger_target``)."""
    return ledger_target


@pytest.fixture
def db(target: str) -> Iterator[Ledger]:
    d = open_ledger(target)
    yield d
    d.close()


@contextmanager
def _opened(target: str) -> Iterator[Ledger]:
    """An open ledger, closed after."""
    d = open_ledger(target)
    try:
        yield d
    finally:
        d.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def dump(db: Ledger) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the gateway's usage writes touch, in a stable order."""
    tables = {
        "transactions": "SELECT account_id, kind, nanocents, trial_bytes, bytes, requests"
        " FROM transactions ORDER BY id",
        "balances": "SELECT * FROM balances ORDER BY account_id",
        "usage_daily": "SELECT * FROM usage_daily ORDER BY account_id, credential_id, day",
        "credential_usage": "SELECT * FROM credential_usage ORDER BY credential_id",
        "receipts": "SELECT * FROM receipts ORDER BY request_id",
        "worker_usage": "SELECT * FROM worker_usage ORDER BY worker, credential_id",
        "usage_batches": "SELECT id, worker FROM usage_batches ORDER BY id",
    }
    return {name: [tuple(r.values()) for r in db.query(sql)] for name, sql in tables.items()}


def customer(db: Ledger, email: str = "a@example.com", trial: int = 1000, cents: int = 0):
    acc = accounts.create_account(db, email, trial_bytes=trial)
    if cents:
        money.add_balance(db, acc["id"], cents, "test")
    cred = accounts.create_credential(db, acc["id"], label="t")
    return acc["id"], cred["id"]


def receipt_row(aid: int, cid: int, **over: Any) -> tuple[Any, ...]:
    row: dict[str, Any] = {
        "request_id": new_request_id(),
        "account_id": aid,
        "credential_id": cid,
        "method": "GET",
        "host": "example.com",
        "port": 80,
        "status": 200,
        "bytes_up": 100,
        "bytes_down": 900,
        "trial_bytes": 1000,
        "nanocents": 0,
        "started_at": "2026-01-02T03:04:05.000Z",
        "finished_at": "2026-01-02T03:04:06.000Z",
        "code": None,
    }
    row.update(over)
    return tuple(row[c] for c in usage.RECEIPT_COLUMNS)


def a_batch(aid: int, cid: int, receipts: list[tuple[Any, ...]] | None = None) -> UsageBatch:
    """1,000 bytes up and 4,000 down in 2 requests: 1,000 trial bytes, 4,000 paid at 300 c/GB."""
    b = UsageBatch()
    b.accounts[aid] = [-4000 * 300, -1000, 5000, 2]
    b.daily[(aid, cid, DAY)] = [2, 1000, 4000, 1000, 4000 * 300]
    b.credentials[cid] = 5000
    b.receipts = list(receipts or [])
    b.events = 2
    return b


def all_ints(rows: Any) -> bool:
    """No Decimal and no float where the ledger keeps integers."""
    if isinstance(rows, dict):
        return all(all_ints(v) for v in rows.values())
    if isinstance(rows, list | tuple):
        return all(all_ints(v) for v in rows)
    return rows is None or isinstance(rows, int | str)


# -- the schema -----------------------------------------------------------------------------


def test_both_backends_have_the_same_numbered_migrations() -> None:
    assert len(PG_MIGRATIONS) == len(MIGRATIONS) == 14


def test_a_new_ledger_is_at_the_newest_schema_and_migrating_again_changes_nothing(
    target: str,
) -> None:
    migrate_file(target)
    migrate_file(target)
    with _opened(target) as d:
        assert d.schema_version() == len(MIGRATIONS)
        assert d.config_version() == 1


def test_transactions_are_append_only(db: Ledger) -> None:
    aid, _ = customer(db)
    for sql in ("UPDATE transactions SET nanocents = 5", "DELETE FROM transactions"):
        with pytest.raises(IntegrityError, match="append-only"):
            db.execute(sql)
    assert db.value("SELECT COUNT(*) FROM transactions WHERE account_id = ?", (aid,)) == 1


# -- accounts and credentials ---------------------------------------------------------------


def test_accounts_are_unique_by_email_in_any_case(db: Ledger) -> None:
    aid, _ = customer(db, "Ann@Example.com")
    assert accounts.find_account_by_email(db, "ann@example.COM")["id"] == aid
    with pytest.raises(DatorusError) as e:
        accounts.create_account(db, "ANN@example.com", trial_bytes=0)
    assert e.value.code == "EMAIL_TAKEN"
    # a racing insert that got past the look-up is refused by the unique index itself
    with pytest.raises(IntegrityError):
        db.execute("INSERT INTO accounts (email) VALUES (?)", ("ann@EXAMPLE.com",))


def test_credentials_are_created_listed_found_and_revoked(db: Ledger) -> None:
    aid, cid = customer(db)
    v0 = db.config_version()
    extra = accounts.create_credential(db, aid, max_bytes=5000, label="second")
    assert db.config_version() > v0
    listed = accounts.list_credentials(db, aid)
    assert [c["id"] for c in listed] == [cid, extra["id"]]
    assert listed[1]["maxBytes"] == 5000 and listed[1]["usedBytes"] == 0
    assert accounts.find_credential(db, aid, str(extra["id"])) == extra["username"]
    assert accounts.find_credential(db, aid, extra["username"]) == extra["username"]
    v1 = db.config_version()
    accounts.revoke_credential(db, extra["username"], aid)
    assert db.config_version() > v1
    assert accounts.live_usernames(db, aid, "second") == []
    rows, total = ledger_api.page(db, accounts.CREDENTIALS_SQL, [aid], 0, 1)
    assert total == 2 and len(rows) == 2 and rows[0]["id"] == cid


def test_the_api_fetch_credential_is_one_for_every_process_and_renewed_when_revoked(
    db: Ledger, target: str
) -> None:
    """The workers of ``datorus serve`` (and gateways on other boxes) derive one fetch
    credential per account from the ledger's secret: none revokes another's."""
    from datorus_core.api.via_gateway import FETCH_LABEL, fetch_credential
    from datorus_core.hashing import verify_secret

    aid, _ = customer(db)
    older = accounts.create_credential(db, aid, label=FETCH_LABEL)  # a random one, as before
    first = fetch_credential(db, aid)
    with _opened(target) as other:  # another process on the same ledger
        assert fetch_credential(other, aid) == first
    assert accounts.live_usernames(db, aid, FETCH_LABEL) == [first[0]]
    assert accounts.credential_revoked(db, older["username"]) is True
    stored = db.value("SELECT password_hash FROM credentials WHERE username = ?", (first[0],))
    assert verify_secret(first[1], stored)
    # made by two at once: one row
    assert not accounts.add_credential(db, aid, first[0], first[1], FETCH_LABEL)
    # revoked (by its customer): the secret is replaced, a new one made
    accounts.revoke_credential(db, first[0], aid)
    second = fetch_credential(db, aid)
    assert second[0] != first[0]
    assert accounts.live_usernames(db, aid, FETCH_LABEL) == [second[0]]
    with _opened(target) as other:
        assert fetch_credential(other, aid) == second


def test_operator_changes_bump_the_configuration_version(db: Ledger) -> None:
    aid, _ = customer(db)
    seen = [db.config_version()]

    def bumped() -> bool:
        seen.append(db.config_version())
        return seen[-1] > seen[-2]

    accounts.set_status(db, aid, "suspended")
    assert bumped()
    accounts.set_limits(db, aid, rps=7)
    assert bumped()
    policy_rules.add_policy_rule(db, "deny", "bad.example")
    assert bumped()
    policy_rules.remove_policy_rule(db, "deny", "bad.example")
    assert bumped()
    money.add_balance(db, aid, 5, "top-up")
    assert bumped()
    e = ledger_egress.add_egress(db, "http://127.0.0.1:3128", "us")
    assert bumped()
    ledger_egress.set_enabled(db, e["id"], False)
    assert bumped()


# -- money ----------------------------------------------------------------------------------


def test_top_ups_corrections_and_payments_are_exact_and_idempotent(db: Ledger) -> None:
    aid, _ = customer(db)
    assert money.add_balance(db, aid, 150, "first", external_id="ext-1")["applied"]
    again = money.add_balance(db, aid, 150, "first", external_id="ext-1")
    assert not again["applied"] and again["balanceNanocents"] == 150 * NANO
    assert money.credit_payment(db, aid, 25, "pi_1", "card", "evt_1", "payment_intent.succeeded")
    assert not money.credit_payment(db, aid, 25, "pi_1", "card", "evt_2", "x")
    with pytest.raises(DatorusError) as e:
        money.correct_balance(db, aid, -1000, "too much")
    assert e.value.details["balanceCents"] == 175
    money.correct_balance(db, aid, -75, "mistaken top-up")
    shown = accounts.show_account(db, aid)
    assert shown["balanceCents"] == 100 and shown["toppedUp"] is True
    total = db.value("SELECT SUM(nanocents) FROM transactions WHERE account_id = ?", (aid,))
    assert type(total) is int and total == shown["balanceNanocents"] == 100 * NANO
    history = money.credit_history(db, aid, 10)
    assert all_ints(history["items"]) and history["balance_nanocents"] == 100 * NANO


def test_a_trial_is_granted_once_per_account(db: Ledger) -> None:
    aid, _ = customer(db, trial=0)
    with db.transaction():
        money.insert_trial_grant(db, aid, 500, "trial")
    with db.transaction():
        money.insert_trial_grant(db, aid, 500, "trial")
    assert accounts.show_account(db, aid)["trialRemainingBytes"] == 500


def test_api_rows_secrets_tokens_keys_and_idempotent_answers(db: Ledger) -> None:
    aid, _ = customer(db, trial=0)
    assert ledger_api.secret(db, "s") == ledger_api.secret(db, "s")
    token = ledger_api.add_email_token(db, aid, "verify", int(time.time()) + 60)
    assert ledger_api.consume_verification(db, token, aid, 700)
    assert not ledger_api.consume_verification(db, token, aid, 700)
    key = ledger_api.add_api_key(db, aid, "dk_x", "hash-1", "k")
    assert ledger_api.live_api_key(db, "hash-1")["account_id"] == aid
    assert ledger_api.revoke_api_key(db, aid, key["id"])
    ledger_api.store_response(db, aid, "idem", '{"a": 1}')
    ledger_api.store_response(db, aid, "idem", '{"a": 2}')
    assert ledger_api.stored_response(db, aid, "idem") == '{"a": 1}'
    ledger_api.add_outbox(db, "Ann@Example.com", "hi", "body")
    assert len(ledger_api.outbox(db, "ann@example.com")) == 1


# -- the gateway's link: snapshots and usage batches ----------------------------------------


def test_a_snapshot_reads_accounts_credentials_rules_and_version_as_integers(
    db: Ledger, target: str
) -> None:
    aid, cid = customer(db, trial=1000, cents=3)
    policy_rules.add_policy_rule(db, "allow", "127.0.0.0/8")

    async def main() -> Any:
        link = LedgerLink(target)
        await link.open()
        try:
            return await link.snapshot()
        finally:
            await link.close()

    accs, creds, rules, version = run(main())
    assert accs == [(aid, "active", None, None, None, None, 1000, 3 * NANO, 1)]
    assert [c[:2] for c in creds] == [(cid, aid)] and creds[0][5] == 0
    assert rules == [("allow", "127.0.0.0/8", None)]
    assert version == db.config_version() and all_ints([accs, creds])


def test_a_usage_batch_is_written_once_and_a_replay_changes_nothing(
    db: Ledger, target: str
) -> None:
    aid, cid = customer(db, trial=1000, cents=1)
    batch = a_batch(aid, cid, [receipt_row(aid, cid)])

    async def main() -> tuple[bool, bool]:
        link = LedgerLink(target)
        await link.open()
        try:
            first = await link.write(batch)
            written = dump(db)
            # the commit went through but its answer was lost: the batch is written again
            second = await link.write(batch)
            assert dump(db) == written
            return first, second
        finally:
            await link.close()

    assert run(main()) == (True, False)
    u = usage.usage(db, aid, by_day=True)
    assert u["bytes"] == 5000 and u["requests"] == 2 and u["chargedNanocents"] == 4000 * 300
    assert u["balanceNanocents"] == NANO - 4000 * 300 and u["trialRemainingBytes"] == 0
    assert u["days"] == [
        {
            "day": DAY,
            "requests": 2,
            "bytesUp": 1000,
            "bytesDown": 4000,
            "bytes": 5000,
            "trialBytes": 1000,
            "chargedNanocents": 4000 * 300,
        }
    ]
    assert all_ints(u)
    assert db.value("SELECT COUNT(*) FROM usage_batches") == 1
    # balances stay the sum of the transactions
    assert db.value("SELECT SUM(nanocents) FROM transactions") == u["balanceNanocents"]


def test_a_bad_receipt_never_costs_its_batch(db: Ledger, target: str) -> None:
    aid, cid = customer(db, trial=10**6)
    good = receipt_row(aid, cid, host="a\x00b.example")
    bad = [
        receipt_row(aid, cid, host=None),  # NOT NULL
        receipt_row(aid, cid, port="eighty"),  # text where a number goes
        receipt_row(aid, cid, method=b"GET"),  # bytes where text goes
        (new_request_id(), aid),  # not a receipt at all
    ]
    huge = receipt_row(aid, cid, bytes_down=10**30)  # past 64 bits: clamped
    dup = good  # the same request id twice: the first stays

    async def main() -> None:
        link = LedgerLink(target)
        await link.open()
        try:
            assert await link.write(a_batch(aid, cid, [good, *bad, huge, dup]))
        finally:
            await link.close()

    run(main())
    assert usage.usage(db, aid)["bytes"] == 5000
    got = {r["request_id"]: r for r in db.query("SELECT * FROM receipts")}
    assert set(got) == {good[0], huge[0]}
    assert got[good[0]]["host"] == "ab.example"
    assert got[huge[0]]["bytes_down"] == 2**63 - 1


def test_each_worker_s_flushed_bytes_are_kept_with_its_usage(db: Ledger, target: str) -> None:
    aid, cid = customer(db, trial=1000, cents=1)

    async def main() -> list[Any]:
        link = LedgerLink(target)
        await link.open()
        try:
            for worker in ("w1", "w1", "w2"):
                b = a_batch(aid, cid)
                b.worker = worker
                await link.write(b)
            *_, rows = await link.snapshot_shared()
            await link.forget_workers(["w1"])
            *_, left = await link.snapshot_shared()
            return [rows, left]
        finally:
            await link.close()

    rows, left = run(main())
    assert sorted(rows) == [("w1", cid, aid, 10000, 2000), ("w2", cid, aid, 5000, 1000)]
    assert left == [("w2", cid, aid, 5000, 1000)]


def test_leases_and_the_pool_are_seen_by_the_gateway(db: Ledger, target: str) -> None:
    aid, _ = customer(db, trial=0, cents=10)
    ledger_egress.add_egress(db, "direct://")
    e = ledger_egress.add_egress(db, "http://127.0.0.1:3128", "us")
    db.execute("UPDATE egress SET score = 0.9, status = 'active'")
    now = int(time.time())
    lease = ledger_leases.acquire(db, aid, {}, 60, 1, now)
    with pytest.raises(DatorusError) as busy:  # the last unleased egress stays shared
        ledger_leases.acquire(db, aid, {}, 60, 1, now)
    assert busy.value.code == "RATE_LIMITED"
    assert accounts.show_account(db, aid)["balanceCents"] == 9
    assert [x["lease_id"] for x in ledger_leases.for_account(db, aid, now)] == [lease["lease_id"]]

    runs = (
        ledger_egress.CheckRun("tcp_connect", 1, False, None, None, "refused"),
        ledger_egress.CheckRun("tcp_connect", 1, True, 1.5, None, "TCP connect OK"),
        ledger_egress.CheckRun("http_anonymity", 2, True, 12.5, "192.0.2.1", "judge OK"),
        ledger_egress.CheckRun("broken", 2, False, error="TypeError: oops"),
    )
    check = ledger_egress.CheckWrite(
        e["id"], runs, "active", 0, 0.75, 99.5, 12.5, "192.0.2.1", "elite", "DE"
    )

    async def main() -> Any:
        link = LedgerLink(target)
        await link.open()
        try:
            await link.store_checks([check])
            assert await link.secret("judge") == await link.secret("judge")
            await link.record_denials([(aid, "bad.example", 25, "port 25")])
            return await link.pool(now)
        finally:
            await link.close()

    pool, live = run(main())
    assert (e["id"], "http://127.0.0.1:3128", "us", 1, 1, 0.75, "active", 0) in pool
    assert live == [(lease["lease_id"], aid, e["id"], now + 60)]
    shown = ledger_egress.get_egress(db, e["id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shown["lastCheckedAt"])
    assert shown["exitIp"] == "192.0.2.1" and shown["score"] == 0.75
    assert shown["country"] == "us"  # the operator's country wins over the one found
    assert shown["foundCountry"] == "de"
    checks = ledger_egress.recent_checks(db, e["id"])
    assert [c["checker_name"] for c in checks] == [
        "broken",  # a checker that raised shows as a failed run
        "http_anonymity",
        "tcp_connect",
        "tcp_connect",
    ]
    assert checks[0]["passed"] == 0 and checks[0]["detail"] == "TypeError: oops"
    assert checks[-1]["latency_ms"] is None and checks[-1]["passed"] == 0
    health = ledger_egress.checker_health(db)
    tcp = health["tcp_connect"]
    assert (tcp["runs"], tcp["failures"], tcp["errors"], tcp["last_failure"]) == (
        2,
        1,
        0,
        "refused",
    )
    assert health["broken"]["errors"] == 1 and health["broken"]["last_error"] == "TypeError: oops"
    ledger_leases.release(db, aid, lease["lease_id"], now)
    assert ledger_leases.for_account(db, aid, now) == []


def test_old_receipts_and_batch_ids_are_pruned(db: Ledger, target: str) -> None:
    aid, cid = customer(db)
    db.execute(
        "INSERT INTO usage_batches (id, worker, written_at) VALUES ('old', NULL, ?)",
        (int(time.time()) - 8 * 86400,),
    )
    old = receipt_row(aid, cid)
    old = ("00000000" + old[0][8:], *old[1:])  # a request id from long ago

    async def main() -> int:
        link = LedgerLink(target)
        await link.open()
        try:
            await link.write(a_batch(aid, cid, [old, receipt_row(aid, cid)]))
            return await link.prune_receipts(30)
        finally:
            await link.close()

    assert run(main()) == 1
    assert db.value("SELECT COUNT(*) FROM receipts") == 1
    assert [r["id"] for r in db.query("SELECT id FROM usage_batches")] != ["old"]
    assert db.value("SELECT COUNT(*) FROM usage_batches WHERE id = 'old'") == 0


# -- PostgreSQL only ------------------------------------------------------------------------


def test_two_processes_migrating_one_database_at_once_both_succeed(postgres_url: str) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def migrate() -> None:
        try:
            start.wait()
            migrate_file(postgres_url)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with _opened(postgres_url) as d:
        assert d.schema_version() == len(PG_MIGRATIONS) and d.config_version() == 1


def test_the_link_reconnects_after_postgres_restarts_and_writes_what_it_kept() -> None:
    cluster = PostgresCluster().start()
    try:
        url = cluster.create_database("restart")
        with _opened(url) as d:
            aid, cid = customer(d, trial=1000, cents=1)

        async def main() -> None:
            link = LedgerLink(url)
            await link.open()
            try:
                assert await link.write(a_batch(aid, cid))
                await asyncio.to_thread(cluster.stop)
                kept = a_batch(aid, cid)
                with pytest.raises(Exception):  # noqa: B017 - any error: the server is gone
                    await link.write(kept)
                with pytest.raises(Exception):  # noqa: B017
                    await link.snapshot()
                await asyncio.to_thread(cluster.start)
                assert await link.write(kept)  # the next call opens a new connection
                assert not await link.write(kept)
                accs, *_ = await link.snapshot()
                assert accs[0][7] == NANO - 2 * 4000 * 300
            finally:
                await link.close()

        run(main())
        with _opened(url) as d:
            assert usage.usage(d, aid)["bytes"] == 10_000
    finally:
        cluster.destroy()


def test_a_sync_handle_reports_a_lost_server_as_a_database_error(postgres_url: str) -> None:
    from datorus_core.ledger import DatabaseError

    d = open_ledger(postgres_url)
    admin = Ledger(connect(postgres_url))
    try:
        pid = d.value("SELECT pg_backend_pid()")
        admin.execute("SELECT pg_terminate_backend(?)", (pid,))
        with pytest.raises(DatabaseError):
            d.execute("SELECT 1")
        assert d.broken
    finally:
        admin.close()
        d.close()


def _datorus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DATORUS, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def _cli(url: str, *args: str) -> dict[str, Any]:
    r = _datorus("--db", url, *args, "--json")
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_the_cli_on_a_postgresql_url(postgres_cluster: PostgresCluster) -> None:
    url = postgres_cluster.create_database("cli")
    # any command but init on a database with no ledger in it: like a missing file
    r = _datorus("--db", url, "account", "list")
    assert r.returncode == 1 and "No ledger at" in r.stderr and "datorus init" in r.stderr
    r = _datorus("--db", url, "init", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"db": url, "schemaVersion": len(MIGRATIONS), "created": True}
    again = json.loads(_datorus("--db", url, "init", "--json").stdout)
    assert again["created"] is False
    acc = _cli(url, "account", "create", "a@example.com")
    cred = json.loads(
        _datorus("--db", url, "credential", "create", str(acc["id"]), "--json").stdout
    )
    assert cred["accountId"] == acc["id"]
    r = _datorus("--db", url, "account", "create", "A@EXAMPLE.com", "--json")
    assert r.returncode == 1 and json.loads(r.stderr)["error"]["code"] == "EMAIL_TAKEN"
    used = _cli(url, "usage", str(acc["id"]))
    assert used["bytes"] == 0 and used["requests"] == 0


def test_the_cli_says_a_missing_database_must_be_created_and_hides_the_password(
    postgres_cluster: PostgresCluster,
) -> None:
    url = f"postgresql://postgres:s3cret@127.0.0.1:{postgres_cluster.port}/no_such_db"
    r = _datorus("--db", url, "init")
    assert r.returncode == 1
    assert "s3cret" not in r.stderr + r.stdout
    assert "postgresql://postgres:********@127.0.0.1" in r.stderr
    assert "does not exist" in r.stderr and "createdb" in r.stderr
    r = _datorus("--db", url, "init", "--json")
    err = json.loads(r.stderr)["error"]
    assert r.returncode == 1 and err["code"] == "SERVICE_UNAVAILABLE" and "s3cret" not in r.stderr
    # nothing listens there: unreachable
    dead = "postgresql://postgres@127.0.0.1:1/x"
    r = _datorus("--db", dead, "account", "list")
    assert (
        r.returncode == 1
        and "Cannot open the ledger at postgresql://postgres@127.0.0.1:1/x" in (r.stderr)
    )


def test_the_api_store_opens_a_new_connection_after_the_server_dropped_its_own(
    postgres_url: str,
) -> None:
    from datorus_core.api.store import Store
    from datorus_core.ledger import DatabaseError

    store = Store(postgres_url)
    db = store.db()
    assert store.db() is db and len(store.ledger_id) == 16
    with _opened(postgres_url) as admin:
        admin.execute("SELECT pg_terminate_backend(?)", (db.value("SELECT pg_backend_pid()"),))
    with pytest.raises(DatabaseError):  # this request gets the API's 503
        db.execute("SELECT 1")
    fresh = store.db()  # the thread's next request
    assert fresh is not db and fresh.value("SELECT 1") == 1
    assert Store(postgres_url).ledger_id == store.ledger_id


def test_a_url_libpq_cannot_parse_never_shows_its_password() -> None:
    # libpq quotes the bad part of a URL in its message: here, the password
    from datorus_core.ledger import postgres
    from datorus_core.ledger.errors import PostgresError

    url = "postgresql://u:p%zzs3cret@127.0.0.1:1/x"
    with pytest.raises(PostgresError) as e:
        postgres.connect(url, timeout=1)
    assert "s3cret" not in str(e.value) and "zz" not in str(e.value)
