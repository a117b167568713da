"""Seed 001's fetch endpoint: ``POST /fetch`` asks the gateway to fetch a URL for you.

The request goes through the gateway's own proxy port like any customer request, so
everything applies exactly as on the wire: acceptable use, rate limits, metering and
billing (with a receipt under the returned ``meta.request_id``), egress selection,
sticky sessions and block detection. It authenticates with a credential the API keeps
for the account (label ``api fetch``, listed with the others; a new one per gateway
process, the previous ones revoked). The answer is the target's response as JSON with
``meta.blocked`` and the egress used. An error the gateway produced itself (402, 403,
429, 502, 504...) comes back as that envelope, with its status and headers.

Served only by the gateway process (standalone ``datorus api`` has no proxy to use).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .. import ledger
from ..envelope import DatorusError
from ..sessions import valid_session_id
from .deps import ActiveAccount, State

router = APIRouter(tags=["routing"])

FETCH_LABEL = "api fetch"
MAX_BODY = 10 * 1024 * 1024  # bytes of the target's body returned (the rest: truncated)
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"}
_TEXT = ("text/", "json", "xml", "javascript", "html")
_lock = asyncio.Lock()


class FetchIn(BaseModel):
    """``POST /fetch``: what to fetch, and how to route it."""

    url: str = Field(max_length=4096, examples=["https://example.com/"])
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    headers: dict[str, Annotated[str, Field(max_length=8192)]] = Field(
        default_factory=dict, max_length=100
    )
    body: str | None = Field(default=None, max_length=1_048_576)
    timeout: int = Field(default=30, ge=1, le=120, description="Seconds to wait for the answer.")
    country: str | None = Field(default=None, pattern=r"^[A-Za-z]{2}$")
    session_id: str | None = Field(default=None, max_length=128)


def _bad(field: str, reason: str) -> DatorusError:
    return DatorusError("VALIDATION_ERROR", details={"field": field, "reason": reason})


async def _credential(st: Any, account_id: int) -> tuple[str, str]:
    """This process's fetch credential for the account, live at the gateway."""
    creds: dict[int, tuple[str, str]] = st.extra.setdefault("fetch_creds", {})
    async with _lock:
        cred = creds.get(account_id)
        if cred is None:

            def make() -> tuple[str, str]:
                db = st.store.db()
                for row in db.query(
                    "SELECT username FROM credentials"
                    " WHERE account_id = ? AND label = ? AND revoked_at IS NULL",
                    [account_id, FETCH_LABEL],
                ):
                    ledger.revoke_credential(db, row["username"], account_id)
                out = ledger.create_credential(db, account_id, label=FETCH_LABEL)
                return out["username"], out["password"]

            cred = creds[account_id] = await run_in_threadpool(make)
    deadline = time.monotonic() + 5
    while st.runtime.by_username.get(cred[0]) is None:  # the gateway reloads within 0.5 s
        if time.monotonic() > deadline:
            raise DatorusError("SERVICE_UNAVAILABLE", headers={"Retry-After": "1"})
        await asyncio.sleep(0.05)
    return cred


def _egress_view(st: Any, header: str | None) -> dict[str, Any] | None:
    e = st.router.pool.by_id.get(int(header)) if header and header.isdigit() else None
    if e is None:
        return None
    return {"id": e.id, "url": e.spec.customer_url(), "country": e.country, "exit_ip": e.exit_ip}


def require_gateway(st: Any, what: str) -> None:
    """503 unless the gateway process serves this API (standalone has no proxy to use)."""
    if st.extra.get("proxy_url") is None or st.runtime is None or st.router is None:
        raise DatorusError(
            "SERVICE_UNAVAILABLE",
            message=f"{what} is served by the gateway process, not by 'datorus api'.",
            details={"reason": "gateway_only"},
            headers={"Retry-After": "60"},
        )


def check_url(url: str) -> SplitResult:
    """*url* split, if it is an absolute http(s) URL with a host (else 400 on ``url``)."""
    try:
        u = urlsplit(url)
        host, _ = u.hostname, u.port
    except ValueError as e:
        raise _bad("url", str(e)) from None
    if u.scheme.lower() not in ("http", "https") or not host:
        raise _bad("url", "must be an absolute http(s) URL with a host")
    return u


