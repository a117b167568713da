"""Moving a SQLite ledger into PostgreSQL: ``datorus ledger copy --from PATH --to URL``.

:func:`copy_ledger` copies every table of a SQLite ledger (brought up to date by its
own migrations first) into a PostgreSQL database that ``datorus init`` made, or an
empty one (the migrations are then applied by the copy itself), keeping every id, in
ONE PostgreSQL transaction that also verifies what it wrote before it commits:

1. the destination's migrations, the migration and write advisory locks, and
   ``LOCK TABLE ... IN EXCLUSIVE MODE`` on every table (readers still read the empty
   ledger; writers wait for the commit);
2. a refusal when any table holds a row, other than those a fresh ledger fills on
   its own (``config_version``'s and ``check_sequence``'s one row, the REST API's
   ``api_secrets`` and the event dispatcher's ``event_cursor``, all replaced by the
   source's);
3. ``ALTER TABLE ... DISABLE TRIGGER USER`` on every table, then ``COPY`` of every
   table, parents before children (the foreign keys stay checked: they are not user
   triggers), from ONE read transaction of the SQLite file (one state of it, even with
   a gateway still writing to it: what it writes after that state is not copied);
4. the triggers enabled again, and every identity sequence set past its column's
   largest id (``setval``), so the next row of each table gets a new id;
5. the check: the row count of every table equals the source's; every account's
   ``balances`` row (every column) equals the source's AND the sum of the copied
   ``transactions``; ``config_version`` equals the source's. Any difference raises,
   and the transaction is rolled back: nothing is written, not even the tables.

Why the triggers are disabled, rather than left to rebuild ``balances`` from the
inserted transactions: the copy then writes each table exactly as the source holds it
(``config_version`` too, which the touch triggers would bump once per row), at COPY's
speed rather than one PL/pgSQL upsert per transaction, and the balances are checked
against the sums computed by one independent ``GROUP BY``, not by the trigger whose
work is being checked. ``ALTER TABLE`` is transactional in PostgreSQL: a copy that
fails or is killed half-way leaves the triggers as they were.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import pricing
from ..envelope import DatorusError, validation_error
from . import schema, schema_postgres
from .db import Ledger, open_ledger
from .target import is_postgres, is_url, shown

__all__ = ["BALANCE_COLUMNS", "copy_ledger", "refuse_source", "refuse_target"]

SQLITE_MAGIC = b"SQLite format 3\x00"
#: Tables a fresh ledger fills on its own: replaced by the source's, never a refusal.
REPLACED = ("config_version", "api_secrets", "check_sequence", "event_cursor")
#: PostgreSQL's record of the migrations applied (SQLite keeps it in ``user_version``).
BOOKKEEPING = ("schema_version",)
BALANCE_COLUMNS = (
    "nanocents",
    "trial_bytes",
    "used_bytes",
    "requests",
    "charged_nanocents",
    "topped_up",
)
_BALANCES = f"SELECT account_id, {', '.join(BALANCE_COLUMNS)} FROM balances"
# the balances cache as the transactions sum up (what the triggers keep), per account
_SUMS = """
    SELECT account_id, SUM(nanocents), SUM(trial_bytes),
           SUM(CASE WHEN kind = 'usage' THEN bytes ELSE 0 END),
           SUM(CASE WHEN kind = 'usage' THEN requests ELSE 0 END),
           -SUM(CASE WHEN kind = 'usage' THEN nanocents ELSE 0 END),
           MAX(CASE WHEN kind = 'topup' THEN 1 ELSE 0 END)
    FROM transactions GROUP BY account_id
