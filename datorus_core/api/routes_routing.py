"""Routing insight (seed 001): which egress a request would take, and a domain's health.

``GET /debug/pick?url=`` previews the choice the gateway would make for the caller's
next request to *url* (with the same targeting and session headers the proxy reads)
without making it: the same ``datorus_core.routing.choose`` the proxy calls, with a
session lookup that keeps nothing alive and a copy of the gateway's generator, so no
session is pinned or kept alive and the gateway's own draws are untouched.
``GET /network/health/{domain}`` shows each egress's state for a domain (ok, limited,
unavailable, disabled) and when the first excluded one comes back.

Served by the gateway both read its live pool, block states, leases and sessions
(``datorus_core.live.LiveRouting``, in the event loop, where the gateway changes
them); standalone (``datorus api``) they read
the pool from the ledger and say ``"live": false``: blocks and sessions live only in
the gateway.
"""

from __future__ import annotations

import ipaddress
import random
import re
import time
from typing import Annotated, Any, NamedTuple
from urllib.parse import urlsplit

from fastapi import APIRouter, Header, Path, Query
from starlette.concurrency import run_in_threadpool

from .. import egress as eg
from ..envelope import DatorusError
from ..ledger import egress as ledger_egress
from ..ledger import leases as ledger_leases
from ..live import Lease, LeaseBook, LeaseView, SessionLookup
from ..routing import Ask, chances, choose
from ..sessions import valid_session_id
from .deps import OPERATOR_ONLY, Account, Operator, State
from .state import ApiState
from .views import blocks_by_domain

router = APIRouter(tags=["routing"])

_DOMAIN_RE = re.compile(r"[A-Za-z0-9._:\[\]-]{1,253}")  # fullmatch only


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


class _Routing(NamedTuple):
    """The routing state a preview reads, and whether it is the gateway's live one."""

    pool: eg.Pool
    leases: LeaseView
    session: SessionLookup | None  # reads a session without keeping it alive
    rng: random.Random  # a generator the preview may draw from
    live: bool


def _ledger_pool(st: ApiState) -> tuple[eg.Pool, LeaseBook]:
    """The pool and the leases as the ledger holds them (standalone API: no live
    block state)."""
    db = st.store.db()
    items = []
    for row in ledger_egress.pool_rows(db):
        try:
            items.append(eg.egress_from_row(row))
        except ValueError:
            continue
    live = ledger_leases.active_rows(db, int(time.time()))
    return eg.Pool(items), LeaseBook(Lease.from_row(row) for row in live)


async def _routing(st: ApiState) -> _Routing:
    """The gateway's live routing state, or (standalone) the ledger's pool and leases."""
    r = st.router
    if r is not None:
        return _Routing(r.pool, r.leases, r.peek_session, r.preview_rng(), True)
    pool, book = await run_in_threadpool(_ledger_pool, st)
    # standalone there is no gateway generator to copy: a throwaway one
    return _Routing(pool, book, None, random.Random(), False)


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
    ``egress`` is the weighted draw the gateway's next request would make (from a copy
    of its generator), and ``candidates`` gives every egress's chance. Nothing is
    pinned, no session is kept alive and the gateway draws nothing. No egress left: 502
    ``UPSTREAM_FAILED`` with the ``details`` the proxy would answer.
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
    view = await _routing(st)
    pool = view.pool
    now, wall = time.monotonic(), time.time()
    answer: dict[str, Any] = {
        "url": url,
        "domain": domain,
        "port": port or (443 if parts.scheme.lower() in ("https", "wss") else 80),
        "country": cc,
        "session_id": sid,
        "live": view.live,
    }
    family = _family(domain)
    ask = Ask(acc["id"], domain, family, sid, cc)
    session = view.session
    if sid and st.router is not None:
        # the session as every worker of the gateway sees it, read once, kept alive never
        pinned = await st.router.pinned_session(acc["id"], sid, now)
        session = lambda _a, _s, _n: pinned  # noqa: E731
    go = choose(ask, pool, view.leases, now, wall, view.rng, session)
    if go is None:
        return {**answer, "route": "default", "pinned": False, "egress": None, "candidates": []}
    exclude = view.leases.leased_now(wall)
    odds = chances(pool, domain, cc, now, family, exclude)
    return {
        **answer,
        "route": "pool",
        "pinned": go.pinned,
        "egress": _view(go.egress, domain, now, frozenset()),
        "candidates": [
            {**_view(e, domain, now, exclude), "chance": round(odds[e.id], 4)}
            for e in pool.candidates(cc)
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
    view = await _routing(st)
    leased = view.leases.leased_now(time.time())
    health = eg.domain_health(view.pool, _domain(domain), time.monotonic(), leased)
    return {**health, "live": view.live}


@router.get("/network/blocks", openapi_extra=OPERATOR_ONLY)
async def network_blocks(
    op: Operator, st: State, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> Any:
    """Operator only: the destination domains that have egress ``limited`` or
    ``unavailable`` now, most egress first, with the egress ids and when the first one
    recovers (``live: false`` from a standalone ``datorus api``: blocks live in the
    gateway)."""
    return blocks_by_domain(st, limit)
