"""A test's ledger: where it lives, the real ``datorus`` CLI on it, and direct reads.

A ledger target is what ``--db`` and ``datorus_db`` take: a :class:`~pathlib.Path` to a
SQLite file, or a ``postgresql://`` URL (a ``str``). ``DATORUS_TEST_LEDGER=postgresql``
in the environment makes :func:`new_ledger` hand out a fresh database of this test
process's PostgreSQL cluster (``support.postgres.shared_cluster``) instead of a file,
so every test gateway, API and CLI run goes there (issue 16); ``scripts/test`` runs the
end-to-end tests of billing, limits, start-up and accounts that way too. Tests that
are about the SQLite file itself are marked ``sqlite_only`` and skipped then.

Tests read and write the ledger directly (it is a public interface) only through
:func:`ledger_rows`, :func:`ledger_row`, :func:`ledger_value` and :func:`ledger_exec`:
portable SQL with ``?`` placeholders, run by :mod:`sqlite3` on a file and by psycopg,
on a URL, both through the product's own ``Ledger``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .paths import DATORUS

__all__ = [
    "LedgerTarget",
    "add_egress",
    "cli",
    "is_url",
    "ledger_backend",
    "ledger_dir",
    "ledger_exec",
    "ledger_row",
    "ledger_rows",
    "ledger_value",
    "missing_ledger",
    "new_ledger",
    "prepare_ledger",
]

LedgerTarget = Path | str  # a SQLite file, or a postgresql:// URL

# the folder each PostgreSQL ledger's test keeps its logs and settings in
_DIRS: dict[str, Path] = {}


def ledger_backend() -> str:
    """``sqlite`` (the default) or ``postgresql``: ``DATORUS_TEST_LEDGER``."""
    backend = os.environ.get("DATORUS_TEST_LEDGER", "") or "sqlite"
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"DATORUS_TEST_LEDGER={backend!r}: use sqlite or postgresql")
    return backend


def is_url(target: LedgerTarget) -> bool:
    """Whether *target* names a PostgreSQL database rather than a SQLite file."""
    return str(target).startswith(("postgresql://", "postgres://"))


def new_ledger(directory: Path, name: str = "ledger.db") -> LedgerTarget:
    """Where a test's fresh ledger goes: ``directory / name``, or a new PostgreSQL database.

    Nothing is created in SQLite mode (``datorus init`` makes the file); the database
    is created empty in PostgreSQL mode, its test's files (logs, settings) in *directory*.
    """
    if ledger_backend() == "sqlite":
        return directory / name
    from .postgres import shared_cluster

    url = shared_cluster().create_database()
    _DIRS[url] = directory
    return url


def missing_ledger(directory: Path) -> LedgerTarget:
    """A ledger that cannot be opened: a file in a folder that is not there, or a
    database the cluster does not have (its test's files in *directory*)."""
    if ledger_backend() == "sqlite":
        return directory / "no-such-folder" / "ledger.db"
    from .postgres import shared_cluster

    url = shared_cluster().url(f"missing_{os.getpid()}")
    _DIRS[url] = directory
    return url


def ledger_dir(target: LedgerTarget) -> Path:
    """The folder a test keeps *target*'s neighbours in (logs, settings files)."""
    if not is_url(target):
        return Path(target).parent
    directory = _DIRS.get(str(target))
    if directory is None:  # a URL made elsewhere: a folder of its own
        directory = _DIRS[str(target)] = Path(tempfile.mkdtemp(prefix="datorus-test-"))
    return directory


def cli(db: LedgerTarget, *args: str, check: bool = True) -> dict[str, Any]:
    """Run ``datorus --db DB ARGS --json`` and return its one JSON object."""
    p = subprocess.run(
        [DATORUS, "--db", str(db), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"datorus {args} failed ({p.returncode}): {p.stderr}")
    out = p.stdout if p.returncode == 0 else p.stderr
    return json.loads(out) if out.strip() else {}


def prepare_ledger(db: LedgerTarget) -> None:
    """``datorus init`` and allow the loopback origins the tests use."""
    cli(db, "init")
    cli(db, "policy", "allow", "127.0.0.0/8")
    cli(db, "policy", "allow", "::1/128")


def add_egress(db: LedgerTarget, items: list[tuple[str, str]]) -> None:
    """Fill the pool before the gateway starts (the CLI test covers the live path)."""
    from datorus_core import ledger
    from datorus_core.ledger import egress as egress_ledger

    conn = ledger.open_ledger(db)
    try:
        for url, country in items:
            egress_ledger.add_egress(conn, url, country)
    finally:
        conn.close()


# -- reading and writing the ledger directly ------------------------------------------


def _run(target: LedgerTarget, sql: str, args: Sequence[Any]) -> list[tuple]:
    """One statement on a connection of its own, through the product's own
    :class:`~datorus_core.ledger.db.Ledger` (autocommit; the portable SQL rendered in the
    connection's dialect; a sum of integers an ``int`` on PostgreSQL too)."""
    from datorus_core.ledger.db import Ledger, connect

    conn = connect(str(target), timeout=10)
    try:
        cur = Ledger(conn).execute(sql, args)
        return [tuple(row) for row in cur.fetchall()] if cur.description else []
    finally:
        conn.close()


def ledger_rows(target: LedgerTarget, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    """Every row of one read (portable SQL, ``?`` placeholders) on the ledger *target*."""
    return _run(target, sql, args)


def ledger_row(target: LedgerTarget, sql: str, args: Sequence[Any] = ()) -> tuple | None:
    """The first row of one read, or None."""
    rows = ledger_rows(target, sql, args)
    return rows[0] if rows else None


def ledger_value(target: LedgerTarget, sql: str, args: Sequence[Any] = ()) -> Any:
    """The first column of the first row of one read, or None."""
    row = ledger_row(target, sql, args)
    return None if row is None else row[0]


def ledger_exec(target: LedgerTarget, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    """One write, committed; the rows it returned (``RETURNING``), if any."""
    return _run(target, sql, args)