"""
_PG_TABLES = (
    "SELECT table_name FROM information_schema.tables"
    " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
)
_PG_COLUMNS = (
    "SELECT table_name, column_name FROM information_schema.columns"
    " WHERE table_schema = current_schema()"
)
_PG_IDENTITY = _PG_COLUMNS + " AND is_identity = 'YES' ORDER BY table_name"
_PG_FOREIGN_KEYS = (
    "SELECT c.conrelid::regclass::text, c.confrelid::regclass::text FROM pg_constraint c"
    " JOIN pg_namespace n ON n.oid = c.connamespace"
    " WHERE c.contype = 'f' AND n.nspname = current_schema()"
)
_BATCH = 5000  # source rows fetched at a time


def q(name: str) -> str:
    """*name* as a quoted SQL identifier.

    >>> q("usage_daily"), q('odd"name')
    ('"usage_daily"', '"odd""name"')
    """
    return '"' + name.replace('"', '""') + '"'


# -- what may be copied -------------------------------------------------------------------


def refuse_target(target: str) -> None:
    """Raise VALIDATION_ERROR (field ``to``) unless *target* is a PostgreSQL URL.

    >>> refuse_target("postgresql://u:pw@db/ledger") is None
    True
    >>> refuse_target("mysql://u:pw@db/ledger")
    Traceback (most recent call last):
    ...
    datorus_core.envelope.DatorusError: VALIDATION_ERROR: --to must be a postgresql:// URL, not mysql://u:********@db/ledger.
    """
    if is_postgres(target):
        return
    raise validation_error(
        "to",
        "must be a postgresql:// URL",
        f"--to must be a postgresql:// URL, not {shown(target)}.",
    )


def refuse_source(source: str) -> None:
    """Raise VALIDATION_ERROR (field ``from``) unless *source* is a SQLite ledger file."""
    if is_url(source):
        raise validation_error(
            "from",
            "must be a SQLite file path",
            f"--from must be the path of a SQLite ledger file, not {shown(source)}.",
        )
    path = Path(source)
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "does not exist"
        raise validation_error(
            "from", why, f"--from {source}: the file {why}. Name the SQLite ledger to copy."
        )
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head != SQLITE_MAGIC:
        raise validation_error(
            "from",
            "is not a SQLite database",
            f"--from {source} is not a SQLite database. Name the SQLite ledger to copy.",
        )
    try:
        with _closing(sqlite3.connect(source)) as conn:
            version = schema.schema_version(conn)
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
    except sqlite3.Error as e:
        raise validation_error(
            "from", f"cannot be read: {e}", f"--from {source} cannot be read: {e}."
        ) from None
    if version == 0 or "accounts" not in tables:
        raise validation_error(
            "from",
            "holds no Datorus ledger",
            f"--from {source} is a SQLite database but holds no Datorus ledger.",
        )


class _closing:
    """``contextlib.closing`` for a sqlite3 connection (its own ``with`` only commits)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _held(conn: Any, tables: Sequence[str]) -> dict[str, int]:
    """The tables among *tables* that hold rows (those a fresh ledger fills excepted)."""
    out = {}
    for t in tables:
        if t in REPLACED or t in BOOKKEEPING:
            continue
        n = int(conn.execute(f"SELECT count(*) FROM {q(t)}").fetchone()[0])
        if n:
            out[t] = n
    return out


def _refuse_held(held: dict[str, int], target: str) -> None:
    if not held:
        return
    first = [t for t in ("accounts", "transactions") if t in held]
    rows = ", ".join(f"{t} {held[t]}" for t in [*first, *sorted(set(held) - set(first))])
    raise validation_error(
        "to",
        f"already holds a ledger ({rows})",
        f"The database {shown(target)} already holds a ledger ({rows}): the copy goes"
        " only into an empty database (createdb NAME) or one that only 'datorus init'"
        " has touched. Nothing was written.",
    )


# -- the copy -----------------------------------------------------------------------------


def copy_ledger(source: str, target: str) -> dict[str, Any]:
    """Copy the SQLite ledger at *source* into the PostgreSQL database at *target*.

    Everything in one PostgreSQL transaction, verified before it commits (see the
    module's docstring). Returns the summary: ``tables`` (each with its ``rows``),
    ``accounts``, ``balance_nanocents`` and ``balance_cents`` (the total of every
    balance), ``config_version``, ``schema_version``, ``seconds``. Raises
    VALIDATION_ERROR for a refused source or destination, SERVICE_UNAVAILABLE when the
    copy does not verify (rolled back), and :data:`~.errors.DatabaseError` for a
    database that fails.
    """
    refuse_target(target)
    refuse_source(source)
    from . import postgres

    dst = postgres.connect(target)
    try:
        try:
            if schema_postgres.schema_version(dst):  # a ledger there: refuse before writing
                _refuse_held(_held(dst, sorted(_pg_columns(dst))), target)
        except postgres.NATIVE_ERRORS as e:
            raise postgres.translate(e) from e
        src = open_ledger(source, create=False)  # brought up to date by its migrations
        try:
            return _copy(src, dst, source, target)
        finally:
            src.close()
    finally:
        dst.close()


