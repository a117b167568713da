"""What the proxy carried, as the ledger keeps it: usage totals, per-day rows, receipts.

The gateway writes these (:mod:`.gateway`); the functions here read them for the CLI
and the API (and :func:`insert_receipts` fills a ledger for the benchmark).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .. import pricing
from ..envelope import DatorusError
from .accounts import account_row, overview
from .db import Ledger


def usage(db: Ledger, account_id: int, by_day: bool = False) -> dict[str, Any]:
    """Totals of requests, bytes and charges for the account (and per day with *by_day*)."""
    account_row(db, account_id)
    ov = overview(db, account_id)
    out: dict[str, Any] = {
        "id": account_id,
        "requests": ov["requests"],
        "bytes": ov["used_bytes"],
        "chargedCents": pricing.whole_cents(ov["charged_nanocents"]),
        "chargedNanocents": ov["charged_nanocents"],
        "trialRemainingBytes": max(0, ov["trial_remaining_bytes"]),
        "balanceCents": pricing.whole_cents(ov["balance_nanocents"]),
        "balanceNanocents": ov["balance_nanocents"],
    }
    if by_day:
        out["days"] = [
            {
                "day": r["day"],
                "requests": r["requests"],
                "bytesUp": r["up"],
                "bytesDown": r["down"],
                "bytes": r["up"] + r["down"],
                "trialBytes": r["trial"],
                "chargedNanocents": r["nc"],
            }
            for r in db.query(
                "SELECT day, SUM(requests) AS requests, SUM(bytes_up) AS up,"
                " SUM(bytes_down) AS down, SUM(trial_bytes) AS trial, SUM(nanocents) AS nc"
                " FROM usage_daily WHERE account_id = ? GROUP BY day ORDER BY day",
                (account_id,),
            )
        ]
    return out


def receipt(db: Ledger, request_id: str) -> dict[str, Any]:
    """The receipt of one finished request."""
    row = db.one("SELECT * FROM receipts WHERE request_id = ?", (request_id,))
    if row is None:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"requestId": request_id})
    return row


RECEIPT_COLUMNS = (
    "request_id", "account_id", "credential_id", "method", "host", "port", "status",
    "bytes_up", "bytes_down", "trial_bytes", "nanocents", "started_at", "finished_at", "code",
)  # fmt: skip
"""A receipt's values in order. ``code`` (the Datorus code of a refusal, issue 19: a
SOCKS5 client sees only a reply byte) may be left off: a row one value short has none."""
_RECEIPT_INSERT = (
    f"INSERT INTO receipts ({', '.join(RECEIPT_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(RECEIPT_COLUMNS))})"
)


def insert_receipts(db: Ledger, rows: Iterable[Sequence[Any]]) -> int:
    """Insert receipts (values in :data:`RECEIPT_COLUMNS` order) in one transaction.

    Used by the benchmark (``scripts/bench``) to age a ledger with hundreds of thousands
    of old receipts before it measures the gateway's usage writer; the gateway itself
    writes receipts with its usage batches (:mod:`.gateway`). A duplicate request id is
    an error. Returns how many rows went in.
    """
    full = [tuple(r) + (None,) * (len(RECEIPT_COLUMNS) - len(r)) for r in rows]
    with db.transaction():
        return db.execute_many(_RECEIPT_INSERT, full)


_INT64 = (-(2**63), 2**63 - 1)
_TEXT_COLUMNS = frozenset(
    i
    for i, c in enumerate(RECEIPT_COLUMNS)
    if c in ("request_id", "method", "host", "code") or c.endswith("_at")
)
_OPTIONAL = frozenset({RECEIPT_COLUMNS.index("code")})


def clean_receipts(rows: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """The receipts of a usage batch that any backend takes, in :data:`RECEIPT_COLUMNS`
    order: a row no ``receipts`` column could hold is left out, a value that only needs
    tidying is tidied.

    A receipt goes in with its batch's usage, in one transaction; PostgreSQL refuses a
    whole transaction over one bad row (a NULL, text where a number goes, a number past
    64 bits, a NUL character), where SQLite's ``INSERT OR IGNORE`` skipped the row. So
    no backend is ever handed one: a bad receipt never costs its batch's usage. Numbers
    are clamped to 64 bits; text loses NUL characters and unencodable ones (replaced).

    >>> clean_receipts([("r1", 1, 2, "GET", "a\\x00.example", 80, 200, 1, 2, 0, 5, "t", "t"),
    ...                 ("r2", None, 2, "GET", "h", 80, 200, 1, 2, 0, 5, "t", "t"),
    ...                 ("r3", 1, 2, "GET", "h", "x", 200, 1, 2, 0, 10**30, "t", "t")])
    [('r1', 1, 2, 'GET', 'a.example', 80, 200, 1, 2, 0, 5, 't', 't', None)]
    """
    out: list[tuple[Any, ...]] = []
    for row in rows:
        if len(row) == len(RECEIPT_COLUMNS) - 1:
            row = (*row, None)  # no code: a served request
        if len(row) != len(RECEIPT_COLUMNS):
            continue
        clean: list[Any] = []
        for i, value in enumerate(row):
            if value is None:
                if i in _OPTIONAL:
                    clean.append(None)
                    continue
                break
            if i in _TEXT_COLUMNS:
                if not isinstance(value, str):
                    break
                clean.append(value.replace("\x00", "").encode("utf-8", "replace").decode())
            else:
                if not isinstance(value, int):
                    break
                clean.append(min(max(int(value), _INT64[0]), _INT64[1]))
        else:
            out.append(tuple(clean))
    return out


def by_host(db: Ledger, account_id: int, since_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The account's usage per destination host since request id *since_id* (a
    :func:`~datorus_core.envelope.request_id_floor`), most bytes first, from its receipts
    (kept ``receipt_days``; refusals' receipts, which carry a code, left out): ``host``,
    ``requests``, ``bytesUp``, ``bytesDown``, ``bytes``, ``trialBytes`` and
    ``chargedNanocents``."""
    rows = db.query(
        "SELECT host, COUNT(*) AS requests, SUM(bytes_up) AS up, SUM(bytes_down) AS down,"
        " SUM(trial_bytes) AS trial, SUM(nanocents) AS nc FROM receipts"
        " WHERE account_id = ? AND request_id >= ? AND code IS NULL GROUP BY host"
        " ORDER BY SUM(bytes_up) + SUM(bytes_down) DESC, host LIMIT ?",
        (account_id, since_id, limit),
    )
    return [
        {
            "host": r["host"],
            "requests": int(r["requests"]),
            "bytesUp": int(r["up"]),
            "bytesDown": int(r["down"]),
            "bytes": int(r["up"]) + int(r["down"]),
            "trialBytes": int(r["trial"]),
            "chargedNanocents": int(r["nc"]),
        }
        for r in rows
    ]


