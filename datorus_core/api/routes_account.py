"""The account's views and proxy credentials: ``/account...`` and ``GET /usage``."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from ..ledger import accounts, allowed_ips, leases
from ..ledger import usage as ledger_usage
from . import store
from .deps import Account, ActiveAccount, Cursor, Limit, State
from .models import AllowedIpIn, CredentialIn
from .views import domain_usage, receipt_view, usage_counters

router = APIRouter()


@router.get("/account", tags=["account"])
def get_account(acc: Account, st: State) -> Any:
    """Who you are, your status, trial, balance, price and limits."""
    return store.account_view(st.store.db(), acc["id"], st.settings)


@router.get("/account/credits", tags=["account"])
def get_credits(acc: Account, st: State, limit: Annotated[int, Query(ge=1, le=200)] = 20) -> Any:
    """The balance in cents and the most recent transactions (seed 002's shape)."""
    return store.credits(st.store.db(), acc["id"], limit)


@router.get("/account/leases", tags=["account"])
def get_leases(acc: Account, st: State, limit: Limit = 50, cursor: Cursor = None) -> Any:
    """The account's live egress leases (``POST /proxies/acquire``), oldest first."""
    items = leases.for_account(st.store.db(), acc["id"], int(time.time()))
    return store.listing(*store.page_items(items, limit, cursor, by_id=False))


@router.get("/account/credentials", tags=["credentials"])
def list_credentials(acc: Account, st: State, limit: Limit = 50, cursor: Cursor = None) -> Any:
    """The account's proxy credentials (never their passwords)."""
    rows, nxt, total = store.page(
        st.store.db(), accounts.CREDENTIALS_SQL, [acc["id"]], limit, cursor
    )
    return store.listing([store.credential_view(r) for r in rows], nxt, total)


@router.post("/account/credentials", status_code=201, tags=["credentials"])
def create_credential(acc: ActiveAccount, st: State, body: CredentialIn | None = None) -> Any:
    """A new proxy credential; ``password`` is returned only in this response.

    The gateway accepts it within 2 seconds.
    """
    body = body or CredentialIn()
    c = accounts.create_credential(st.store.db(), acc["id"], body.max_bytes, body.label)
    return {
        "id": c["id"],
        "username": c["username"],
        "password": c["password"],
        "label": body.label,
        "max_bytes": c["maxBytes"],
    }


@router.delete("/account/credentials/{credential_id}", tags=["credentials"])
def revoke_credential(credential_id: str, acc: Account, st: State) -> Any:
    """Revoke a credential (by id or username); the gateway refuses it within 2 seconds."""
    return store.revoke_credential(st.store.db(), acc["id"], credential_id)


def _allowed_view(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": entry["id"],
        "cidr": entry["cidr"],
        "credential_id": entry["credentialId"],
        "username": entry["username"],
        "created_at": entry["createdAt"],
    }


@router.post(
    "/account/credentials/{credential_id}/allowed-ips", status_code=201, tags=["credentials"]
)
def add_allowed_ip(credential_id: str, body: AllowedIpIn, acc: ActiveAccount, st: State) -> Any:
    """Let requests from ``cidr`` in without credentials, as this credential (by id or
    username), within 2 seconds; on the SOCKS5 entry too (the "no authentication"
    method). A request that carries credentials is judged by them; where two CIDRs
    overlap, the most specific wins. A CIDR listed already (by anyone) is
    ``400 VALIDATION_ERROR`` with ``details.field = "cidr"``."""
    entry = allowed_ips.allow_ip(st.store.db(), credential_id, body.cidr, account_id=acc["id"])
    return _allowed_view(entry)


@router.get("/account/credentials/{credential_id}/allowed-ips", tags=["credentials"])
def list_allowed_ips(
    credential_id: str, acc: Account, st: State, limit: Limit = 50, cursor: Cursor = None
) -> Any:
    """The credential's allow-listed client CIDRs, in cursor pages by entry id."""
    rows = allowed_ips.list_allowed_ips(st.store.db(), acc["id"], credential_id)
    page, nxt, total = store.page_items(rows, limit, cursor)
    return store.listing([_allowed_view(r) for r in page], nxt, total)


@router.delete("/account/credentials/{credential_id}/allowed-ips", tags=["credentials"])
def remove_allowed_ip(
    credential_id: str, acc: Account, st: State, cidr: Annotated[str, Query(max_length=64)]
) -> Any:
    """Remove ``?cidr=`` from the credential's allow-listed client addresses (within 2 s)."""
    return allowed_ips.deny_ip(st.store.db(), credential_id, cidr, account_id=acc["id"])


@router.delete(
    "/account/credentials/{credential_id}/allowed-ips/{allowed_id}", tags=["credentials"]
)
def remove_allowed_ip_by_id(credential_id: str, allowed_id: int, acc: Account, st: State) -> Any:
    """Remove one allow-list entry by its id (within 2 s)."""
    allowed_ips.delete_entry(st.store.db(), acc["id"], credential_id, allowed_id)
    return {"id": allowed_id, "removed": True}


def _usage(st: Any, account_id: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict]:
    db = st.store.db()
    u = ledger_usage.usage(db, account_id, by_day=True)
    creds = [store.credential_view(r) for r in accounts.credential_rows(db, account_id, live=True)]
    return u, creds, store.account_view(db, account_id, st.settings)


@router.get("/usage", tags=["account"])
async def get_usage(
    acc: Account,
    st: State,
    by: Annotated[
        Literal["day", "domain"] | None,
        Query(description="'domain': usage by registrable destination domain instead."),
    ] = None,
    days: Annotated[int, Query(ge=1, le=366, description="With by=domain: days back.")] = 30,
    limit: Annotated[int, Query(ge=1, le=200, description="With by=domain: rows.")] = 50,
) -> Any:
    """Requests, bytes and charges (in total and per day) and the current rate-limit state;
    with ``by=domain``, requests, bytes and charges per registrable destination domain
    over the last *days* days, from the receipts (``www.example.co.uk`` and
    ``img.example.co.uk`` are ``example.co.uk``), most bytes first.

    Served by the gateway, ``rate_limit.credentials`` shows each credential's live
    bucket; standalone (``datorus api``) it shows the full burst.
    """
    if by == "domain":
        items = await run_in_threadpool(domain_usage, st, acc["id"], days, limit)
        return {"by": "domain", "days": days, "items": items}
    u, creds, view = await run_in_threadpool(_usage, st, acc["id"])
    rps = view["rate_limit"]["requests_per_second"]
    burst = view["rate_limit"]["burst"]
    rt = st.runtime
    live = rt is not None and getattr(rt, "loaded", False)
    now_mono, now = time.monotonic(), time.time()
    per_cred = []
    for c in creds:
        state = rt.by_username.get(c["username"]) if live else None
        if state is not None and state.limiter is not None:
            v = state.limiter.peek(now_mono)
            remaining, reset = v.remaining, math.ceil(now + v.reset_after)
        else:
            remaining, reset = burst, math.ceil(now)
        per_cred.append(
            {
                "username": c["username"],
                "limit": rps,
                "burst": burst,
                "remaining": remaining,
                "reset": reset,
                "used_bytes": c["used_bytes"],
                "max_bytes": c["max_bytes"],
            }
        )
    return {
        "account_id": acc["id"],
        "requests": u["requests"],
        "bytes": u["bytes"],
        "charged_cents": u["chargedCents"],
        "charged_nanocents": u["chargedNanocents"],
        "trial_remaining_bytes": u["trialRemainingBytes"],
        "balance_cents": u["balanceCents"],
        "balance_nanocents": u["balanceNanocents"],
        "price_cents_per_gb": view["price_cents_per_gb"],
        "days": [{"day": d["day"], **usage_counters(d)} for d in u["days"]],
        "rate_limit": {
            "requests_per_second": rps,
            "burst": burst,
            "live": live,
            "credentials": per_cred,
        },
    }


@router.get("/account/receipts", tags=["account"])
def get_receipts(acc: Account, st: State, limit: Limit = 20, cursor: Cursor = None) -> Any:
    """The receipts of the account's requests, newest first, in cursor pages (kept
    ``receipt_days``): request id, method, host, port, status, bytes and charge."""
    db, aid = st.store.db(), acc["id"]
    rows, nxt, total = store.page_newest(
        lambda before, n: ledger_usage.recent_receipts(db, aid, n, before),
        ledger_usage.receipt_count(db, aid),
        limit,
        cursor,
        key="request_id",
        kind=str,
    )
    return store.listing([receipt_view(r) for r in rows], nxt, total)


@router.get("/usage/domains", tags=["account"])
def get_usage_by_domain(
    acc: Account,
    st: State,
    days: Annotated[int, Query(ge=1, le=366, description="How many days back.")] = 30,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Any:
    """Usage by registrable destination domain over the last *days* days, most bytes
    first (from the receipts, which are kept ``receipt_days``); the same as
    ``GET /usage?by=domain``."""
    return {"by": "domain", "days": days, "items": domain_usage(st, acc["id"], days, limit)}