def _copy(src: Ledger, dst: Any, source: str, target: str) -> dict[str, Any]:
    from . import postgres

    t0 = time.monotonic()
    try:
        dst.execute("BEGIN")
        try:
            summary = _copy_in(src, dst, target)
            dst.execute("COMMIT")
        except BaseException:
            if not (dst.broken or dst.closed):
                dst.execute("ROLLBACK")
            raise
    except postgres.NATIVE_ERRORS as e:
        raise postgres.translate(e) from e
    summary["from"] = str(Path(source).resolve())
    summary["to"] = shown(target)
    summary["seconds"] = round(time.monotonic() - t0, 3)
    return summary


def _copy_in(src: Ledger, dst: Any, target: str) -> dict[str, Any]:
    """The copy inside the destination's open transaction (committed by the caller)."""
    version = schema_postgres.apply_migrations(dst)
    dst.execute("SELECT pg_advisory_xact_lock(%s)", (schema_postgres.WRITE_LOCK,))
    columns = _pg_columns(dst)
    tables = sorted(columns)
    dst.execute(f"LOCK TABLE {', '.join(q(t) for t in tables)} IN EXCLUSIVE MODE")
    _refuse_held(_held(dst, tables), target)
    order = _parents_first(tables, dst.execute(_PG_FOREIGN_KEYS).fetchall())
    src.conn.execute("BEGIN")  # one state of the source for everything read from it
    try:
        src_columns = _sqlite_columns(src.conn)
        _same_tables(src_columns, columns)
        for t in tables:
            dst.execute(f"ALTER TABLE {q(t)} DISABLE TRIGGER USER")
        for t in REPLACED:
            dst.execute(f"DELETE FROM {q(t)}")
        copied = {t: _copy_table(src.conn, dst, t, src_columns[t]) for t in order}
        for t in tables:
            dst.execute(f"ALTER TABLE {q(t)} ENABLE TRIGGER USER")
        for table, column in dst.execute(_PG_IDENTITY).fetchall():
            dst.execute(
                f"SELECT setval(pg_get_serial_sequence(%s, %s),"
                f" COALESCE(MAX({q(column)}), 0) + 1, false) FROM {q(table)}",
                (q(table), column),
            )
        _verify(src.conn, dst, copied)
        balances = dst.execute("SELECT COALESCE(SUM(nanocents), 0) FROM balances").fetchone()[0]
        config = dst.execute("SELECT version FROM config_version WHERE id = 1").fetchone()[0]
    finally:
        src.conn.execute("COMMIT")
    return {
        "schema_version": version,
        "tables": [{"table": t, "rows": copied[t]} for t in sorted(copied)],
        "rows": sum(copied.values()),
        "accounts": copied["accounts"],
        "balance_cents": pricing.whole_cents(int(balances)),
        "balance_nanocents": int(balances),
        "config_version": int(config),
    }


def _pg_columns(dst: Any) -> dict[str, set[str]]:
    """The destination's tables (its bookkeeping left out) and their columns."""
    tables = {r[0] for r in dst.execute(_PG_TABLES).fetchall()} - set(BOOKKEEPING)
    out: dict[str, set[str]] = {t: set() for t in tables}
    for table, column in dst.execute(_PG_COLUMNS).fetchall():
        if table in out:
            out[table].add(column)
    return out


