"""The egress pool as seed 002's pool API: ``/proxies``, ``/stats``, leases and tests.

Every egress (added with ``datorus egress add`` or found by a source) is a "proxy" here,
in seed 002's shape: upstream proxies with their host and port (never their
credentials), source addresses with their address. ``status`` is what the checks left
it as (``datorus_core.egress_status``): ``unchecked`` until its checks first pass (it
carries no traffic yet), ``active``, ``dead`` after ``egress_dead_after`` failed checks
in a row (it recovers when one passes); ``disabled`` when the operator disabled it.
``POST /proxies/acquire`` leases one to the caller alone (``datorus_core.leases``);
``POST /proxies/test`` sends one GET through each of the best matching egress, through
the gateway and billed to the caller. The read-only routes take a customer's or the
operator's key; the pool is filled with ``datorus egress`` and by proxy-list sources
(``routes_sources``).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Path, Query
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..checkers.registry import installed_checkers
from ..egress import COUNTRY_PATTERN
from ..envelope import DatorusError
from ..judge import default_judge_url
from ..ledger import egress as el
from ..ledger import events as ledger_events
from ..ledger import leases
from ..ledger import sources as ledger_sources
from ..live import Lease
from ..notifiers import load_notifiers
from ..sources.registry import installed_parsers
from .deps import Account, ActiveAccount, AnyKey, Cursor, Limit, State
from .models import AcquireIn, Body
from .store import decode_cursor, listing, page_items
from .via_gateway import check_url, gateway_error, require_gateway, through_gateway
from .views import proxy_view

router = APIRouter(tags=["pool"])

_STAGES = {1: "tcp_connect", 2: "http_anonymity"}  # rows written before checkers had names
_SORTS = {
    "score": ("score", "desc"),
    "latency": ("avg_latency_ms", "asc"),
    "uptime": ("uptime_pct", "desc"),
    "last_checked": ("last_checked_at", "desc"),
}


def _checked_since(stamp: str | None, minutes: int, now: float) -> bool:
    if stamp is None:
        return False
    at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    return now - at <= minutes * 60


@router.get("/proxies")
async def list_proxies(
    who: AnyKey,
    st: State,
    status: Literal["active", "dead", "unchecked", "disabled"] | None = None,
    protocol: Literal["direct", "http", "https", "socks4", "socks5"] | None = None,
    anonymity: Literal["transparent", "anonymous", "elite"] | None = None,
    country: Annotated[str | None, Query(pattern=COUNTRY_PATTERN)] = None,
    min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_latency_ms: Annotated[float | None, Query(ge=0)] = None,
    min_uptime_pct: Annotated[float | None, Query(ge=0, le=100)] = None,
    verified_within_minutes: Annotated[int | None, Query(ge=1)] = None,
    sort: Literal["score", "latency", "uptime", "last_checked"] = "score",
    order: Literal["asc", "desc"] | None = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Any:
    """The pool, filtered and sorted as seed 002's ``GET /proxies`` (cursor pages).

    Proxies without a value for the sort field (never checked) come last either way.
    """
    decode_cursor(cursor)  # a bad cursor is refused before any work
    rows = await run_in_threadpool(lambda: el.list_egress(st.store.db()))
    now = time.time()
    items = [proxy_view(r) for r in rows]
    keep = [
        p
        for p in items
        if (status is None or p["status"] == status)
        and (protocol is None or p["protocol"] == protocol)
        and (anonymity is None or p["anonymity"] == anonymity)
        and (country is None or p["country"] == country.upper())
        and (min_score is None or p["score"] >= min_score)
        and (max_latency_ms is None or (p["avg_latency_ms"] or 1e18) <= max_latency_ms)
        and (min_uptime_pct is None or (p["uptime_pct"] or 0) >= min_uptime_pct)
        and (
            verified_within_minutes is None
            or _checked_since(p["last_checked_at"], verified_within_minutes, now)
        )
    ]
    field, default = _SORTS[sort]
    desc = (order or default) == "desc"
    present = [p for p in keep if p[field] is not None]
    absent = [p for p in keep if p[field] is None]
    present.sort(key=lambda p: p["id"])
    present.sort(key=lambda p: p[field], reverse=desc)
    return listing(*page_items(present + absent, limit, cursor, by_id=False))


@router.get("/proxies/{proxy_id}")
async def get_proxy(who: AnyKey, st: State, proxy_id: Annotated[int, Path(ge=1, le=2**62)]) -> Any:
    """One proxy and its recent checks, newest first (404 ``RESOURCE_NOT_FOUND``)."""

    def read() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        db = st.store.db()
        return el.get_egress(db, proxy_id), el.recent_checks(db, proxy_id)

    row, checks = await run_in_threadpool(read)
    return {
        "proxy": proxy_view(row),
        "recent_checks": [
            {
                "checker_name": (
                    _STAGES.get(c["stage"], "check")
                    if c["checker_name"] == "gateway"
                    else c["checker_name"]
                ),
                "stage": c["stage"],
                "passed": bool(c["passed"]),
                "latency_ms": c["latency_ms"],
                "exit_ip": c["exit_ip"],
                "detail": c["detail"],
                "created_at": c["created_at"],
            }
            for c in checks
        ],
    }


@router.get("/stats/pool")
async def pool_stats(who: AnyKey, st: State) -> Any:
    """Pool health overview (seed 002): counts by status, protocol and anonymity (summed
    by the ledger: a pool of thousands costs the gateway no per-proxy work)."""

    def read() -> tuple[dict[str, Any], dict[str, Any]]:
        db = st.store.db()
        return el.pool_counts(db), ledger_sources.source_stats(db)

    counts, sources = await run_in_threadpool(read)
    score, lat = counts["avg_score"], counts["avg_latency_ms"]
    return {
        "total_proxies": counts["total"],
        "by_status": counts["by_status"],
        "by_protocol": counts["by_protocol"],
        "by_anonymity": counts["by_anonymity"],
        "avg_score": round(score, 3) if score is not None else None,
        "avg_latency_ms": round(lat, 1) if lat is not None else None,
        **sources,  # sources_total, sources_active, last_scrape_at
        "last_validation_at": counts["last_checked_at"],
    }


@router.get("/stats/plugins")
async def plugin_stats(who: AnyKey, st: State) -> Any:
    """The plugins, from their registries: parsers (``datorus.parsers``) and checkers
    (``datorus.checkers``) with the package that registered each (one that failed to
    load shows ``loaded: false`` and why), and the notifiers (``datorus.notifiers``):
    each with its subscriptions (the operator's notifiers of that kind) and the outbox's
    record of their deliveries: ``last_success_at``,
    ``last_failure_at`` and ``last_failure`` (why), ``deliveries`` by status;
    ``healthy`` is null before any delivery, else whether the last one succeeded.
    ``customer_webhooks`` counts the customers' webhooks and their deliveries by status,
    apart: one customer's failing receiver is not the operator's plugin health.

    A checker's health is its record in the ledger, written with every check by every
    gateway on it: ``runs``, ``failures`` (checks it did not pass), ``errors`` (it
    raised: a plugin's bug, the check went on without it), the time and detail of the
    last of each; ``healthy`` is null before its first run, false when its last run
    raised. ``enabled`` is false for a checker with nothing to do here (the HTTP check
    without a judge: ``egress_check_url: none``, or the API off with no ``public_url``).
    """
    parsers = await run_in_threadpool(installed_parsers)
    checkers = await run_in_threadpool(installed_checkers)
    health = await run_in_threadpool(lambda: el.checker_health(st.store.db()))
    notifiers, broken = await run_in_threadpool(load_notifiers)
    sent = await run_in_threadpool(lambda: ledger_events.plugin_health(st.store.db()))
    hooks = await run_in_threadpool(
        lambda: ledger_events.plugin_health(st.store.db(), customers=True)
    )
    judge = default_judge_url(st.settings) is not None
    return {
        "parsers": [p.info() for p in parsers.plugins] + [f.info() for f in parsers.failures],
        "checkers": [
            {
                **p.info(),
                "enabled": judge or p.name != "http_anonymity",
                **checker_view(health.get(p.name)),
            }
            for p in checkers.plugins
        ]
        + [f.info() for f in checkers.failures],
        "notifiers": [
            {
                "name": p.name,
                "type": type(p.obj).__name__,
                "package": p.package,
                "version": p.version,
                "module": p.module,
                "loaded": True,
                **notifier_view(sent.get(p.name)),
            }
            for p in notifiers.values()
        ]
        + [f.info() for f in broken],
        # the customers' webhooks, apart from the operator's notifiers: how many and how
        # their deliveries went (a customer's dead receiver is not the plugin's health)
        "customer_webhooks": _counts(hooks.get("webhook")),
    }


def _counts(h: dict[str, Any] | None) -> dict[str, Any]:
    view = notifier_view(h)
    return {"subscriptions": view["subscriptions"], "deliveries": view["deliveries"]}


def notifier_view(h: dict[str, Any] | None) -> dict[str, Any]:
    """A notifier's health as ``/stats/plugins`` shows it (nulls before any delivery)."""
    h = h or {}
    ok, bad = h.get("last_success_at"), h.get("last_failure_at")
    return {
        "healthy": None if ok is None and bad is None else bad is None or (ok or "") >= bad,
        "subscriptions": h.get("subscriptions", 0),
        "last_success_at": ok,
        "last_failure_at": bad,
        "last_failure": h.get("last_failure"),
        "deliveries": {k: (h.get("deliveries") or {}).get(k, 0)
                       for k in ("pending", "delivered", "failed")},
    }  # fmt: skip


def checker_view(h: dict[str, Any] | None) -> dict[str, Any]:
    """A checker's health as ``/stats/plugins`` shows it (nulls before its first run)."""
    if h is None:
        h = {}
    last_run, last_error = h.get("last_run_at"), h.get("last_error_at")
    return {
        "healthy": None if last_run is None else last_error != last_run,
        "runs": h.get("runs", 0),
        "failures": h.get("failures", 0),
        "errors": h.get("errors", 0),
        "last_run_at": last_run,
        "last_failure_at": h.get("last_failure_at"),
        "last_failure": h.get("last_failure"),
        "last_error_at": last_error,
        "last_error": h.get("last_error"),
    }


# -- leases -------------------------------------------------------------------------------


@router.post("/proxies/acquire")
async def acquire(acc: ActiveAccount, st: State, body: AcquireIn) -> Any:
    """Lease the best-scored free egress matching the filters, for the caller alone.

    Costs ``lease_price_cents`` (default 1) from the balance when taken, not refunded
    on release. Send requests through it with ``X-Datorus-Lease-Id: LEASE_ID`` or the
    username option ``-lease-LEASE_ID``; no other request leaves by it meanwhile.
    402 ``INSUFFICIENT_BALANCE``; 404 ``RESOURCE_NOT_FOUND`` when nothing matches;
    429 ``RATE_LIMITED`` with ``Retry-After`` when every match is leased.
    """
    filters = body.model_dump(exclude={"lease_duration_seconds"})
    price = int(st.settings.get("lease_price_cents", 1))
    out = await run_in_threadpool(
        lambda: leases.acquire(
            st.store.db(),
            acc["id"],
            filters,
            body.lease_duration_seconds,
            price,
            int(time.time()),
            int(st.settings.get("max_leases_per_account", 5)),
        )
    )
    if st.router is not None:  # the gateway serving us: the lease holds from now on
        st.router.add_lease(
            Lease(out["lease_id"], acc["id"], out["proxy"]["id"], out["expires_ts"])
        )
    return out


@router.post("/proxies/acquire/{lease_id}/release")
async def release(acc: Account, st: State, lease_id: Annotated[str, Path(max_length=64)]) -> Any:
    """End a lease early: the egress is free at once (the charge is not refunded)."""
    out = await run_in_threadpool(
        lambda: leases.release(st.store.db(), acc["id"], lease_id, int(time.time()))
    )
    if st.router is not None:
        st.router.end_lease(lease_id)
    return out


# -- testing the pool against a URL ---------------------------------------------------------


class ProxyTestIn(Body):
    """``POST /proxies/test`` (seed 002)."""

    url: str = Field(max_length=4096, examples=["https://example.com/"])
    count: int = Field(default=5, ge=1, le=20)
    timeout_seconds: int = Field(default=10, ge=1, le=60)
    protocol: Literal["direct", "http", "https", "socks4", "socks5"] | None = None
    country: str | None = Field(default=None, pattern=COUNTRY_PATTERN)


@router.post("/proxies/test")
async def try_proxies(acc: ActiveAccount, st: State, body: ProxyTestIn) -> Any:
    """Whether the best proxies can reach ``url`` (seed 002): one GET through each.

    Up to ``count`` healthy egress that match ``protocol``/``country`` (best score
    first; not those leased to others) each carry one GET through the gateway, billed
    to the caller like any request, under the acceptable-use policy. Per proxy:
    ``reachable``, ``status_code``, ``latency_ms`` or ``error``. A refusal that is not
    about the proxy (403 ``AUP_VIOLATION``, 402, 429) is the whole answer.
    """
    require_gateway(st, "POST /proxies/test")
    u = check_url(body.url)
    router_ = st.router
    assert router_ is not None  # require_gateway
    now = time.monotonic()
    leased = router_.leases.leased_now(time.time())
    mine = {lease.egress_id for lease in router_.leases.of_account(acc["id"])}
    pool = [
        e
        for e in router_.pool.candidates(body.country)
        if e.up(now)
        and (body.protocol is None or e.spec.kind == body.protocol)
        and (e.id not in leased or e.id in mine)
    ]
    pool.sort(key=lambda e: (-e.score, e.id))
    chosen = pool[: body.count]
    if not chosen:
        raise DatorusError(
            "RESOURCE_NOT_FOUND",
            message="No healthy proxy in the pool matches these filters.",
            details={"protocol": body.protocol, "country": body.country},
        )

    async def one(e: Any) -> dict[str, Any]:
        started = time.monotonic()
        out: dict[str, Any] = {
            "proxy_id": e.id,
            "ip": e.spec.address or e.exit_ip,
            "port": e.spec.port,
            "reachable": False,
            "status_code": None,
            "latency_ms": None,
            "error": None,
        }
        try:
            resp, data, _ = await through_gateway(
                st,
                acc["id"],
                "GET",
                u,
                {"X-Datorus-Egress-Pin": router_.vouch(str(e.id))},
                None,
                body.timeout_seconds,
                max_body=65536,
            )
        except httpx.TimeoutException:
            out["error"] = f"no answer within {body.timeout_seconds} s"
            return out
        except httpx.HTTPError as x:
            out["error"] = str(x)[:200] or type(x).__name__
            return out
        if gateway_error(resp):
            err = json.loads(data)["error"]
            if err["code"] in (
                "AUP_VIOLATION",
                "INSUFFICIENT_BALANCE",
                "TRIAL_EXHAUSTED",
                "RATE_LIMITED",
                "ACCOUNT_SUSPENDED",
            ):
                raise DatorusError(
                    err["code"],
                    message=err["message"],
                    details=err["details"],
                    headers={k: v for k, v in resp.headers.items() if k.lower() == "retry-after"},
                )
            reason = (err.get("details") or {}).get("reason")
            out["error"] = f"{err['code']}: {reason}" if reason else err["code"]
            if err["code"] == "GATEWAY_TIMEOUT":  # the gateway's timer ran timeout_seconds
                out["error"] = f"no answer within {body.timeout_seconds} s"
            return out
        out.update(
            reachable=True,
            status_code=resp.status_code,
            latency_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return out

    results = await asyncio.gather(*(one(e) for e in chosen))
    ok = sum(r["reachable"] for r in results)
    return {"url": body.url, "results": results, "success_rate": round(ok / len(results), 3)}
