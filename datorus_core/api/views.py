"""Views the API's routes and the web console share: one row or summary as both show it.

Routes never import each other (``tests/unit/test_import_graph.py``); what two of them
(or a route and the console) show alike lives here, over the ledger functions and the
gateway's live routing state.
"""

from __future__ import annotations

import time
from typing import Any

from .. import egress as eg
from ..domains import HOSTS_FOLDED, by_registrable
from ..egress import parse_egress_url
from ..envelope import request_id_floor
from ..ledger import usage as ledger_usage
from .state import ApiState


def receipt_view(r: dict[str, Any]) -> dict[str, Any]:
    """One receipt as the API shows it."""
    return {
        "request_id": r["request_id"],
        "credential_id": r["credential_id"],
        "method": r["method"],
        "host": r["host"],
        "port": r["port"],
        "status": r["status"],
        "bytes_up": r["bytes_up"],
        "bytes_down": r["bytes_down"],
        "trial_bytes": r["trial_bytes"],
        "charged_nanocents": r["nanocents"],
        "started_at": r["started_at"],
        "finished_at": r["finished_at"],
        # the Datorus code of a refused SOCKS5 request (its client saw only a reply byte)
        "code": r.get("code"),
    }


def domain_usage(st: ApiState, account_id: int, days: int, limit: int) -> list[dict[str, Any]]:
    """The account's usage by registrable destination domain over the last *days* days,
    most bytes first (``hosts``: how many host names it covers)."""
    since = request_id_floor(int((time.time() - days * 86400) * 1000))
    hosts = ledger_usage.by_host(st.store.db(), account_id, since, HOSTS_FOLDED)
    return [
        {"domain": d["domain"], "hosts": d["hosts"], **usage_counters(d)}
        for d in by_registrable(hosts, limit)
    ]


def usage_counters(d: dict[str, Any]) -> dict[str, Any]:
    """A usage row's counters (the ledger's camelCase) as the API spells them."""
    return {
        "requests": d["requests"],
        "bytes_up": d["bytesUp"],
        "bytes_down": d["bytesDown"],
        "bytes": d["bytes"],
        "trial_bytes": d["trialBytes"],
        "charged_nanocents": d["chargedNanocents"],
    }


def _status(r: dict[str, Any]) -> str:
    return str(r["status"]) if r["enabled"] else "disabled"


def proxy_view(r: dict[str, Any]) -> dict[str, Any]:
    """One egress (a ``ledger.egress`` row view) in seed 002's proxy shape."""
    spec = parse_egress_url(r["url"])
    return {
        "id": r["id"],
        "ip": spec.address,
        "port": spec.port if spec.is_proxy else None,
        "protocol": spec.kind,
        "url": spec.customer_url(),
        "status": _status(r),
        "anonymity": r["anonymity"],
        "exit_ip": r["exitIp"],
        "country": r["country"].upper() if r["country"] else None,
        "score": round(r["score"], 3),
        "avg_latency_ms": r["avgLatencyMs"],
        "uptime_pct": r["uptimePct"],
        "last_checked_at": r["lastCheckedAt"],
        "first_seen_at": r["createdAt"],
        "tags": {**r.get("tags", {}), "kind": r["kind"], "weight": r["weight"]},
        "source_id": r.get("sourceId"),
    }


def blocks_by_domain(st: ApiState, limit: int = 50) -> dict[str, Any]:
    """Which destination domains have egress limited or unavailable now, most first.

    Block states live in the gateway (``/network/health/{domain}`` reads the same
    ones); a standalone ``datorus api`` has none to show (``live: false``).
    """
    router_state = st.router
    if router_state is None:
        return {"live": False, "items": [], "total": 0}
    now = time.monotonic()
    found: dict[str, dict[str, Any]] = {}
    for e in list(router_state.pool.by_id.values()):
        for domain, h in list(e.domains.items()):
            state = h.state(now)
            if state == eg.OK:
                continue
            row = found.setdefault(
                domain, {"domain": domain, "limited": 0, "unavailable": 0, "egress": []}
            )
            row[state] = row.get(state, 0) + 1
            row["egress"].append(e.id)
            wait = max(0.0, h.until - now)
            row["recovers_in"] = min(row.get("recovers_in", wait), wait)
    items = sorted(found.values(), key=lambda r: (-len(r["egress"]), r["domain"]))
    return {"live": True, "items": items[:limit], "total": len(items)}