def _sqlite_columns(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """The source's tables and their columns, in the order the table declares them."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {t: [r[1] for r in conn.execute(f"PRAGMA table_info({q(t)})")] for t in names}


def _same_tables(src: dict[str, list[str]], dst: dict[str, set[str]]) -> None:
    """Both ledgers have the same tables with the same columns (both fully migrated)."""
    diff = sorted(set(src) ^ set(dst))
    diff += [t for t in sorted(set(src) & set(dst)) if set(src[t]) != dst[t]]
    if diff:
        raise DatorusError(
            "SERVICE_UNAVAILABLE",
            message="The source's and the destination's tables differ after their"
            f" migrations ({', '.join(diff)}): update Datorus on this machine. Nothing was"
            " written.",
            details={"tables": diff},
        )


def _parents_first(tables: list[str], keys: list[tuple[str, str]]) -> list[str]:
    """*tables* with every table after the tables its foreign keys name.

    >>> _parents_first(["b", "a", "c"], [("b", "a"), ("c", "b"), ("a", "a")])
    ['a', 'b', 'c']
    """
    parents: dict[str, set[str]] = {t: set() for t in tables}
    for child, parent in keys:
        child, parent = child.strip('"'), parent.strip('"')
        if child in parents and parent in parents and child != parent:
            parents[child].add(parent)
    out: list[str] = []
    while parents:
        ready = sorted(t for t, ps in parents.items() if not ps - set(out))
        if not ready:  # a cycle: PostgreSQL will say which row breaks which key
            ready = sorted(parents)
        for t in ready:
            out.append(t)
            del parents[t]
    return out


def _copy_table(src: sqlite3.Connection, dst: Any, table: str, columns: list[str]) -> int:
    """COPY every row of *table*, in primary-key order; how many rows."""
    names = ", ".join(q(c) for c in columns)
    order = ", ".join(q(c) for c in _primary_key(src, table)) or "rowid"
    cur = src.execute(f"SELECT {names} FROM {q(table)} ORDER BY {order}")
    n = 0
    with dst.cursor() as pc, pc.copy(f"COPY {q(table)} ({names}) FROM STDIN") as copy:
        while rows := cur.fetchmany(_BATCH):
            for row in rows:
                copy.write_row(row)
            n += len(rows)
    return n


def _primary_key(src: sqlite3.Connection, table: str) -> list[str]:
    """The columns of *table*'s primary key, in key order (none: ordered by rowid)."""
    info = list(src.execute(f"PRAGMA table_info({q(table)})"))
    return [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5]]


def _verify(src: sqlite3.Connection, dst: Any, copied: dict[str, int]) -> None:
    """Raise SERVICE_UNAVAILABLE unless the copy holds what the source holds."""
    problems = []
    for t, n in copied.items():
        want = int(src.execute(f"SELECT count(*) FROM {q(t)}").fetchone()[0])
        got = int(dst.execute(f"SELECT count(*) FROM {q(t)}").fetchone()[0])
        if not want == n == got:
            problems.append(f"{t} has {got} rows in the copy, {want} in the source")
    theirs = _by_account(src.execute(_BALANCES).fetchall())
    ours = _by_account(dst.execute(_BALANCES).fetchall())
    sums = _by_account(dst.execute(_SUMS).fetchall())
    problems += _differences(ours, theirs, "the source's balances")
    problems += _differences(ours, sums, "the sum of the copied transactions")
    versions = [
        c.execute("SELECT version FROM config_version WHERE id = 1").fetchone()[0]
        for c in (src, dst)
    ]
    if versions[0] != versions[1]:
        problems.append(f"config_version is {versions[1]} in the copy, {versions[0]} in the source")
    if problems:
        shown_ = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise DatorusError(
            "SERVICE_UNAVAILABLE",
            message=f"The copy did not verify: {shown_}. It was rolled back: nothing was written.",
            details={"problems": problems[:20]},
        )


def _by_account(rows: list[Any]) -> dict[int, tuple[int, ...]]:
    return {int(r[0]): tuple(int(v) for v in r[1:]) for r in rows}


def _differences(
    ours: dict[int, tuple[int, ...]], other: dict[int, tuple[int, ...]], what: str
) -> list[str]:
    """Each account whose copied balances row differs from *other*'s, column by column.

    >>> _differences({1: (5, 0, 0, 0, 0, 1)}, {1: (4, 0, 0, 0, 0, 1), 2: (0,) * 6}, "x")
    ['account 1: nanocents 5 in the copy, 4 in x', 'account 2: no balances row in the copy']
    """
    out = []
    for aid in sorted(set(ours) | set(other)):
        a, b = ours.get(aid), other.get(aid)
        if a is None:
            out.append(f"account {aid}: no balances row in the copy")
        elif b is None:
            out.append(f"account {aid}: a balances row in the copy, none in {what}")
        else:
            out += [
                f"account {aid}: {col} {x} in the copy, {y} in {what}"
                for col, x, y in zip(BALANCE_COLUMNS, a, b, strict=True)
                if x != y
            ]
    return out