def recent_receipts(
    db: Ledger, account_id: int, limit: int = 20, before: str | None = None
) -> list[dict[str, Any]]:
    """The account's newest receipts (older than request id *before*, if given), newest
    first (every :data:`RECEIPT_COLUMNS`)."""
    older = "" if before is None else " AND request_id < ?"
    args = (account_id, limit) if before is None else (account_id, before, limit)
    return db.query(
        f"SELECT {', '.join(RECEIPT_COLUMNS)} FROM receipts WHERE account_id = ?{older}"
        " ORDER BY request_id DESC LIMIT ?",
        args,
    )


def receipt_count(db: Ledger, account_id: int) -> int:
    """How many receipts the account has (kept ``receipt_days``)."""
    return int(db.value("SELECT COUNT(*) FROM receipts WHERE account_id = ?", (account_id,)) or 0)


def bytes_by_account(db: Ledger, day: str) -> dict[int, int]:
    """Bytes each account moved on UTC *day* (``YYYY-MM-DD``), from ``usage_daily``."""
    return {
        int(r["account_id"]): int(r["b"])
        for r in db.query(
            "SELECT account_id, SUM(bytes_up) + SUM(bytes_down) AS b FROM usage_daily"
            " WHERE day = ? GROUP BY account_id",
            (day,),
        )
    }
