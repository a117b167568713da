"""Allow-listed addresses in the ledger, on SQLite and on PostgreSQL: revoking a credential
frees its CIDRs, entry and source ids are never reused, and migration 14 repairs a ledger
whose revoked credentials still hold CIDRs (probe 8, items 2 and 18)."""

from __future__ import annotations

import pytest

from datorus_core.ledger import accounts, open_ledger, schema, schema_postgres
from datorus_core.ledger import allowed_ips as la
from datorus_core.ledger import sources as ls
from datorus_core.ledger.target import is_postgres


def test_revoking_a_credential_frees_its_cidrs_for_another(ledger_target: str) -> None:
    d = open_ledger(ledger_target)
    aid = accounts.create_account(d, "a@example.com", trial_bytes=0)["id"]
    gone = accounts.create_credential(d, aid)["username"]
    live = accounts.create_credential(d, aid)["username"]
    la.allow_ip(d, gone, "198.51.100.0/24")
    accounts.revoke_credential(d, gone)
    assert la.list_allowed_ips(d) == []
    assert la.allow_ip(d, live, "198.51.100.0/24")["username"] == live
    d.close()


def test_migration_14_removes_revoked_credentials_entries_and_ids_are_never_reused(
    ledger_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = schema_postgres if is_postgres(ledger_target) else schema
    monkeypatch.setattr(module, "MIGRATIONS", module.MIGRATIONS[:13])
    d = open_ledger(ledger_target)
    assert d.schema_version() == 13
    aid = accounts.create_account(d, "m@example.com", trial_bytes=0)["id"]
    gone = accounts.create_credential(d, aid)["username"]
    live = accounts.create_credential(d, aid)["username"]
    kept = la.allow_ip(d, live, "192.0.2.0/24")
    la.allow_ip(d, gone, "127.0.0.1/32")
    # what a revocation before this change left: the credential revoked, its entry kept
    d.execute(
        "UPDATE credentials SET revoked_at = '2026-01-01T00:00:00Z' WHERE username = ?", (gone,)
    )
    assert len(la.list_allowed_ips(d)) == 2
    s1 = ls.add_source(d, {"url": "http://127.0.0.1:1/a.txt", "tags": {"k": "v"}})
    s2 = ls.add_source(d, {"url": "http://127.0.0.1:1/b.txt"})
    monkeypatch.undo()
    assert d.migrate() == d.schema_version() == len(module.MIGRATIONS) >= 14
    # rows and ids kept, the revoked credential's entry gone
    assert [(e["id"], e["cidr"]) for e in la.list_allowed_ips(d)] == [(kept["id"], "192.0.2.0/24")]
    assert ls.get_source(d, s1["id"]) == s1
    # the newest entry and source deleted: the next ones get new ids
    newest = la.allow_ip(d, live, "127.0.0.1/32")
    la.delete_entry(d, aid, live, newest["id"])
    assert la.allow_ip(d, live, "203.0.113.0/24")["id"] > newest["id"]
    ls.delete_source(d, s2["id"])
    assert ls.add_source(d, {"url": "http://127.0.0.1:1/c.txt"})["id"] > s2["id"]
    d.close()
