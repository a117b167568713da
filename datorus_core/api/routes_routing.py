"""Routing insight (seed 001): which egress a request would take, and a domain's health.

``GET /debug/pick?url=`` previews the choice the gateway would make for the caller's
next request to *url* (with the same targeting and session headers the proxy reads)
without making it: no session is pinned or kept alive. ``GET /network/health/{domain}``
shows each egress's state for a domain (ok, limited, unavailable, disabled) and when
the first excluded one comes back.

Served by the gateway both read its live pool, block states and sessions (in the
event loop, where the gateway changes them); standalone (``datorus api``) they read
the pool from the ledger and say ``"live": false``: blocks and sessions live only in
the gateway.
"""

from __future__ import annotations

import ipaddress
import random
import re
import time
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Header, Path, Query
from starlette.concurrency import run_in_threadpool

from .. import egress as eg
from .. import leases
from ..envelope import DatorusError
from ..sessions import valid_session_id
from .deps import Account, State

router = APIRouter(tags=["routing"])

_DOMAIN_RE = re.compile(r"[A-Za-z0-9._:\[\]-]{1,253}")  # fullmatch only
_rng = random.Random()


def _bad(field: str, reason: str) -> DatorusError:
    return DatorusError("VALIDATION_ERROR", details={"field": field, "reason": reason})


def _domain(host: str) -> str:
    """The gateway's key for a destination: lower case, no trailing dot, no brackets."""
    return host.strip("[]").rstrip(".").lower()


def _family(domain: str) -> int | None:
    """4 or 6 for an IP literal (a source address only reaches its own family)."""
    try:
        return ipaddress.ip_address(domain).version
    except ValueError:
        return None


def _ledger_pool(st: Any) -> tuple[eg.Pool, frozenset[int]]:
    """The pool and the leased egress as the ledger holds them (standalone API: no live
    block state)."""
    db = st.store.db()
    items = []
    for row in db.execute(eg.EGRESS_ROWS_SQL).fetchall():
        try:
            items.append(eg.egress_from_row(tuple(row)))
        except ValueError:
            continue
    live = db.execute(leases.ACTIVE_SQL, [int(time.time())]).fetchall()
    return eg.Pool(items), frozenset(row[2] for row in live)


async def _pool(st: Any) -> tuple[eg.Pool, frozenset[int], bool]:
    """The pool, the egress ids under a live lease, and whether this is the live view."""
    if st.router is not None:
        return st.router.pool, st.router.leased_now(), True
    pool, leased = await run_in_threadpool(_ledger_pool, st)
    return pool, leased, False


def _view(e: eg.Egress, domain: str, now: float, leased: frozenset[int]) -> dict[str, Any]:
    state = e.state_for(domain, now) if e.up(now) else eg.UNAVAILABLE
    if e.id in leased and state == eg.OK:
        state = "leased"
    return {
        "id": e.id,
        "url": e.spec.customer_url(),
        "country": e.country,
        "state": state,
        "score": round(e.score, 3),
        "exit_ip": e.exit_ip,
    }


@router.get("/debug/pick")
async def debug_pick(
    acc: Account,
    st: State,
    url: Annotated[str, Query(min_length=1, max_length=4096, description="The target URL.")],
    country: Annotated[str | None, Query(description="Targeting, as X-Datorus-Country.")] = None,
    session_id: Annotated[str | None, Query(description="As X-Datorus-Session-Id.")] = None,
    x_datorus_country: Annotated[str | None, Header()] = None,
    x_geo: Annotated[str | None, Header()] = None,
    x_datorus_session_id: Annotated[str | None, Header()] = None,
) -> Any:
    """Preview the egress the gateway would choose for this account's request to *url*.

    Targeting and session come from the query or the proxy's headers
    (``X-Datorus-Country`` / ``X-Geo``, ``X-Datorus-Session-Id``). A live session shows
    its pinned egress (``pinned``: true) while that egress stays usable; otherwise
    ``egress`` is one weighted draw, and ``candidates`` gives every egress's chance.
    Nothing is pinned and no session is kept alive. No egress left: 502
    ``UPSTREAM_FAILED`` with the ``details.reason`` the proxy would answer.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError as e:
        raise _bad("url", str(e)) from None
    if parts.scheme.lower() not in ("http", "https", "ws", "wss") or not host:
        raise _bad("url", "must be an absolute http(s) or ws(s) URL with a host")
    cc = country or x_datorus_country or x_geo
    if cc is not None and not eg.valid_country(cc):
        raise _bad("country", "must be two letters")
    cc = cc.lower() if cc else None
    sid = session_id if session_id is not None else x_datorus_session_id
    sid = sid if valid_session_id(sid) else None  # invalid ids are ignored, as by the proxy
    domain = _domain(host)
    pool, exclude, live = await _pool(st)
    now = time.monotonic()
    answer: dict[str, Any] = {
        "url": url,
        "domain": domain,
        "port": port or (443 if parts.scheme.lower() in ("https", "wss") else 80),
        "country": cc,
        "session_id": sid,
        "live": live,
    }
    if not pool.by_id:
        return {**answer, "route": "default", "pinned": False, "egress": None, "candidates": []}
    family = _family(domain)
    pinned = None
    if sid and live and st.router.sessions is not None:
        eid = st.router.sessions.peek(acc["id"], sid, now)
        e = pool.by_id.get(eid) if eid is not None else None
        if e is not None and pool.usable(e, domain, now, family) and cc in (None, e.country):
            pinned = e
    if pinned is not None and pinned.id in exclude:
        pinned = None  # leased to someone since: the session would move
    try:
        chosen = pinned or pool.pick(domain, cc, now, _rng, family=family, exclude=exclude)
    except eg.NoEgress as x:
        details: dict[str, Any] = {"reason": x.reason, **x.details}
        if x.reason == "no_healthy_egress":
            details["retryAfterSeconds"] = eg.domain_health(pool, domain, now)["retryAfterSeconds"]
        raise DatorusError(
            "UPSTREAM_FAILED",
            message="No healthy egress can reach this destination right now.",
            details=details,
        ) from None
    candidates = pool.candidates(cc)
    ok = [e for e in candidates if pool.usable(e, domain, now, family) and e.id not in exclude]
    fine = [e for e in ok if e.state_for(domain, now) == eg.OK] or ok
    weights = {e.id: max(e.score, 0.02) * max(e.weight, 1) for e in fine}
    total = sum(weights.values()) or 1.0
    return {
        **answer,
        "route": "pool",
        "pinned": pinned is not None,
        "egress": _view(chosen, domain, now, frozenset()),
        "candidates": [
            {**_view(e, domain, now, exclude), "chance": round(weights.get(e.id, 0.0) / total, 4)}
            for e in candidates
        ],
    }


@router.get("/network/health/{domain}")
async def network_health(
    acc: Account,
    st: State,
    domain: Annotated[str, Path(description="A destination host name or IP address.")],
) -> Any:
    """Each egress's state for *domain* (seed 001): ``ok``, ``limited``, ``unavailable``,
    ``disabled`` or ``leased`` (exclusive to one account), when an excluded one
    recovers, and ``retryAfterSeconds`` when none is available now."""
    if not _DOMAIN_RE.fullmatch(domain) or not _domain(domain):
        raise _bad("domain", "must be a host name or an IP address")
    pool, leased, live = await _pool(st)
    health = eg.domain_health(pool, _domain(domain), time.monotonic(), leased)
    return {**health, "live": live}
