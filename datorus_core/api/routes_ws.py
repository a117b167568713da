"""Seed 001's WebSocket relay: ``/ws`` carries a WebSocket to a target through the gateway.

Open ``ws://API/ws`` and send, within 10 seconds, one JSON connect message::

    {"apiKey": "pp_...", "url": "wss://target/path", "country": "us", "sessionId": "s1"}

(``country`` and ``sessionId`` optional). The relay connects to the target through the
gateway's own proxy port with the account's ``api fetch`` credential (and the routing
options in its username), so acceptable use, the open-tunnel cap, metering and billing
and the egress choice apply as to any WebSocket. Once connected it sends
``{"type": "connected", "url": ...}``, then relays every message both ways until one
side closes. Close codes (seed 001): 1008 for a missing or invalid API key, a bad
connect message, no connect message within 10 s, or too many open connections (the
account's ``max_tunnels``); 1011 when the target cannot be reached or no egress is
available.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any
from urllib.parse import urlsplit

import websockets
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool
from websockets.exceptions import ConnectionClosed, InvalidProxyStatus, InvalidStatus

from .. import egress as eg
from ..envelope import DatorusError
from ..live import LiveRouting
from ..sessions import valid_session_id
from .store import authenticate
from .via_gateway import RELOAD_TRIES, credential, not_read_yet

router = APIRouter()

CONNECT_TIMEOUT = 10.0
POLICY, FAILED = 1008, 1011  # seed 001's close codes


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await ws.close(code, reason[:120])


def _no_egress(st: Any, url: str, country: str | None) -> bool:
    """Whether the gateway has no egress for this target now (its 502 said why, but a
    proxy answer's body does not reach us through the WebSocket client)."""
    router: LiveRouting | None = st.router
    if router is None or not router.pool.by_id:
        return False
    host = (urlsplit(url).hostname or "").lower()
    try:
        router.pool.pick(
            host,
            country,
            time.monotonic(),
            router.preview_rng(),
            exclude=router.leases.leased_now(time.time()),
        )
    except eg.NoEgress:
        return True
    return False


def _refusal(st: Any, status: int, url: str, country: str | None) -> tuple[int, str]:
    """The close code and reason for the gateway's refusal of the upstream connection."""
    if status == 429:
        return POLICY, "rate limit exceeded"
    if status == 502 and _no_egress(st, url, country):
        return FAILED, "agent unavailable"
    if status in (402, 403):
        return POLICY, {402: "payment required", 403: "forbidden"}[status]
    return FAILED, "target connection failed"


@router.websocket("/ws")
async def relay(ws: WebSocket) -> None:
    """Relay a WebSocket to ``url`` through the gateway (see the module's docstring)."""
    st: Any = ws.app.state.api
    await ws.accept()
    try:
        wait = float(st.settings.get("ws_connect_timeout", CONNECT_TIMEOUT))
        raw = await asyncio.wait_for(ws.receive_text(), wait)
    except TimeoutError:
        await _close(ws, POLICY, "connect timeout")
        return
    except (WebSocketDisconnect, KeyError, RuntimeError):
        return
    try:
        msg = json.loads(raw)
        key, url = msg.get("apiKey"), msg.get("url")
        country, sid = msg.get("country"), msg.get("sessionId")
    except (ValueError, AttributeError):
        await _close(ws, POLICY, "invalid connect message")
        return
    if not isinstance(url, str) or urlsplit(url).scheme not in ("ws", "wss"):
        await _close(ws, POLICY, "missing target URL")
        return
    if country is not None and not (isinstance(country, str) and eg.valid_country(country)):
        await _close(ws, POLICY, "invalid geo code")
        return
    if sid is not None and not valid_session_id(sid):
        await _close(ws, POLICY, "invalid session id")
        return
    try:
        acc = await run_in_threadpool(
            lambda: authenticate(st.store.db(), f"Bearer {key}" if isinstance(key, str) else None)
        )
    except DatorusError:
        # a wrong key counts like every failed key check of the API (api_key_fail_limit)
        allowed = not isinstance(key, str) or (
            st.throttle.take("key_fail", ws.client.host if ws.client else "?").allowed
        )
        await _close(ws, POLICY, "invalid API key" if allowed else "rate limit exceeded")
        return
    if acc["status"] != "active":
        await _close(ws, POLICY, "account suspended")
        return
    proxy = st.extra.get("proxy_url")
    if proxy is None or st.runtime is None:
        await _close(ws, FAILED, "agent unavailable")  # standalone: no gateway to go through
        return
    try:
        user, password = await credential(st, acc["id"])
    except DatorusError:
        await _close(ws, FAILED, "agent unavailable")
        return
    opts = (f"-country-{country.lower()}" if country else "") + (f"-session-{sid}" if sid else "")
    host = proxy.split("://", 1)[1].rstrip("/")
    for attempt in range(RELOAD_TRIES + 1):
        try:
            target = await websockets.connect(
                url,
                proxy=f"http://{user}{opts}:{password}@{host}",
                open_timeout=CONNECT_TIMEOUT,
                max_size=None,
                compression=None,
            )
        except InvalidProxyStatus as e:
            status = e.response.status_code
            if status == 407 and attempt < RELOAD_TRIES:
                await not_read_yet(st)  # another worker, yet to read the credential
                continue
            code, reason = _refusal(st, status, url, country)
            await _close(ws, code, reason)
            return
        except (InvalidStatus, OSError, TimeoutError, websockets.exceptions.WebSocketException):
            await _close(ws, FAILED, "target connection failed")
            return
        break
    await ws.send_text(json.dumps({"type": "connected", "url": url}))

    async def up() -> None:
        while True:
            m = await ws.receive()
            if m["type"] == "websocket.disconnect":
                return
            if m.get("text") is not None:
                await target.send(m["text"])
            elif m.get("bytes") is not None:
                await target.send(m["bytes"])

    async def down() -> None:
        async for m in target:
            if isinstance(m, str):
                await ws.send_text(m)
            else:
                await ws.send_bytes(m)

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, Exception):
                await t
        code = target.close_code or 1000
        await target.close()
        await _close(ws, code if code in (1000, 1001) or 3000 <= code < 5000 else 1000, "")
