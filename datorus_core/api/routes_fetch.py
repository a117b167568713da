"""Seed 001's fetch endpoint: ``POST /fetch`` asks the gateway to fetch a URL for you.

The request goes through the gateway's own proxy port like any customer request, so
everything applies exactly as on the wire: acceptable use, rate limits, metering and
billing (with a receipt under the returned ``meta.request_id``), egress selection,
sticky sessions and block detection. It authenticates with a credential the API keeps
for the account (label ``api fetch``, listed with the others; the same for every
gateway process on the ledger: ``via_gateway.credential``). The answer is the target's
response as JSON with ``meta.blocked`` and the egress used. An error the gateway
produced itself (402, 403, 429, 502, 504...) comes back as that envelope, with its
status and headers.

``timeout`` (default 30 s, at most ``max_fetch_timeout``) is this request's upstream
timeout at the gateway, in place of ``upstream_timeout``: the API tells the gateway in
``X-Datorus-Timeout``, vouched for by the per-process secret that only the in-process
API knows (the one ``X-Datorus-Egress-Pin`` carries), so no proxy customer can set it.
Every answer carries the fetch credential's rate-limit state, under Datorus's names
(``X-Datorus-RateLimit-Limit``, ``-Remaining``, ``-Reset``) and seed 001's
(``X-RateLimit-Limit``, ``X-RateLimit-Remaining``): that limit is the binding one for
a fetch, so the per-key API throttle does not count fetches.

Served only by the gateway process (standalone ``datorus api`` has no proxy to use).
"""

from __future__ import annotations

import base64
import json
import math
import time
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from ..egress import COUNTRY_PATTERN
from ..envelope import DatorusError, validation_error
from ..sessions import valid_session_id
from .deps import KeyAccount, State, require_active
from .models import Body
from .state import ApiState
from .via_gateway import check_url, gateway_error, require_gateway, through_gateway

router = APIRouter(tags=["routing"])

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"}
_TEXT = ("text/", "json", "xml", "javascript", "html")


class FetchIn(Body):
    """``POST /fetch``: what to fetch, and how to route it."""

    url: str = Field(max_length=4096, examples=["https://example.com/"])
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    headers: dict[str, Annotated[str, Field(max_length=8192)]] = Field(
        default_factory=dict, max_length=100
    )
    body: str | None = Field(default=None, max_length=1_048_576)
    timeout: int = Field(
        default=30,
        ge=1,
        description="Seconds to wait for the target's answer (at most max_fetch_timeout, 120).",
    )
    country: str | None = Field(default=None, pattern=COUNTRY_PATTERN)
    session_id: str | None = Field(default=None, max_length=128)


def _egress_view(st: ApiState, header: str | None) -> dict[str, Any] | None:
    if st.router is None or not header or not header.isdigit():
        return None
    e = st.router.pool.by_id.get(int(header))
    if e is None:
        return None
    return {"id": e.id, "url": e.spec.customer_url(), "country": e.country, "exit_ip": e.exit_ip}


def rate_headers(limit: Any, remaining: Any, reset: Any) -> dict[str, str]:
    """The fetch credential's rate-limit state under Datorus's and seed 001's names."""
    return {
        "X-Datorus-RateLimit-Limit": str(limit),
        "X-Datorus-RateLimit-Remaining": str(remaining),
        "X-Datorus-RateLimit-Reset": str(reset),
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(remaining),
    }


def live_rate_headers(st: Any, acc: dict[str, Any]) -> dict[str, str]:
    """The rate-limit state of the account's fetch credential in the gateway right now.

    For answers the gateway did not give (a refusal here, our own timeout): the live
    bucket when the credential is known, else the account's full burst.
    """
    user = st.extra.get("fetch_creds", {}).get(acc["id"])
    rt = st.runtime
    cred = rt.by_username.get(user[0]) if user is not None and rt is not None else None
    if cred is not None and cred.limiter is not None:
        v = cred.limiter.peek(time.monotonic())
        return rate_headers(cred.account.rps, v.remaining, math.ceil(time.time() + v.reset_after))
    rps = acc.get("rps") or st.settings.get("rps")
    burst = acc.get("burst") or st.settings.get("burst")
    return rate_headers(rps, burst, math.ceil(time.time()))


def gateway_rate_headers(resp: httpx.Response) -> dict[str, str] | None:
    """The rate-limit headers the gateway put on its answer (None when it put none)."""
    h = resp.headers
    limit, remaining = h.get("x-datorus-ratelimit-limit"), h.get("x-datorus-ratelimit-remaining")
    if limit is None or remaining is None:
        return None
    return rate_headers(limit, remaining, h.get("x-datorus-ratelimit-reset", ""))


async def fetch_account(request: Request, acc: KeyAccount, st: State) -> dict[str, Any]:
    """The fetching account (active); its answer carries the fetch credential's limit."""
    request.state.rate_headers = live_rate_headers(st, acc)
    return require_active(acc)


@router.post("/fetch")
async def fetch(
    acc: Annotated[dict[str, Any], Depends(fetch_account)],
    st: State,
    body: FetchIn,
    request: Request,
) -> Any:
    """Fetch ``url`` through the gateway (seed 001): the target's answer with ``meta``.

    ``meta.blocked`` is the gateway's block verdict (the egress is then avoided for
    that domain), ``meta.egress`` the way out it took, ``meta.request_id`` the
    receipt's id. Billed like any request of the account. Errors the gateway produced
    come back as its envelope; no answer within ``timeout``: 504 ``GATEWAY_TIMEOUT``.
    """
    require_gateway(st, "POST /fetch")
    most = int(st.settings.get("max_fetch_timeout") or 120)
    if body.timeout > most:
        raise validation_error("timeout", f"must be at most {most} seconds (max_fetch_timeout)")
    u = check_url(body.url)
    if body.session_id is not None and not valid_session_id(body.session_id):
        raise validation_error("session_id", "must match [A-Za-z0-9_-]{1,128}")
    for name, value in body.headers.items():
        if not name or any(c in name for c in " :\r\n\t") or any(c in value for c in "\r\n"):
            raise validation_error("headers", f"invalid header {name[:50]!r}")
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
    request.state.rate_headers = gateway_rate_headers(resp) or live_rate_headers(st, acc)
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
