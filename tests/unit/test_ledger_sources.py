"""Operator keys and proxy-list sources in the ledger, on SQLite and on PostgreSQL (issue 17).

Every test takes ``db`` (or ``target``), run once on a SQLite file and once on a fresh
database of the tests' own PostgreSQL cluster (``postgres_url``, as in
``test_ledger_postgres.py``): migration 9, operator keys, the sources' rows, the claims
that make a scheduled run happen once, and the import of what a list names.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from datorus_core.envelope import DatorusError
from datorus_core.ledger import Ledger, accounts, connect, open_ledger, schema, schema_postgres
from datorus_core.ledger import api as ledger_api
from datorus_core.ledger import egress as ledger_egress
from datorus_core.ledger import sources as ls
from datorus_core.ledger.target import is_postgres
from datorus_core.sources.found import FoundProxy

NOW = 1_800_000_000


@pytest.fixture
def target(ledger_target: str) -> str:
    """A fresh ledger on each backend in turn (conftest's ``ledger_target``)."""
    return ledger_target


@pytest.fixture
def db(target: str) -> Iterator[Ledger]:
    d = open_ledger(target)
    yield d
    d.close()


def source(db: Ledger, **over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "url": "http://127.0.0.1:1/list.txt",
        "parser_name": "plaintext",
        "cron_schedule": "*/5 * * * *",
        "default_protocol": "http",
        "default_country": "DE",
        "default_weight": 2,
        "tags": {"provider": "dc"},
        "enabled": True,
        "next_run_at": NOW,
        **over,
    }
    return ls.add_source(db, fields)


def found(*urls: str) -> list[FoundProxy]:
    out = []
    for u in urls:
        scheme, rest = u.split("://")
        auth, _, hostport = rest.rpartition("@")
        host, port = hostport.rsplit(":", 1)
        user, _, pw = auth.partition(":")
        out.append(FoundProxy(scheme, host, int(port), user or None, pw or None))
    return out


# -- migration 9 and operator keys ----------------------------------------------------------


def test_migration_9_keeps_every_api_key_and_its_id(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite rebuilds api_keys to drop a NOT NULL; PostgreSQL alters it: keys survive."""
    module = schema_postgres if is_postgres(target) else schema
    monkeypatch.setattr(module, "MIGRATIONS", module.MIGRATIONS[:8])
    d = open_ledger(target)
    assert d.schema_version() == 8
    aid = accounts.create_account(d, "k@example.com", trial_bytes=0)["id"]
    insert = "INSERT INTO api_keys (account_id, prefix, key_hash, label) VALUES (?, ?, ?, ?)"
    d.execute(insert + " RETURNING id", (aid, "pp_a", "hash-a", "one")).fetchall()
    kid = d.insert(insert + " RETURNING id", (aid, "pp_b", "hash-b", "two"))
    ledger_api.revoke_api_key(d, aid, kid)
    monkeypatch.undo()
    assert d.migrate() == d.schema_version() == len(module.MIGRATIONS) >= 9
    rows = ledger_api.api_keys(d, aid)
    assert [(r["prefix"], r["operator"], r["revoked_at"] is None) for r in rows] == [
        ("pp_a", 0, True),
        ("pp_b", 0, False),
    ]
    assert ledger_api.live_api_key(d, "hash-a")["account_id"] == aid
    assert ledger_api.live_api_key(d, "hash-b") is None
    d.close()


def test_an_operator_key_belongs_to_no_account(db: Ledger) -> None:
    aid = accounts.create_account(db, "c@example.com", trial_bytes=0)["id"]
    customer = ledger_api.add_api_key(db, aid, "pp_c", "hash-c", None)
    op = ledger_api.add_api_key(db, None, "pp_o", "hash-o", "ops")
    assert (op["operator"], op["account_id"]) == (1, None)
    live = ledger_api.live_api_key(db, "hash-o")
    assert live is not None and (live["operator"], live["account_id"]) == (1, None)
    assert ledger_api.live_api_key(db, "hash-c")["operator"] == 0
    assert [k["id"] for k in ledger_api.operator_keys(db)] == [op["id"]]
    assert ledger_api.api_key_owner(db, op["id"]) is None
    assert not ledger_api.revoke_api_key(db, aid, op["id"])  # not the account's
    assert not ledger_api.revoke_operator_key(db, customer["id"])  # not an operator key
    assert ledger_api.revoke_operator_key(db, op["id"])
    assert ledger_api.revoke_operator_key(db, op["id"])  # idempotent
    assert ledger_api.live_api_key(db, "hash-o") is None


# -- the rows -------------------------------------------------------------------------------


def test_a_source_is_added_read_changed_listed_and_removed(db: Ledger) -> None:
    src = source(db)
    view = ls.source_view(ls.get_source(db, src["id"]), NOW)
    assert view["url"] == "http://127.0.0.1:1/list.txt" and view["tags"] == {"provider": "dc"}
    assert view["is_active"] is True and view["proxies"] == 0
    assert view["next_run_at"] == "2027-01-15T08:00:00Z" and view["scraping"] is False
    assert view["last_scraped_at"] is None and view["created_at"]
    other = source(db, url="http://127.0.0.1:2/b.json", enabled=False, cron_schedule=None)
    rows, total = ledger_api.page(db, ls.SOURCES_SQL, [], 0, 1)
    assert total == 2 and [r["id"] for r in rows] == [src["id"], other["id"]]  # limit + 1
    rows, total = ledger_api.page(db, ls.SOURCES_BY_STATE_SQL, [0], 0, 10)
    assert total == 1 and rows[0]["id"] == other["id"]
    assert ls.source_view(rows[0], NOW)["next_run_at"] is None  # off: no next run

    changed = ls.update_source(db, src["id"], {"name": "provider A", "default_weight": 5})
    assert (changed["name"], changed["default_weight"]) == ("provider A", 5)
    assert changed["updated_at"] is not None and changed["next_run_at"] == NOW
    again = ls.update_source(db, src["id"], {"cron_schedule": "0 * * * *"}, lambda c: 42)
    assert (again["cron_schedule"], again["next_run_at"]) == ("0 * * * *", 42)
    on = ls.update_source(db, other["id"], {"enabled": True}, lambda c: 7 if c is None else 8)
    assert on["enabled"] == 1 and on["next_run_at"] == 7  # enabling sets the next run

    assert ls.delete_source(db, src["id"]) == {"id": src["id"], "removed": True, "proxies_kept": 0}
    for call in (
        lambda: ls.get_source(db, src["id"]),
        lambda: ls.update_source(db, src["id"], {"name": "x"}),
        lambda: ls.delete_source(db, src["id"]),
    ):
        with pytest.raises(DatorusError) as e:
            call()
        assert e.value.code == "RESOURCE_NOT_FOUND" and e.value.details == {"source": src["id"]}


def test_source_stats_count_sources_and_the_last_scrape(db: Ledger) -> None:
    assert ls.source_stats(db) == {"sources_total": 0, "sources_active": 0, "last_scrape_at": None}
    a = source(db)
    source(db, enabled=False)
    assert ls.claim(db, a["id"], "me", NOW, NOW + 60, due=False)
    ls.finish(db, a["id"], "me", ls.Outcome(None, 3, 3, 12))
    stats = ls.source_stats(db)
    assert (stats["sources_total"], stats["sources_active"]) == (2, 1)
    assert stats["last_scrape_at"] == ls.get_source(db, a["id"])["last_scraped_at"] is not None


# -- claims ---------------------------------------------------------------------------------


def test_a_due_source_is_claimed_once_and_finishing_sets_its_next_run(db: Ledger) -> None:
    due = source(db, next_run_at=NOW - 5)
    later = source(db, next_run_at=NOW + 60)
    off = source(db, next_run_at=NOW - 5, enabled=False)
    manual = source(db, next_run_at=None, cron_schedule=None)
    assert ls.due_sources(db, NOW, 10) == [due["id"]]
    assert not ls.claim(db, later["id"], "a", NOW, NOW + 300, due=True)  # not due
    assert not ls.claim(db, off["id"], "a", NOW, NOW + 300, due=True)  # disabled
    assert not ls.claim(db, manual["id"], "a", NOW, NOW + 300, due=True)  # unscheduled
    assert ls.claim(db, due["id"], "a", NOW, NOW + 300, due=True)
    assert not ls.claim(db, due["id"], "b", NOW, NOW + 300, due=True)  # held
    assert not ls.claim(db, due["id"], "b", NOW, NOW + 300, due=False)  # held, on request too
    assert ls.due_sources(db, NOW, 10) == []  # held sources are not offered
    assert ls.source_view(ls.get_source(db, due["id"]), NOW)["scraping"] is True

    assert not ls.finish(db, due["id"], "b", ls.Outcome(None, 1, 1, 5))  # not b's
    seen: list[str | None] = []

    def next_run(cron: str | None) -> int:
        seen.append(cron)
        return NOW + 300

    assert ls.finish(db, due["id"], "a", ls.Outcome(None, 9, 4, 120), next_run)
    assert seen == ["*/5 * * * *"]
    row = ls.get_source(db, due["id"])
    assert (row["claimed_by"], row["claim_until"], row["next_run_at"]) == (None, None, NOW + 300)
    assert (row["last_found"], row["last_new"], row["last_duration_ms"]) == (9, 4, 120)
    assert row["last_error"] is None and row["last_scraped_at"] is not None
    assert ls.due_sources(db, NOW, 10) == []  # not replayed: the next run is later


def test_a_failed_scrape_keeps_the_last_counts_and_an_expired_claim_is_free(db: Ledger) -> None:
    src = source(db)
    assert ls.claim(db, src["id"], "a", NOW, NOW + 300, due=False)
    ls.finish(db, src["id"], "a", ls.Outcome(None, 5, 5, 10))
    assert ls.claim(db, src["id"], "a", NOW, NOW + 300, due=False)
    ls.finish(db, src["id"], "a", ls.Outcome("the list answered 500", duration_ms=7))
    row = ls.get_source(db, src["id"])
    assert row["last_error"] == "the list answered 500"
    assert (row["last_found"], row["last_new"], row["last_duration_ms"]) == (5, 5, 7)
    assert row["next_run_at"] == NOW  # a scrape on request leaves the schedule alone
    # a process that died holding a claim: free once claim_until passes
    assert ls.claim(db, src["id"], "dead", NOW, NOW + 10, due=False)
    assert not ls.claim(db, src["id"], "b", NOW + 9, NOW + 300, due=False)
    assert ls.claim(db, src["id"], "b", NOW + 10, NOW + 300, due=False)
    ls.release(db, src["id"], "dead")  # not its claim any more: nothing happens
    assert ls.get_source(db, src["id"])["claimed_by"] == "b"
    ls.release(db, src["id"], "b")
    assert ls.get_source(db, src["id"])["claim_until"] is None


def test_of_many_processes_claiming_a_due_run_at_once_exactly_one_wins(target: str) -> None:
    setup = open_ledger(target)
    sid = source(setup, next_run_at=NOW - 1)["id"]
    setup.close()
    n = 8
    barrier = threading.Barrier(n)
    wins: list[str] = []
    errors: list[BaseException] = []

    def contend(i: int) -> None:
        d = Ledger(connect(target))
        try:
            barrier.wait(10)
            if ls.claim(d, sid, f"p{i}", NOW, NOW + 300, due=True):
                wins.append(f"p{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            d.close()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(wins) == 1
    check = open_ledger(target)
    assert ls.get_source(check, sid)["claimed_by"] == wins[0]
    check.close()


# -- what a list names ----------------------------------------------------------------------


def test_found_proxies_join_the_pool_unchecked_with_the_sources_defaults(db: Ledger) -> None:
    src = source(db)
    proxies = found("http://10.0.0.1:3128", "socks5://u:p@10.0.0.2:1080", "socks4://10.0.0.9:1080")
    before = db.config_version()
    out = ls.import_found(db, src["id"], proxies, "DE", 2, {"provider": "dc"})
    unsupported = 0 if _pool_carries_socks4() else 1
    assert (out.new, out.updated, out.unsupported) == (3 - unsupported, 0, unsupported)
    assert db.config_version() > before  # a running gateway reloads its pool
    rows = {r["url"]: r for r in ledger_egress.list_egress(db)}
    new = rows["http://10.0.0.1:3128"]
    assert (new["status"], new["sourceId"], new["country"], new["weight"]) == (
        "unchecked",  # no traffic until its checks pass
        src["id"],
        "de",
        2,
    )
    assert new["enabled"] is True
    assert new["tags"] == {"provider": "dc"} and new["lastCheckedAt"] is None
    assert rows["socks5://u:***@10.0.0.2:1080"]["kind"] == "socks5"
    assert ls.get_source(db, src["id"])["proxies"] == 3 - unsupported


def test_a_second_scrape_updates_what_is_known_and_writes_nothing_unchanged(db: Ledger) -> None:
    src = source(db)
    hand = ledger_egress.add_egress(db, "http://10.0.0.5:8080", "fr", 9)  # the operator's
    first = found("http://10.0.0.1:3128", "http://a:old@10.0.0.3:80")
    ls.import_found(db, src["id"], first, "DE", 2, {})
    version = db.config_version()
    same = ls.import_found(db, src["id"], first, "DE", 2, {})
    assert (same.new, same.updated, same.changed) == (0, 2, 0)
    assert db.config_version() == version  # nothing rewritten
    again = found("http://10.0.0.1:3128", "http://a:new@10.0.0.3:80", "http://10.0.0.5:8080")
    out = ls.import_found(db, src["id"], again, "DE", 3, {"t": "1"})
    assert (out.new, out.updated, out.changed) == (0, 3, 2)
    rows = {r["id"]: r for r in ledger_egress.list_egress(db)}
    assert len(rows) == 3
    creds = db.value("SELECT url FROM egress WHERE url LIKE ?", ("%10.0.0.3%",))
    assert creds == "http://a:new@10.0.0.3:80"  # the list's new password
    assert rows[hand["id"]]["weight"] == 9 and rows[hand["id"]]["sourceId"] is None  # untouched
    assert rows[hand["id"]]["enabled"] is True


def test_deleting_a_source_keeps_its_proxies(db: Ledger) -> None:
    src = source(db)
    ls.import_found(db, src["id"], found("http://10.0.0.1:3128"), None, 1, {})
    assert ls.delete_source(db, src["id"])["proxies_kept"] == 1
    (row,) = ledger_egress.list_egress(db)
    assert row["sourceId"] == src["id"] and json.dumps(row["tags"]) == "{}"


def _pool_carries_socks4() -> bool:
    from datorus_core.egress import parse_egress_url

    try:
        parse_egress_url("socks4://10.0.0.9:1080")
    except ValueError:
        return False
    return True
