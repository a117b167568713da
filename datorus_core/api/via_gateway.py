"""Requests the API sends through the gateway's own proxy port.

``POST /fetch``, ``POST /proxies/test`` and the ``/ws`` relay go through the gateway
like any customer request, so acceptable use, rate limits, metering, billing and the
egress choice apply exactly as on the wire. They authenticate with a credential the API
keeps for the account (label ``api fetch``, listed with the others; one for every
gateway process on the ledger, see :func:`credential`). Only the gateway process serves these
routes: standalone ``datorus api`` has no proxy to use (:func:`require_gateway`).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import math
import time
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpx
from starlette.concurrency import run_in_threadpool

from ..envelope import DatorusError, validation_error
from ..ledger import accounts
from ..ledger import api as api_ledger

FETCH_LABEL = "api fetch"
MAX_BODY = 10 * 1024 * 1024  # bytes of the target's body returned (the rest: truncated)
_MARGIN = 5  # seconds the API waits beyond the gateway's timer, so the gateway's 504 wins
_lock = asyncio.Lock()


def fetch_identity(seed: str) -> tuple[str, str]:
    """The username and password of the fetch credential derived from *seed* (the
    account's secret in the ledger): ``dt`` and 12 hex digits, as every username, and
    24 hex digits.

        >>> fetch_identity("s")[0]
        'dt4fc5b55444e3'
    """
    digest = hmac.new(seed.encode(), b"datorus api fetch credential", "sha256").hexdigest()
    return "dt" + digest[:12], digest[12:36]


def fetch_credential(db: Any, account_id: int) -> tuple[str, str]:
    """The account's fetch credential, the same for every process on this ledger:
    derived from a secret the ledger keeps for it (made the first time), so that the
    workers of ``datorus serve``, and gateways on other boxes, use one credential and
    none revokes another's. Made when missing (the others labelled ``api fetch`` are
    revoked then: older ones); revoked by the customer or an operator, the secret is
    replaced and a new one made."""
    name = f"fetch-credential:{account_id}"
    for _ in range(3):
        seed = api_ledger.secret(db, name)
        username, password = fetch_identity(seed)
        revoked = accounts.credential_revoked(db, username)
        if revoked:
            api_ledger.drop_secret(db, name, seed)  # once, whoever gets here first
            continue
        if revoked is None:
            for old in accounts.live_usernames(db, account_id, FETCH_LABEL):
                if old != username:
                    accounts.revoke_credential(db, old, account_id)
            accounts.add_credential(db, account_id, username, password, FETCH_LABEL)
        return username, password
    raise DatorusError("SERVICE_UNAVAILABLE", headers={"Retry-After": "1"})


async def credential(st: Any, account_id: int) -> tuple[str, str]:
    """The account's fetch credential (:func:`fetch_credential`), live at the gateway."""
    creds: dict[int, tuple[str, str]] = st.extra.setdefault("fetch_creds", {})
    async with _lock:
        cred = creds.get(account_id)
        if cred is None or st.runtime.by_username.get(cred[0]) is None:
            # new, or not (or no longer) live at the gateway: ask the ledger (again)
            cred = await run_in_threadpool(fetch_credential, st.store.db(), account_id)
            creds[account_id] = cred
    deadline = time.monotonic() + 5
    while st.runtime.by_username.get(cred[0]) is None:  # the gateway reloads within 0.5 s
        if time.monotonic() > deadline:
            raise DatorusError("SERVICE_UNAVAILABLE", headers={"Retry-After": "1"})
        await asyncio.sleep(0.05)
    return cred


RELOAD_TRIES = 3  # a 407 to the fetch credential is tried again this often (see below)


async def not_read_yet(st: Any) -> None:
    """Wait one ``refresh_ms`` after the gateway refused the fetch credential (407).

    This process's gateway knows it (:func:`credential` waited for that), but the
    shared port may have given the request to another worker of ``datorus serve``,
    which reads operator changes (a new credential among them) within ``refresh_ms``
    of this one: a 407 is then tried again, a few times (each counts as a failed login
    of the loopback address, and :data:`RELOAD_TRIES` stays well below that limit).
    """
    await asyncio.sleep(st.settings.get("refresh_ms", 500) / 1000)


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
        for attempt in range(RELOAD_TRIES + 1):
            req = client.build_request(
                method,
                st.extra["proxy_url"],
                headers=headers,
                content=body.encode() if body is not None else None,
                extensions={"target": u.geturl().encode()},
            )
            resp = await client.send(req, stream=True)
            if not (resp.status_code == 407 and gateway_error(resp)) or attempt == RELOAD_TRIES:
                break
            await resp.aclose()
            await not_read_yet(st)
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
