"""Requests the API sends through the gateway's own proxy port.

``POST /fetch``, ``POST /proxies/test`` and the ``/ws`` relay go through the gateway
like any customer request, so acceptable use, rate limits, metering, billing and the
egress choice apply exactly as on the wire. They authenticate with a credential the API
keeps for the account (label ``api fetch``, listed with the others; a new one per
gateway process, the previous ones revoked). Only the gateway process serves these
routes: standalone ``datorus api`` has no proxy to use (:func:`require_gateway`).
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpx
from starlette.concurrency import run_in_threadpool

from ..envelope import DatorusError, validation_error
from ..ledger import accounts

FETCH_LABEL = "api fetch"
MAX_BODY = 10 * 1024 * 1024  # bytes of the target's body returned (the rest: truncated)
_MARGIN = 5  # seconds the API waits beyond the gateway's timer, so the gateway's 504 wins
_lock = asyncio.Lock()


async def credential(st: Any, account_id: int) -> tuple[str, str]:
    """This process's fetch credential for the account, live at the gateway."""
    creds: dict[int, tuple[str, str]] = st.extra.setdefault("fetch_creds", {})
    async with _lock:
        cred = creds.get(account_id)
        if cred is None:

            def make() -> tuple[str, str]:
                db = st.store.db()
                for username in accounts.live_usernames(db, account_id, FETCH_LABEL):
                    accounts.revoke_credential(db, username, account_id)
                out = accounts.create_credential(db, account_id, label=FETCH_LABEL)
                return out["username"], out["password"]

            cred = creds[account_id] = await run_in_threadpool(make)
    deadline = time.monotonic() + 5
    while st.runtime.by_username.get(cred[0]) is None:  # the gateway reloads within 0.5 s
        if time.monotonic() > deadline:
            raise DatorusError("SERVICE_UNAVAILABLE", headers={"Retry-After": "1"})
        await asyncio.sleep(0.05)
    return cred


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
        raise validation_error("url", str(e)) from None
    if u.scheme.lower() not in ("http", "https") or not host:
        raise validation_error("url", "must be an absolute http(s) URL with a host")
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
    user, password = await credential(st, account_id)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    headers = {
        **headers,
        "Host": u.netloc.rpartition("@")[2],
        "Proxy-Authorization": f"Basic {auth}",
        "X-Datorus-Egress-Report": "1",
        # this request's upstream timeout, vouched for by the in-process secret
        "X-Datorus-Timeout": st.router.vouch(str(math.ceil(timeout))),
    }
    async with httpx.AsyncClient(timeout=timeout + _MARGIN, trust_env=False) as client:
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
