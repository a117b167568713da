"""The seam between the ledger's SQL and the database that runs it.

Every statement in :mod:`datorus_core.ledger` is written once, in the subset of SQL
that SQLite and PostgreSQL share: ``?`` placeholders, ``INSERT ... ON CONFLICT (...)
DO NOTHING`` / ``DO UPDATE SET col = table.col + excluded.col`` (never ``INSERT OR
IGNORE``), ``RETURNING id`` (never ``lastrowid``), ``COALESCE``, ``substr``, ``CAST``,
``lower(a) = lower(?)`` for a comparison without regard to case.
The few things that differ are named by a token that :meth:`Dialect.sql` fills in:

``{now}``
    the current UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` text (the schema's time format);
``{is}``
    null-safe equality (``port {is} ?`` matches NULL to NULL);
``{for_update}``
    at the end of a SELECT inside a write transaction: the rows read stay as read
    until it commits (PostgreSQL's ``FOR UPDATE``; SQLite's write transaction holds
    the whole file already);
``{or_ignore}`` ... ``{on_conflict_ignore}``
    an insert that skips a duplicate row (``INSERT {or_ignore} INTO t ...
    {on_conflict_ignore}``). SQLite's ``OR IGNORE`` also skips a row breaking NOT NULL
    or CHECK, where PostgreSQL's ``ON CONFLICT DO NOTHING`` only skips duplicates and
    fails the transaction: rows that could break a constraint are checked in Python
    first (the gateway's receipts: :func:`~.usage.clean_receipts`).

Transactions open with :attr:`Dialect.begin_write` (SQLite takes the write lock at
once, so a read-then-write cannot deadlock; :class:`~.db.Ledger` adds an advisory
lock on PostgreSQL for the same effect) or :attr:`Dialect.begin_read` (one
snapshot). Each backend is a :class:`Dialect` value and its own connection function
(:mod:`.db`, :mod:`.postgres`), not a second copy of the queries::

    >>> SQLITE.sql("UPDATE t SET at = {now} WHERE port {is} ?")
    "UPDATE t SET at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE port IS ?"
    >>> POSTGRES.sql("SELECT 1 FROM t WHERE a = ? AND s LIKE '10%'")
    "SELECT 1 FROM t WHERE a = %s AND s LIKE '10%%'"
    >>> POSTGRES.sql("INSERT {or_ignore} INTO t (a) VALUES (?) {on_conflict_ignore}")
    'INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING'
    >>> SQLITE.sql("INSERT {or_ignore} INTO t (a) VALUES (?) {on_conflict_ignore}")
    'INSERT OR IGNORE INTO t (a) VALUES (?)'

Statements never carry ``?`` inside a string literal (it would be taken for a
placeholder); values always travel as parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["POSTGRES", "SQLITE", "Dialect"]


@dataclass(frozen=True)
class Dialect:
    """How one database spells what the portable SQL leaves open."""

    name: str
    paramstyle: str  # DB-API paramstyle: "qmark" (?) or "format" (%s)
    now: str
    null_safe_eq: str
    for_update: str
    or_ignore: str
    on_conflict_ignore: str
    begin_write: str
    begin_read: str
    _cache: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def sql(self, template: str) -> str:
        """*template* (portable SQL with ``?`` and the tokens above) in this dialect."""
        out = self._cache.get(template)
        if out is None:
            out = template
            if self.paramstyle == "format":
                out = out.replace("%", "%%").replace("?", "%s")
            out = (
                out.replace("{now}", self.now)
                .replace("{is}", self.null_safe_eq)
                .replace(" {for_update}", f" {self.for_update}" if self.for_update else "")
                .replace(" {or_ignore}", f" {self.or_ignore}" if self.or_ignore else "")
                .replace(
                    " {on_conflict_ignore}",
                    f" {self.on_conflict_ignore}" if self.on_conflict_ignore else "",
                )
            )
            self._cache[template] = out
        return out


SQLITE = Dialect(
    name="sqlite",
    paramstyle="qmark",
    now="strftime('%Y-%m-%dT%H:%M:%SZ', 'now')",
    null_safe_eq="IS",
    for_update="",
    or_ignore="OR IGNORE",
    on_conflict_ignore="",
    begin_write="BEGIN IMMEDIATE",
    begin_read="BEGIN",
)

# A postgresql:// ledger (issue 16): psycopg 3 (.postgres), migrations in .schema_postgres
POSTGRES = Dialect(
    name="postgresql",
    paramstyle="format",
    now="to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
    null_safe_eq="IS NOT DISTINCT FROM",
    for_update="FOR UPDATE",
    or_ignore="",
    on_conflict_ignore="ON CONFLICT DO NOTHING",
    begin_write="BEGIN",
    begin_read="BEGIN ISOLATION LEVEL REPEATABLE READ",
)
