"""``datorus ledger copy --from PATH --to URL``: a SQLite ledger moved into PostgreSQL.

A real gateway fills a SQLite ledger with traffic (a credential's requests with their
receipts, an acceptable-use denial, health checks of the egress pool), the real CLI
and REST API add top-ups, a correction, a lease and API keys; the real CLI copies the
file into a database of the tests' PostgreSQL cluster. Every table must come out
identical, column by column, and a gateway started on the copy must serve the same
credential and bill on top of the copied balance, its new rows getting new ids. The
refusals (a destination holding a ledger, a URL that is not PostgreSQL's, a file that
is missing or no SQLite ledger, a copy that does not verify) exit 1 with one sentence,
or the envelope with ``--json``, and write nothing.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import requests
from support.counting import RawOrigin
from support.ledger import cli, prepare_ledger
from support.paths import DATORUS
from support.postgres import PostgresCluster
from support.processes import Gateway
from support.waiting import free_port, wait_http, wait_until

from datorus_core.ledger.schema import MIGRATIONS

NANO = 10**9
PASSWORD = "s3cret-copy"


@pytest.fixture(scope="module")
def raw_origin() -> Iterator[RawOrigin]:
    o = RawOrigin()
    yield o
    o.close()


def with_password(url: str) -> str:
    """*url* with a password in it (the cluster trusts loopback, so any password works)."""
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def masked(url: str) -> str:
    return url.replace(f":{PASSWORD}@", ":********@", 1)


def copy(*args: str) -> subprocess.CompletedProcess[str]:
    """``datorus ledger copy ARGS`` as an operator types it (no --db)."""
    return subprocess.run(
        [DATORUS, "ledger", "copy", *args], capture_output=True, text=True, timeout=120
    )


def get(gw: Gateway, user: str, password: str, url: str) -> requests.Response:
    with requests.Session() as s:
        return s.get(url, proxies={"http": gw.proxy(user, password)}, timeout=30)


# -- reading both ledgers, every column ---------------------------------------------------


def sqlite_tables(path: Path) -> dict[str, list[str]]:
    """Each table of the SQLite ledger and its primary-key columns."""
    with sqlite3.connect(path) as c:
        names = [
            r[0]
            for r in c.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {
            t: [
                r[1]
                for r in sorted(c.execute(f'PRAGMA table_info("{t}")'), key=lambda r: r[5])
                if r[5]
            ]  # fmt: skip
            for t in names
        }


def norm(value: Any) -> Any:
    """One Python type per value, whichever driver read it."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def rows_of(conn: Any, table: str, key: list[str]) -> tuple[list[str], list[tuple[Any, ...]]]:
    cur = conn.execute(f'SELECT * FROM "{table}" ORDER BY {", ".join(key)}')
    names = [d[0] for d in cur.description]
    return names, [tuple(norm(v) for v in row) for row in cur.fetchall()]


def every_row(sqlite_path: Path, url: str) -> dict[str, tuple[list[dict], list[dict]]]:
    """Every table's rows in both ledgers, as dicts by column name, in key order."""
    out = {}
    with sqlite3.connect(sqlite_path) as s, psycopg.connect(url) as p:
        for table, key in sqlite_tables(sqlite_path).items():
            both = []
            for conn in (s, p):
                names, rows = rows_of(conn, table, key)
                both.append([dict(zip(names, r, strict=True)) for r in rows])
            out[table] = (both[0], both[1])
    return out


def max_id(path: Path, table: str) -> int:
    with sqlite3.connect(path) as c:
        return int(c.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0])


def count(path: Path, sql: str) -> int:
    with sqlite3.connect(path) as c:
        return int(c.execute(sql).fetchone()[0])


# -- a ledger with traffic in it ----------------------------------------------------------


