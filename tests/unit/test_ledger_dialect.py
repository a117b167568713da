"""The ledger's statements are written once and render for every dialect.

A PostgreSQL backend (a later issue) is a second :class:`Dialect`, not a second copy of
the queries: every statement constant of the ledger package renders to text with no
token left and the dialect's own placeholders.
"""

from __future__ import annotations

import importlib
import pkgutil
import sqlite3

import pytest

import datorus_core.ledger as ledger_pkg
from datorus_core.ledger.dialect import POSTGRES, SQLITE

VERBS = {"SELECT", "INSERT", "UPDATE", "DELETE"}


def _statements() -> list[tuple[str, str]]:
    out = []
    for info in pkgutil.iter_modules(ledger_pkg.__path__):
        mod = importlib.import_module(f"datorus_core.ledger.{info.name}")
        for name, value in vars(mod).items():
            named = name.endswith("_SQL") or (name.startswith("_") and name.isupper())
            if named and isinstance(value, str) and value.split()[0].upper() in VERBS:
                out.append((f"{info.name}.{name}", value))
    return out


STATEMENTS = _statements()


def test_the_package_has_statements_to_check() -> None:
    assert len(STATEMENTS) >= 15


@pytest.mark.parametrize(("name", "sql"), STATEMENTS, ids=[n for n, _ in STATEMENTS])
def test_each_statement_renders_for_both_dialects(name: str, sql: str) -> None:
    pg = POSTGRES.sql(sql)
    assert "{" not in pg and "?" not in pg
    assert pg.count("%s") == sql.count("?")
    lite = SQLITE.sql(sql)
    assert "{" not in lite
    assert sqlite3.complete_statement(lite + ";")


def test_rendering_is_cached_and_stable() -> None:
    sql = "UPDATE t SET at = {now} WHERE id = ?"
    assert SQLITE.sql(sql) is SQLITE.sql(sql)
    assert POSTGRES.sql(sql) == (
        "UPDATE t SET at = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
        " WHERE id = %s"
    )
