"""The egress pool in the ledger: the operator's add, list, remove, enable (synchronous).

Every change bumps ``config_version`` (a trigger), so a running gateway picks it
up within ``refresh_ms``. Proxies found by a source arrive through
:func:`.sources.import_found`. Check results are written by the gateway itself and do
not bump the version.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..clock import iso_utc
from ..egress import parse_egress_url, valid_country
from ..envelope import DatorusError, validation_error
from .db import Ledger

# country: the operator's or the source's, else the one the checks found from the exit
_COLUMNS = (
    "id, url, kind, COALESCE(country, found_country) AS country, weight, enabled, score,"
    " uptime_pct, avg_latency_ms, exit_ip, anonymity, last_checked_at, created_at, status,"
    " fail_streak, found_country, source_id, tags"
)


# The pool as the router loads it, in the field order of ``egress.egress_from_row``.
POOL_SQL = (
    "SELECT id, url, COALESCE(country, found_country), weight, enabled, score, status,"
    " fail_streak FROM egress ORDER BY id"
)


@dataclass(frozen=True, slots=True)
class CheckRun:
    """One checker's run on one egress, as ``egress_checks`` and ``checker_runs`` keep it.

    *error* is set when the checker itself raised (a plugin's bug): it counts in the
    checker's ``errors`` (not its ``failures``) and as a failed run of the egress
    (``passed`` is then False: what was not verified never passes).
    """

    checker: str
    stage: int
    passed: bool
    latency_ms: float | None = None
    exit_ip: str | None = None
    detail: str = ""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CheckWrite:
    """A whole check of one egress: its checkers' runs and what they left the egress as.

    *country* is the exit's country as the checks found it (``found_country``): routing
    and views use it where the operator or the source gave none.
    """

    egress_id: int
    runs: tuple[CheckRun, ...]
    status: str
    fail_streak: int
    score: float
    uptime_pct: float
    latency_ms: float | None
    exit_ip: str | None = None
    anonymity: str | None = None
    country: str | None = None
    at: str = ""  # when (``clock.iso_utc()``); empty: the database's now


def pool_rows(db: Ledger) -> list[tuple[Any, ...]]:
    """Every egress as ``egress.egress_from_row`` reads it."""
    return [tuple(r) for r in db.execute(POOL_SQL).fetchall()]


def _row(r: dict[str, Any]) -> dict[str, Any]:
    spec = parse_egress_url(r["url"])
    return {
        "id": r["id"],
        "url": spec.public_url(),
        "kind": r["kind"],
        "country": r["country"],
        "weight": r["weight"],
        "enabled": bool(r["enabled"]),
        "score": r["score"],
        "uptimePct": r["uptime_pct"],
        "avgLatencyMs": r["avg_latency_ms"],
        "exitIp": r["exit_ip"],
        "anonymity": r["anonymity"],
        "lastCheckedAt": r["last_checked_at"],
        "createdAt": r["created_at"],
        "status": r["status"],
        "failStreak": r["fail_streak"],
        "foundCountry": r["found_country"],
        "sourceId": r["source_id"],  # the source that found it (None: added by hand)
        "tags": json.loads(r["tags"]) if r["tags"] else {},
    }


def add_egress(db: Ledger, url: str, country: str | None = None, weight: int = 1) -> dict[str, Any]:
    """Add an egress; idempotent (the same URL again returns it with ``created: false``)."""
    try:
        spec = parse_egress_url(url)
    except ValueError as e:
        raise validation_error("url", str(e)) from None
    if country is not None and not valid_country(country):
        raise validation_error("country", "must be a two-letter country code")
    if weight < 1:
        raise validation_error("weight", "must be >= 1")
    kind = "source" if spec.kind == "direct" and (spec.source or spec.prefix) else spec.kind
    with db.transaction():
        exists = db.value("SELECT id FROM egress WHERE url = ?", (spec.url,))
        if exists is not None:
            return {**get_egress(db, int(exists)), "created": False}
        egress_id = db.insert(
            "INSERT INTO egress (url, kind, country, weight) VALUES (?, ?, ?, ?) RETURNING id",
            (spec.url, kind, country.lower() if country else None, weight),
        )
    return {**get_egress(db, egress_id), "created": True}


def get_egress(db: Ledger, egress_id: int) -> dict[str, Any]:
    """One egress; RESOURCE_NOT_FOUND if there is none."""
    row = db.one(f"SELECT {_COLUMNS} FROM egress WHERE id = ?", (egress_id,))
    if row is None:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"egress": egress_id})
    return _row(row)


def list_egress(db: Ledger) -> list[dict[str, Any]]:
    """Every egress, passwords hidden."""
    return [_row(r) for r in db.query(f"SELECT {_COLUMNS} FROM egress ORDER BY id")]


def remove_egress(db: Ledger, egress_id: int) -> dict[str, Any]:
    """Remove an egress and its check history; refused while a customer holds a paid lease
    on it (disable it instead: the holder then gets 502 until the lease ends)."""
    with db.transaction():
        until = db.value(
            "SELECT MAX(expires_at) FROM leases"
            " WHERE egress_id = ? AND released_at IS NULL AND expires_at > ?",
            (egress_id, int(time.time())),
        )
        if until is not None:
            raise validation_error("egress", f"leased until {iso_utc(until)}: disable it instead")
        cur = db.execute("DELETE FROM egress WHERE id = ?", (egress_id,))
    if cur.rowcount == 0:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"egress": egress_id})
    return {"id": egress_id, "removed": True}


def set_enabled(db: Ledger, egress_id: int, enabled: bool) -> dict[str, Any]:
    """Enable or disable an egress (a disabled one carries no new request)."""
    with db.transaction():
        cur = db.execute(
            "UPDATE egress SET enabled = ? WHERE id = ?", (1 if enabled else 0, egress_id)
        )
    if cur.rowcount == 0:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"egress": egress_id})
    return {"id": egress_id, "enabled": enabled}


def recent_checks(db: Ledger, egress_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """The latest background checks of one egress (one row per checker run), newest first."""
    return db.query(
        "SELECT id, checker_name, stage, passed, latency_ms, exit_ip, detail, created_at"
        " FROM egress_checks WHERE egress_id = ? ORDER BY id DESC LIMIT ?",
        (egress_id, limit),
    )


def last_failures(db: Ledger, egress_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Each egress's newest failed check (``detail``, e.g. ``connect failed: ...``, and
    ``created_at``), for those of *egress_ids* that have one: why it is dead."""
    out: dict[int, dict[str, Any]] = {}
    for egress_id in egress_ids:  # one probe of egress_checks_egress each
        row = db.execute(
            "SELECT detail, created_at FROM egress_checks WHERE egress_id = ? AND passed = 0"
            " ORDER BY id DESC LIMIT 1",
            (egress_id,),
        ).fetchone()
        if row is not None:
            out[egress_id] = {"detail": row[0] or "check failed", "created_at": row[1]}
    return out


def checker_health(db: Ledger) -> dict[str, dict[str, Any]]:
    """Each checker's record (``checker_runs``) by name: runs, failures (checks it did
    not pass), errors (it raised), and the time and detail of the last of each."""
    rows = db.query(
        "SELECT name, runs, failures, errors, last_run_at, last_failure_at, last_failure,"
        " last_error_at, last_error FROM checker_runs ORDER BY name"
    )
    return {r["name"]: r for r in rows}


def pool_counts(db: Ledger) -> dict[str, Any]:
    """The pool in numbers, computed by the database (a pool of 10,000 costs the caller
    no per-row work): ``total``, ``by_status`` (``disabled`` for a disabled egress),
    ``by_protocol`` (``direct`` for the box's own addresses), ``by_anonymity``,
    ``avg_score``, ``avg_latency_ms`` and ``last_checked_at``."""

    def grouped(expr: str, where: str = "") -> dict[str, int]:
        rows = db.execute(f"SELECT {expr} AS k, COUNT(*) FROM egress {where} GROUP BY k").fetchall()
        return {str(k): int(n) for k, n in rows if k is not None}

    total, avg_score, avg_latency, last = db.execute(
        "SELECT COUNT(*), AVG(score), AVG(avg_latency_ms), MAX(last_checked_at) FROM egress"
    ).fetchone()
    return {
        "total": int(total),
        "by_status": grouped("CASE WHEN enabled = 0 THEN 'disabled' ELSE status END"),
        "by_protocol": grouped("CASE WHEN kind = 'source' THEN 'direct' ELSE kind END"),
        "by_anonymity": grouped("anonymity", "WHERE anonymity IS NOT NULL"),
        "avg_score": None if avg_score is None else float(avg_score),
        "avg_latency_ms": None if avg_latency is None else float(avg_latency),
        "last_checked_at": last,
    }