async def through_gateway(
    st: Any,
    account_id: int,
    method: str,
    u: SplitResult,
    headers: dict[str, str],
    body: str | None,
    timeout: float,
    max_body: int = MAX_BODY,
) -> tuple[httpx.Response, bytes, bool]:
    """Send one request for the account through the gateway's own proxy port.

    Returns the response (its headers), up to *max_body* bytes of its body and whether
    more was cut off. Raises httpx's errors (timeouts included).
    """
    user, password = await _credential(st, account_id)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    headers = {
        **headers,
        "Host": u.netloc.rpartition("@")[2],
        "Proxy-Authorization": f"Basic {auth}",
        "X-Datorus-Egress-Report": "1",
    }
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        req = client.build_request(
            method,
            st.extra["proxy_url"],
            headers=headers,
            content=body.encode() if body is not None else None,
            extensions={"target": u.geturl().encode()},
        )
        resp = await client.send(req, stream=True)
        data = bytearray()
        truncated = False
        try:
            async for chunk in resp.aiter_raw():
                data.extend(chunk[: max_body - len(data)])
                if len(data) >= max_body:
                    truncated = True
                    break
        finally:
            await resp.aclose()
    return resp, bytes(data), truncated


def gateway_error(resp: httpx.Response) -> bool:
    """Whether *resp* is the gateway's own answer (an envelope), not the target's."""
    return resp.headers.get("proxy-status", "").startswith("datorus")


@router.post("/fetch")
async def fetch(acc: ActiveAccount, st: State, body: FetchIn, request: Request) -> Any:
    """Fetch ``url`` through the gateway (seed 001): the target's answer with ``meta``.

    ``meta.blocked`` is the gateway's block verdict (the egress is then avoided for
    that domain), ``meta.egress`` the way out it took, ``meta.request_id`` the
    receipt's id. Billed like any request of the account. Errors the gateway produced
    come back as its envelope; no answer within ``timeout``: 504 ``GATEWAY_TIMEOUT``.
    """
    require_gateway(st, "POST /fetch")
    u = check_url(body.url)
    if body.session_id is not None and not valid_session_id(body.session_id):
        raise _bad("session_id", "must match [A-Za-z0-9_-]{1,128}")
    for name, value in body.headers.items():
        if not name or any(c in name for c in " :\r\n\t") or any(c in value for c in "\r\n"):
            raise _bad("headers", f"invalid header {name[:50]!r}")
    headers = {
        k: v
        for k, v in body.headers.items()
        if k.lower() not in _HOP and not k.lower().startswith(("proxy-", "x-datorus-"))
    }
    if body.country:
        headers["X-Datorus-Country"] = body.country
    if body.session_id:
        headers["X-Datorus-Session-Id"] = body.session_id
    started = time.monotonic()
    try:
        resp, data, truncated = await through_gateway(
            st, acc["id"], body.method, u, headers, body.body, body.timeout
        )
    except httpx.TimeoutException:
        raise DatorusError("GATEWAY_TIMEOUT", details={"timeoutSeconds": body.timeout}) from None
    except httpx.HTTPError as e:
        raise DatorusError("UPSTREAM_FAILED", details={"reason": str(e)[:200]}) from None
    rid = resp.headers.get("x-datorus-request-id")
    if gateway_error(resp):
        # the gateway's own answer (402, 403, 429, 502, 504...): its envelope as it is
        if rid:
            request.state.request_id = rid
        keep = {
            k: v
            for k, v in resp.headers.items()
            if k.lower() == "retry-after" or k.lower().startswith("x-datorus-")
        }
        return JSONResponse(content=json.loads(data), status_code=resp.status_code, headers=keep)
    ctype = resp.headers.get("content-type", "").lower()
    raw = data
    text = ""
    if resp.headers.get("content-encoding"):
        encoding = "base64"  # compressed as the target sent it
    elif not ctype or any(t in ctype for t in _TEXT):
        try:
            text, encoding = raw.decode(resp.encoding or "utf-8"), "text"
        except (UnicodeDecodeError, LookupError):
            encoding = "base64"
    else:
        encoding = "base64"
    return {
        "status": resp.status_code,
        "headers": {
            k: v for k, v in resp.headers.items() if not k.lower().startswith("x-datorus-")
        },
        "body": text if encoding == "text" else base64.b64encode(raw).decode(),
        "body_encoding": encoding,
        "truncated": truncated,
        "meta": {
            "blocked": resp.headers.get("x-datorus-blocked") == "1",
            "egress": _egress_view(st, resp.headers.get("x-datorus-egress-id")),
            "request_id": rid,
            "session_id": resp.headers.get("x-datorus-session-id"),
            "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
            "rate_limit": {
                "limit": resp.headers.get("x-datorus-ratelimit-limit"),
                "remaining": resp.headers.get("x-datorus-ratelimit-remaining"),
                "reset": resp.headers.get("x-datorus-ratelimit-reset"),
            },
        },
    }