def busy_ledger(db: Path, raw_origin: RawOrigin) -> dict[str, Any]:
    """A SQLite ledger a real gateway has served: returns the customer and what moved."""
    prepare_ledger(db)
    for source in ("127.0.0.2", "127.0.0.3"):  # two ways out, so one can be leased
        cli(db, "egress", "add", f"direct://{source}")
    acc = cli(db, "account", "create", "copy@example.com", "--trial-bytes", "5000")
    aid = str(acc["id"])
    cli(db, "balance", "add", aid, "100", "--reason", "bank transfer")
    cli(db, "balance", "add", aid, "-10", "--reason", "entered twice")
    cred = cli(db, "credential", "create", aid, "--label", "main")
    cli(db, "credential", "create", aid, "--max-bytes", "123456")  # a second, unused
    key = cli(db, "key", "create", aid, "--label", "ops")["key"]
    other = cli(db, "account", "create", "idle@example.com", "--trial-bytes", "777")
    cli(db, "key", "create", str(other["id"]))
    cli(db, "policy", "deny", "blocked.example")
    cli(db, "key", "create", "--operator", "--label", "ops")
    cli(db, "source", "add", "http://127.0.0.1:9/list.txt", "--parser", "plaintext",
        "--cron", "*/30 * * * *", "--tag", "tier=a", "--disabled")  # fmt: skip
    user, pw = cred["username"], cred["password"]
    api = free_port()
    gw = Gateway(db, {"api_port": api, "flush_ms": 20, "egress_check_seconds": 1})
    gw.start()
    try:
        wait_http(gw.api_url + "/health", proc=gw.proc)
        gw.wait_for_credential(user, pw)

        def both_active() -> bool:  # a new egress carries nothing until its checks pass
            got = httpx.get(
                f"{gw.api_url}/proxies",
                params={"status": "active"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            return got.status_code == 200 and got.json()["total_count"] == 2

        wait_until(both_active, 20, 0.05, "both egress checked and active")

        def both_routed() -> bool:  # the gateway reads the checks' results every 0.5 s
            got = httpx.get(
                f"{gw.api_url}/debug/pick",
                params={"url": raw_origin.url("/")},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            return got.status_code == 200 and len(got.json()["candidates"]) == 2

        wait_until(both_routed, 10, 0.05, "both egress in the gateway's pool")
        lease = httpx.post(
            f"{gw.api_url}/proxies/acquire",
            json={"lease_duration_seconds": 600},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert lease.status_code == 200, lease.text
        before = len(raw_origin.conns)
        for n in (1000, 2000, 3000, 4000):
            r = get(gw, user, pw, raw_origin.url(f"/bytes/{n}"))
            assert r.status_code == 200 and len(r.content) == n
        denied = get(gw, user, pw, "http://169.254.169.254/latest/meta-data/")
        assert denied.status_code == 403
        moved = sum(c["in"] + c["out"] for c in raw_origin.conns[before:])
        wait_until(
            lambda: (
                count(db, "SELECT count(*) FROM receipts") == 4
                and count(db, "SELECT count(*) FROM aup_denials") == 1
                and count(db, "SELECT count(*) FROM egress_checks") >= 2
            ),
            20,
            0.05,
            "the receipts, the denial and the health checks written",
        )
    finally:
        assert gw.stop() == 0
    return {"id": acc["id"], "user": user, "password": pw, "moved": moved}


def test_a_ledger_with_traffic_copies_whole_and_a_gateway_bills_on_from_the_copy(
    postgres_cluster: PostgresCluster, raw_origin: RawOrigin, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.db"
    c = busy_ledger(db, raw_origin)
    aid = str(c["id"])
    used = cli(db, "usage", aid)
    assert used["requests"] == 4 and used["bytes"] == c["moved"]  # the 403 is not billed
    url = with_password(postgres_cluster.create_database("copy"))
    cli(url, "init")  # a database that 'datorus init' made

    done = copy("--from", str(db), "--to", url, "--json")
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["to"] == masked(url) and summary["from"] == str(db.resolve())
    assert summary["schemaVersion"] == len(MIGRATIONS) and summary["accounts"] == 2

    # every table, every column, every row: identical
    tables = every_row(db, url)
    assert {t["table"]: t["rows"] for t in summary["tables"]} == {
        t: len(rows[0]) for t, rows in tables.items()
    }
    assert summary["rows"] == sum(len(rows[0]) for rows in tables.values())
    for table, (theirs, ours) in tables.items():
        assert ours == theirs, table
    filled = {t for t, rows in tables.items() if rows[0]}
    assert {"transactions", "balances", "receipts", "usage_daily", "credential_usage",
            "leases", "egress", "egress_checks", "aup_denials", "api_keys", "api_secrets",
            "usage_batches", "policy_rules", "credentials", "accounts",
            "sources"} <= filled  # fmt: skip
    kinds = {r["kind"] for r in tables["transactions"][0]}
    assert kinds == {"trial_grant", "topup", "adjustment", "usage"}
    total = sum(r["nanocents"] for r in tables["balances"][0])
    assert summary["balanceNanocents"] == total and summary["balanceCents"] == total // NANO

    # every balance, as the CLI shows it, from either ledger
    assert cli(url, "account", "list") == cli(db, "account", "list")
    assert cli(url, "usage", aid) == used

    # a gateway on the copy serves the same credential and bills on top of the copy
    ids = {t: max_id(db, t) for t in ("transactions", "accounts", "credentials", "api_keys",
                                      "policy_rules", "egress", "aup_denials")}  # fmt: skip
    gw = Gateway(tmp_path / "unused.db", {"db": url, "flush_ms": 20}, set_db=False)
    gw.start()
    try:
        gw.wait_for_credential(c["user"], c["password"])
        before = len(raw_origin.conns)
        r = get(gw, c["user"], c["password"], raw_origin.url("/bytes/50000"))
        assert r.status_code == 200 and len(r.content) == 50000
        rid = r.headers["X-Datorus-Request-Id"]
        conn = raw_origin.conns[before]
        moved = conn["in"] + conn["out"]

        def receipt() -> dict | None:
            got = cli(url, "receipt", rid, check=False)
            return got if "requestId" in got else None

        rec = wait_until(receipt, 10, 0.05, f"receipt {rid}")
        assert (rec["bytesUp"], rec["bytesDown"]) == (conn["in"], conn["out"])
        assert rec["trialBytes"] == 0 and rec["nanocents"] == moved * 300  # the trial is spent
        after = cli(url, "usage", aid)
        assert after["requests"] == used["requests"] + 1
        assert after["bytes"] == used["bytes"] + moved
        assert after["chargedNanocents"] == used["chargedNanocents"] + moved * 300
        assert after["balanceNanocents"] == used["balanceNanocents"] - moved * 300
        denied = get(gw, c["user"], c["password"], "http://blocked.example/")
        assert denied.status_code == 403  # the copied deny rule holds

        def denials() -> int:
            with psycopg.connect(url) as p:
                return int(p.execute("SELECT count(*) FROM aup_denials").fetchone()[0])

        wait_until(lambda: denials() == 2, 10, 0.05, "the denial recorded")
    finally:
        assert gw.stop() == 0
    assert PASSWORD not in gw.log.read_text()

    # new rows get new ids: every identity sequence is past the copied rows
    with psycopg.connect(url) as p:
        new_tx = [r[0] for r in p.execute("SELECT id FROM transactions WHERE id > %s",
                                          (ids["transactions"],))]  # fmt: skip
        denial = p.execute("SELECT max(id) FROM aup_denials").fetchone()[0]
    assert new_tx == [ids["transactions"] + 1]  # the one flushed usage row
    assert denial == ids["aup_denials"] + 1
    acc = cli(url, "account", "create", "new@example.com")
    assert acc["id"] == ids["accounts"] + 1
    assert cli(url, "credential", "create", str(acc["id"]))["id"] == ids["credentials"] + 1
    assert cli(url, "key", "create", str(acc["id"]))["id"] == ids["api_keys"] + 1
    cli(url, "policy", "allow", "10.9.0.0/16")
    with psycopg.connect(url) as p:
        rule = p.execute("SELECT id FROM policy_rules WHERE target = '10.9.0.0/16'").fetchone()
    assert rule[0] == ids["policy_rules"] + 1
    assert cli(url, "egress", "add", "direct://127.0.0.9")["id"] == ids["egress"] + 1
    topup = cli(url, "balance", "add", str(acc["id"]), "5")
    assert topup["balanceNanocents"] == 5 * NANO
    history = cli(url, "balance", "history", str(acc["id"]))["items"]
    assert [h["id"] for h in history] == [ids["transactions"] + 3, ids["transactions"] + 2]


# -- refusals: nothing written ------------------------------------------------------------


def small_ledger(db: Path) -> None:
    cli(db, "init")
    acc = cli(db, "account", "create", "small@example.com", "--trial-bytes", "10")
    cli(db, "balance", "add", str(acc["id"]), "3")


def test_a_destination_that_holds_a_ledger_is_refused_and_left_as_it_was(
    postgres_url: str, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.db"
    small_ledger(db)
    url = with_password(postgres_url)
    cli(url, "init")
    cli(url, "account", "create", "there@example.com", "--trial-bytes", "5")
    before = cli(url, "account", "list")
    held = "accounts 1, transactions 1, balances 1"
    done = copy("--from", str(db), "--to", url)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"The database {masked(url)} already holds a ledger ({held}): the copy goes only into"
        " an empty database (createdb NAME) or one that only 'datorus init' has touched."
        " Nothing was written.\n"
    )
    done = copy("--from", str(db), "--to", url, "--json")
    assert done.returncode == 1 and done.stdout == ""
    err = json.loads(done.stderr)["error"]
    assert err["code"] == "VALIDATION_ERROR"
    assert err["details"] == {"field": "to", "reason": f"already holds a ledger ({held})"}
    assert PASSWORD not in done.stderr
    assert cli(url, "account", "list") == before
    assert cli(url, "policy", "list")["items"] == []


@pytest.mark.parametrize(
    ("to", "shown_as"),
    [
        (f"mysql://root:{PASSWORD}@127.0.0.1/ledger", "mysql://root:********@127.0.0.1/ledger"),
        ("other.db", "other.db"),
    ],
)
def test_a_destination_that_is_not_a_postgresql_url_is_refused(
    tmp_path: Path, to: str, shown_as: str
) -> None:
    db = tmp_path / "ledger.db"
    small_ledger(db)
    done = copy("--from", str(db), "--to", to)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"--to must be a postgresql:// URL, not {shown_as}.\n"
    done = copy("--from", str(db), "--to", to, "--json")
    assert done.returncode == 1
    err = json.loads(done.stderr)["error"]
    assert (err["code"], err["details"]) == (
        "VALIDATION_ERROR",
        {"field": "to", "reason": "must be a postgresql:// URL"},
    )
    assert not (tmp_path / "other.db").exists()


def test_a_source_that_is_missing_or_no_sqlite_ledger_is_refused(
    postgres_url: str, tmp_path: Path
) -> None:
    url = with_password(postgres_url)
    missing = tmp_path / "missing.db"
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 10)
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE t (x)").connection.close()
    cases = [
        (missing, "does not exist", f"--from {missing}: the file does not exist."
         " Name the SQLite ledger to copy."),
        (text, "is not a SQLite database", f"--from {text} is not a SQLite database."
         " Name the SQLite ledger to copy."),
        (empty, "holds no Datorus ledger", f"--from {empty} is a SQLite database but holds"
         " no Datorus ledger."),
        (url, "must be a SQLite file path", f"--from must be the path of a SQLite ledger"
         f" file, not {masked(url)}."),
    ]  # fmt: skip
    for source, reason, message in cases:
        done = copy("--from", str(source), "--to", url)
        assert (done.returncode, done.stdout, done.stderr) == (1, "", message + "\n")
        done = copy("--from", str(source), "--to", url, "--json")
        assert done.returncode == 1
        err = json.loads(done.stderr)["error"]
        assert (err["code"], err["details"]) == (
            "VALIDATION_ERROR",
            {"field": "from", "reason": reason},
        )
    assert not missing.exists()
    with psycopg.connect(postgres_url) as p:  # not even the tables were made
        assert p.execute("SELECT to_regclass('accounts')").fetchone()[0] is None


def test_a_copy_that_does_not_verify_is_rolled_back_tables_and_all(
    postgres_url: str, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.db"
    small_ledger(db)
    with sqlite3.connect(db) as s:  # a balances cache that disagrees with its transactions
        s.execute("UPDATE balances SET nanocents = nanocents + 7 WHERE account_id = 1")
    url = with_password(postgres_url)  # an empty database: the copy migrates it
    done = copy("--from", str(db), "--to", url)
    assert done.returncode == 1 and done.stdout == ""
    have = 3 * NANO + 7
    assert done.stderr == (
        f"The copy did not verify: account 1: nanocents {have} in the copy, {have - 7} in the"
        " sum of the copied transactions. It was rolled back: nothing was written.\n"
    )
    with psycopg.connect(postgres_url) as p:
        assert p.execute("SELECT to_regclass('accounts')").fetchone()[0] is None
        assert p.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None
    got = cli(url, "account", "list", check=False)
    assert got["error"]["code"] == "SERVICE_UNAVAILABLE"  # no ledger there: nothing written


def test_a_database_that_does_not_exist_is_named_with_the_next_step(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.db"
    small_ledger(db)
    url = with_password(postgres_cluster.url("no_such_database"))
    done = copy("--from", str(db), "--to", url)
    assert done.returncode == 1 and done.stdout == "" and PASSWORD not in done.stderr
    assert done.stderr.startswith(f"The copy into {masked(url)} failed: connection failed:")
    assert done.stderr.endswith(
        'database "no_such_database" does not exist. Nothing was written. Create the database'
        " first (createdb NAME, or CREATE DATABASE).\n"
    )
    err = json.loads(copy("--from", str(db), "--to", url, "--json").stderr)["error"]
    assert err["code"] == "SERVICE_UNAVAILABLE" and err["details"]["to"] == masked(url)
