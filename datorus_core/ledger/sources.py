"""Proxy-list sources in the ledger: the rows, their claims, and the proxies they found.

A source is a list URL with a parser, an optional cron schedule and defaults for the
proxies it names (issue 17). Everything here is synchronous (the CLI, the API's worker
threads, the gateway's scheduler thread) and takes validated values: deciding what is
valid is :mod:`datorus_core.sources.fields`'s job.

**Claims.** A process scrapes a source only while it holds its claim: ``claimed_by``
(who) until ``claim_until`` (Unix seconds). :func:`claim` takes it with one conditional
``UPDATE`` (free or expired; for a scheduled run also enabled and due), which both
backends run atomically: of any number of processes on one ledger exactly one sees
``rowcount == 1``, so a scheduled run happens once and a scrape never overlaps itself.
:func:`finish` writes the outcome and gives the claim back; a process that died while
holding one loses it when ``claim_until`` passes.

**Found proxies.** :func:`import_found` puts a list's proxies into ``egress`` in one
transaction: a proxy already in the pool (same protocol, host, port and username) is
*updated* (its URL, country, weight and tags refreshed when this source added it), any
other is *new*: added with the source's defaults and ``source_id`` set, as every new
egress ``unchecked`` (carrying no traffic) until its checks pass
(``datorus_core.egress_status``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..clock import iso_utc
from ..egress import EgressSpec, parse_egress_url
from ..envelope import DatorusError
from ..sources.found import FoundProxy, InvalidEntry, normalize_host
from . import events
from .db import Ledger

_COLUMNS = (
    "id, name, url, parser_name, cron_schedule, default_protocol, default_country,"
    " default_weight, tags, enabled, created_at, updated_at, last_scraped_at, last_error,"
    " last_found, last_new, last_duration_ms, next_run_at, claimed_by, claim_until"
)
_WITH_COUNT = (
    f"SELECT {_COLUMNS}, (SELECT COUNT(*) FROM egress e WHERE e.source_id = s.id) AS proxies"
    " FROM sources s"
)
#: Every source with how many proxies it found, for :func:`~.api.page`.
SOURCES_SQL = _WITH_COUNT
#: Only the enabled (``?`` = 1) or disabled (0) ones.
SOURCES_BY_STATE_SQL = _WITH_COUNT + " WHERE s.enabled = ?"

#: What :func:`add_source` and :func:`update_source` may set.
EDITABLE = (
    "name",
    "url",
    "parser_name",
    "cron_schedule",
    "default_protocol",
    "default_country",
    "default_weight",
    "tags",
    "enabled",
    "next_run_at",
)

_NOT_CLAIMED = "(claim_until IS NULL OR claim_until <= ?)"
_DUE = "enabled = 1 AND next_run_at IS NOT NULL AND next_run_at <= ?"


def not_found(source_id: int | str) -> DatorusError:
    """``RESOURCE_NOT_FOUND`` naming the source."""
    return DatorusError("RESOURCE_NOT_FOUND", details={"source": source_id})


def _stored(column: str, value: Any) -> Any:
    if column == "tags":
        return json.dumps(value or {}, sort_keys=True, separators=(",", ":"))
    if column == "enabled":
        return 1 if value else 0
    return value


def source_view(row: Mapping[str, Any], now: float) -> dict[str, Any]:
    """A source row as the API and the CLI show it (seed 002's fields and more)."""
    tags = json.loads(row["tags"]) if row["tags"] else {}
    scheduled = bool(row["enabled"]) and row["cron_schedule"] is not None
    nxt = row["next_run_at"] if scheduled else None
    return {
        "id": row["id"],
        "name": row["name"],
        "url": row["url"],
        "parser_name": row["parser_name"],
        "cron_schedule": row["cron_schedule"],
        "default_protocol": row["default_protocol"],
        "default_country": row["default_country"],
        "default_weight": row["default_weight"],
        "tags": tags,
        "is_active": bool(row["enabled"]),
        "next_run_at": iso_utc(nxt) if nxt is not None else None,
        "scraping": row["claim_until"] is not None and row["claim_until"] > now,
        "last_scraped_at": row["last_scraped_at"],
        "last_error": row["last_error"],
        "last_found": row["last_found"],
        "last_new": row["last_new"],
        "last_duration_ms": row["last_duration_ms"],
        "proxies": int(row.get("proxies") or 0),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def add_source(db: Ledger, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Insert a source with *fields* (names of :data:`EDITABLE`); its row."""
    cols = [c for c in EDITABLE if c in fields]
    with db.transaction():
        sid = db.insert(
            f"INSERT INTO sources ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            " RETURNING id",
            [_stored(c, fields[c]) for c in cols],
        )
    return get_source(db, sid)


def get_source(db: Ledger, source_id: int) -> dict[str, Any]:
    """One source with its ``proxies`` count; ``RESOURCE_NOT_FOUND`` if there is none."""
    row = db.one(_WITH_COUNT + " WHERE s.id = ?", (source_id,))
    if row is None:
        raise not_found(source_id)
    return row


def update_source(
    db: Ledger,
    source_id: int,
    changes: Mapping[str, Any],
    next_run: Callable[[str | None], int | None] | None = None,
) -> dict[str, Any]:
    """Set *changes* (names of :data:`EDITABLE`) on one source; its new row.

    With *next_run*, a new ``cron_schedule`` or enabling a disabled source also sets
    ``next_run_at = next_run(cron)``, the schedule read in the same transaction (runs
    missed while it was off are not replayed).
    """
    changes = dict(changes)
    with db.transaction():
        current = db.one("SELECT enabled, cron_schedule FROM sources WHERE id = ?", (source_id,))
        if current is None:
            raise not_found(source_id)
        enabling = changes.get("enabled") is True and not current["enabled"]
        if next_run is not None and ("cron_schedule" in changes or enabling):
            cron = changes.get("cron_schedule", current["cron_schedule"])
            changes["next_run_at"] = next_run(cron)
        cols = [c for c in EDITABLE if c in changes]
        if cols:
            sets = ", ".join(f"{c} = ?" for c in cols)
            db.execute(
                f"UPDATE sources SET {sets}, updated_at = {{now}} WHERE id = ?",
                [*(_stored(c, changes[c]) for c in cols), source_id],
            )
    return get_source(db, source_id)


def delete_source(db: Ledger, source_id: int) -> dict[str, Any]:
    """Delete a source; the proxies it found stay in the pool (``proxies_kept``)."""
    with db.transaction():
        kept = int(db.value("SELECT COUNT(*) FROM egress WHERE source_id = ?", (source_id,)))
        cur = db.execute("DELETE FROM sources WHERE id = ?", (source_id,))
    if cur.rowcount == 0:
        raise not_found(source_id)
    return {"id": source_id, "removed": True, "proxies_kept": kept}


def source_stats(db: Ledger) -> dict[str, Any]:
    """``sources_total``, ``sources_active`` and the newest ``last_scrape_at``."""
    row = db.one(
        "SELECT COUNT(*) AS total, COALESCE(SUM(enabled), 0) AS active,"
        " MAX(last_scraped_at) AS last FROM sources"
    )
    assert row is not None
    return {
        "sources_total": int(row["total"]),
        "sources_active": int(row["active"]),
        "last_scrape_at": row["last"],
    }


# -- claims ---------------------------------------------------------------------------------


def due_sources(db: Ledger, now: int, limit: int) -> list[int]:
    """Up to *limit* ids of enabled sources whose next run is due at *now* and that
    nobody holds, the most overdue first (a hint: :func:`claim` decides)."""
    rows = db.execute(
        f"SELECT id FROM sources WHERE {_DUE} AND {_NOT_CLAIMED} ORDER BY next_run_at, id LIMIT ?",
        (now, now, limit),
    ).fetchall()
    return [int(r[0]) for r in rows]


def claim(db: Ledger, source_id: int, owner: str, now: int, until: int, due: bool) -> bool:
    """Take the source for *owner* until *until* if nobody holds it; with *due*, only if
    it is also enabled and its next run is due at *now* (a scheduled run). Whether this
    call won it: one conditional UPDATE, atomic on both backends."""
    sql = f"UPDATE sources SET claimed_by = ?, claim_until = ? WHERE id = ? AND {_NOT_CLAIMED}"
    args: list[Any] = [owner, until, source_id, now]
    if due:
        sql += f" AND {_DUE}"
        args.append(now)
    return db.execute(sql, args).rowcount == 1


def release(db: Ledger, source_id: int, owner: str) -> None:
    """Give back *owner*'s claim without an outcome (a scrape that was cancelled)."""
    db.execute(
        "UPDATE sources SET claimed_by = NULL, claim_until = NULL WHERE id = ? AND claimed_by = ?",
        (source_id, owner),
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a scrape came to, as :func:`finish` records it."""

    error: str | None  # None: it succeeded
    found: int = 0
    new: int = 0
    duration_ms: int = 0


def finish(
    db: Ledger,
    source_id: int,
    owner: str,
    outcome: Outcome,
    next_run: Callable[[str | None], int | None] | None = None,
) -> bool:
    """Record *outcome* and give *owner*'s claim back; False if *owner* no longer held it.

    A failure keeps the counts of the last success. With *next_run* (a scheduled run),
    ``next_run_at`` becomes ``next_run(cron_schedule)``, read in the same transaction,
    so a schedule changed during the run is the one that counts.
    """
    sets = "claimed_by = NULL, claim_until = NULL, last_scraped_at = {now}, last_error = ?"
    args: list[Any] = [outcome.error]
    if outcome.error is None:
        sets += ", last_found = ?, last_new = ?, last_duration_ms = ?"
        args += [outcome.found, outcome.new, outcome.duration_ms]
    else:
        sets += ", last_duration_ms = ?"
        args.append(outcome.duration_ms)
    with db.transaction():
        if next_run is not None:
            cron = db.value(
                "SELECT cron_schedule FROM sources WHERE id = ? AND claimed_by = ?",
                (source_id, owner),
            )
            sets += ", next_run_at = ?"
            args.append(next_run(cron))
        cur = db.execute(
            f"UPDATE sources SET {sets} WHERE id = ? AND claimed_by = ?",
            [*args, source_id, owner],
        )
        if cur.rowcount == 1:
            data: dict[str, Any] = {"source_id": str(source_id), "duration_ms": outcome.duration_ms}
            if outcome.error is None:
                data.update(proxies_discovered=outcome.found, proxies_new=outcome.new)
            else:
                data["error"] = outcome.error
            kind = "source.scraped" if outcome.error is None else "source.failed"
            events.emit(db, kind, None, data)
    return cur.rowcount == 1


# -- found proxies --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Imported:
    """How a list's proxies met the pool."""

    new: int
    updated: int  # already in the pool (refreshed if this source added them)
    unsupported: int  # protocols the pool cannot use yet
    changed: int  # rows of this source whose URL, country, weight or tags changed


def _pool_key(spec: EgressSpec) -> tuple[str, str, int, str | None] | None:
    if not spec.is_proxy or spec.host is None or spec.port is None:
        return None
    try:
        return (spec.kind, normalize_host(spec.host), spec.port, spec.username)
    except InvalidEntry:
        return None


def import_found(
    db: Ledger,
    source_id: int,
    proxies: Iterable[FoundProxy],
    country: str | None,
    weight: int,
    tags: Mapping[str, str],
) -> Imported:
    """Put *proxies* into the pool for source *source_id*, in one transaction.

    New ones get *country* (unless the list named one), *weight* and *tags*; they are
    ``unchecked`` (the status column's default) until their checks pass. Rows this
    source added before are brought in line with the list (credentials, country) and the
    source's defaults; rows the operator or another source added are counted as updated
    and left as they are.
    """
    tags_text = json.dumps(dict(tags), sort_keys=True, separators=(",", ":"))
    new_rows: list[tuple[Any, ...]] = []
    changes: list[tuple[Any, ...]] = []
    updated = unsupported = 0
    with db.transaction():
        by_url: dict[str, dict[str, Any]] = {}
        by_key: dict[tuple[str, str, int, str | None], dict[str, Any]] = {}
        for r in db.query(
            "SELECT id, url, country, weight, tags, source_id FROM egress"
            " WHERE kind <> 'direct' AND kind <> 'source'"
        ):
            by_url[r["url"]] = r
            try:
                key = _pool_key(parse_egress_url(r["url"]))
            except ValueError:
                continue
            if key is not None:
                by_key.setdefault(key, r)
        for p in proxies:
            try:
                spec = parse_egress_url(p.url())
            except ValueError:  # a protocol the pool cannot carry yet
                unsupported += 1
                continue
            want_country = (p.country or country or "").lower() or None
            row = by_url.get(spec.url) or by_key.get(p.key)
            if row is None:
                new_rows.append((spec.url, spec.kind, want_country, weight, source_id, tags_text))
                continue
            updated += 1
            if row["source_id"] != source_id:
                continue
            url = spec.url if spec.url not in by_url else row["url"]  # never a taken URL
            want = (url, want_country, weight, tags_text)
            if (row["url"], row["country"], row["weight"], row["tags"]) != want:
                changes.append((*want, row["id"]))
        if new_rows:
            db.execute_many(
                "INSERT INTO egress (url, kind, country, weight, source_id, tags)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (url) DO NOTHING",
                new_rows,
            )
        if changes:
            db.execute_many(
                "UPDATE egress SET url = ?, country = ?, weight = ?, tags = ? WHERE id = ?",
                changes,
            )
    return Imported(len(new_rows), updated, unsupported, len(changes))
