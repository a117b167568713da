"""The tests' direct access to a ledger (tests/support/ledger.py): the same portable SQL,
the same rows, on a SQLite file and on a PostgreSQL database."""

from __future__ import annotations

import pytest
from support.ledger import ledger_dir, ledger_exec, ledger_row, ledger_rows, ledger_value


@pytest.fixture
def target(ledger_target: str) -> str:
    """A fresh ledger on each backend in turn (conftest's ``ledger_target``)."""
    return ledger_target


def test_portable_sql_gives_the_same_rows_on_both(target: str) -> None:
    ledger_exec(target, "CREATE TABLE t (id INTEGER PRIMARY KEY, n BIGINT, s TEXT)")
    for i, (n, s) in enumerate([(2**61, "a%"), (2**61, "b?"), (1, None)], start=1):
        ledger_exec(target, "INSERT INTO t (id, n, s) VALUES (?, ?, ?)", (i, n, s))
    # a sum of BIGINTs (NUMERIC in PostgreSQL) comes back as an exact int
    assert ledger_value(target, "SELECT SUM(n) FROM t") == 2**62 + 1
    assert ledger_row(target, "SELECT COUNT(*) FROM t WHERE s LIKE 'a%'") == (1,)
    assert ledger_rows(target, "SELECT id, s FROM t WHERE id > ? ORDER BY id", (1,)) == [
        (2, "b?"),
        (3, None),
    ]
    assert ledger_row(target, "SELECT id FROM t WHERE id = ?", (9,)) is None
    assert ledger_value(target, "SELECT id FROM t WHERE id = ?", (9,)) is None
    assert ledger_dir(target).is_dir()
