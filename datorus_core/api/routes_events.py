"""Customer events: ``/account/webhooks`` and ``GET /account/events`` (issue 18).

A webhook receives the account's own events that match its patterns, signed with its
secret (shown once, in the answer to ``POST``). ``GET /account/events`` streams them as
Server-Sent Events (``Accept: text/event-stream``: ``id:``, ``event:``, ``data:``, a
keep-alive comment every ``event_keepalive_seconds``, ``Last-Event-ID`` or ``?after=``
resumes after that id), or returns one JSON page of the events after ``?after=ID``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from .. import events as ev
from ..envelope import DatorusError, validation_error
from ..ledger import api as ledger_api
from ..ledger import events as ledger_events
from ..ledger.accounts import MAX_BALANCE_CENTS
from ..notifiers.targets import check_target, policy_for
from ..notifiers.webhook import check_url
from . import store
from .deps import Account, ActiveAccount, Cursor, Limit, State
from .models import MAX_TOPUP_CENTS, MIN_TOPUP_CENTS, Body

router = APIRouter()
POLL_SECONDS = 0.5
PAGE = 100
DELIVERIES_SHOWN = 50  # in GET /account/webhooks/{id}


class WebhookIn(Body):
    """``POST /account/webhooks``."""

    url: str = Field(max_length=2000, examples=["https://example.com/datorus-hook"])
    events: list[str] | str = Field(
        default="*", examples=[["credits.*", "lease.expired"]],
        description="Glob patterns of event types (a list, or one comma-separated string).",
    )  # fmt: skip


def _patterns(raw: list[str] | str) -> tuple[str, ...]:
    try:
        patterns = ev.parse_patterns(raw)
    except ValueError as e:
        raise validation_error("events", str(e)) from None
    if not any(ev.matches(patterns, t) for t in ev.ACCOUNT_TYPES):
        raise validation_error(
            "events", f"matches none of an account's events ({', '.join(sorted(ev.ACCOUNT_TYPES))})"
        )
    return patterns


def _own_sockets(st: Any) -> list[tuple[str, int]]:
    """The gateway's proxy port, when the gateway serves this API."""
    url = st.extra.get("proxy_url")
    if not url:
        return []
    u = urlsplit(url)
    return [(u.hostname or "", u.port or 8080)]


@router.post("/account/webhooks", status_code=201, tags=["events"])
def add_webhook(body: WebhookIn, acc: ActiveAccount, st: State) -> Any:
    """Subscribe a URL to the account's events; ``secret`` signs every delivery and is
    shown only in this answer. A URL the acceptable-use policy denies (loopback, private
    and metadata addresses, the gateway itself) is ``403 AUP_VIOLATION``."""
    try:
        url = check_url(body.url)
    except ValueError as e:
        raise validation_error("url", str(e)) from None
    patterns = _patterns(body.events)
    db = st.store.db()
    check_target(policy_for(db, st.settings, _own_sockets(st)), url)
    return ledger_events.add_subscription(db, acc["id"], "webhook", url, patterns)


@router.get("/account/webhooks", tags=["events"])
def list_webhooks(acc: Account, st: State, limit: Limit = 50, cursor: Cursor = None) -> Any:
    """The account's webhooks with their health (never their secrets), in cursor pages
    by id."""
    items = ledger_events.subscriptions(st.store.db(), acc["id"])
    return store.listing(*store.page_items(items, limit, cursor))


def _delivery_view(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "event_id": str(d["event_id"]), "id": str(d["id"])}


@router.get("/account/webhooks/{webhook_id}", tags=["events"])
def get_webhook(webhook_id: str, acc: Account, st: State) -> Any:
    """One webhook and its newest deliveries (up to ``DELIVERIES_SHOWN``; all of them,
    paged: ``GET /account/webhooks/{id}/deliveries``)."""
    wid = store.parse_id(webhook_id, "webhook")
    db = st.store.db()
    row = ledger_events.get_subscription(db, acc["id"], wid)
    out = ledger_events.subscription_view(row)
    out["deliveries"] = [
        _delivery_view(d) for d in ledger_events.deliveries(db, acc["id"], wid, DELIVERIES_SHOWN)
    ]
    return out


@router.get("/account/webhooks/{webhook_id}/deliveries", tags=["events"])
def list_deliveries(
    webhook_id: str, acc: Account, st: State, limit: Limit = 50, cursor: Cursor = None
) -> Any:
    """The webhook's deliveries, newest first, in cursor pages: each with its event,
    ``status`` (``pending``, ``delivered``, ``failed``), ``attempts``, the receiver's
    ``last_status`` and ``last_error``."""
    wid = store.parse_id(webhook_id, "webhook")
    db, aid = st.store.db(), acc["id"]
    ledger_events.get_subscription(db, aid, wid)  # 404 before anything else
    rows, nxt, total = store.page_newest(
        lambda before, n: ledger_events.deliveries(db, aid, wid, n, before),
        ledger_events.delivery_count(db, wid),
        limit,
        cursor,
        key="id",
    )
    return store.listing([_delivery_view(d) for d in rows], nxt, total)


@router.delete("/account/webhooks/{webhook_id}", tags=["events"])
def delete_webhook(webhook_id: str, acc: Account, st: State) -> Any:
    """Unsubscribe; deliveries not yet made are dropped."""
    wid = store.parse_id(webhook_id, "webhook")
    return ledger_events.remove_subscription(st.store.db(), acc["id"], wid)


def _after(value: str | None, field: str) -> int:
    if value is None or value == "":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise validation_error(field, "must be an event id (a whole number)") from None
    if n < 0:
        raise validation_error(field, "must be >= 0")
    return n


@router.get("/account/events", tags=["events"])
async def get_events(
    request: Request,
    acc: Account,
    st: State,
    after: Annotated[str | None, Query(description="Events after this id.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = PAGE,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Any:
    """The account's events, oldest first: a Server-Sent Events stream when the client
    accepts ``text/event-stream``, else one JSON page (``items``, ``next_after``, and
    ``total_count``: how many events the account has in the log).

    The stream lives while its API key does: once the key is revoked it ends within a
    poll (``POLL_SECONDS``), as a new request with the key would get 401.
    """
    start = _after(last_event_id, "Last-Event-ID") if last_event_id else _after(after, "after")
    aid = acc["id"]
    db_of = st.store.db
    if "text/event-stream" not in request.headers.get("accept", ""):

        def page() -> tuple[list[dict[str, Any]], int]:
            db = db_of()
            return ledger_events.after(db, aid, start, limit), ledger_events.count(db, aid)

        items, total = await run_in_threadpool(page)
        return {
            "items": items,
            "next_after": items[-1]["id"] if items else str(start),
            "total_count": total,
        }
    keepalive = float(st.settings.get("event_keepalive_seconds", 15))
    key_id = int(acc["api_key_id"])

    def tick(last: int) -> list[dict[str, Any]] | None:
        """The events after *last*, or None once the stream's key is revoked."""
        db = db_of()
        if not ledger_api.key_is_live(db, key_id):
            return None
        return ledger_events.after(db, aid, last, PAGE)

    async def stream() -> AsyncIterator[str]:
        last = start
        quiet_since = time.monotonic()
        yield ": stream of account events\nretry: 2000\n\n"
        while True:
            try:
                got = await run_in_threadpool(tick, last)
            except DatorusError:
                got = []
            if got is None:
                yield ": the API key was revoked; the stream ends\n\n"
                return
            items = got
            for item in items:
                yield ev.sse_frame(item)
                last = int(item["id"])
            if items:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= keepalive:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            if await request.is_disconnected():
                return
            if len(items) < PAGE:
                await asyncio.sleep(min(POLL_SECONDS, keepalive))

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- money comforts: low-balance alerts and auto-recharge ---------------------------------


class AlertsIn(Body):
    """``PUT /account/alerts``: ``credits.low`` below this balance (mailed unless ``email``
    is false)."""

    low_balance_cents: int = Field(ge=1, le=MAX_BALANCE_CENTS)
    email: bool = True


class AutoRechargeIn(Body):
    """``PUT /account/autorecharge``: charge the saved card ``amount_cents`` when the
    balance falls below ``threshold_cents``, once per crossing."""

    threshold_cents: int = Field(ge=1, le=MAX_BALANCE_CENTS)
    amount_cents: int = Field(ge=MIN_TOPUP_CENTS, le=MAX_TOPUP_CENTS)


def _alerts_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"low_balance_cents": row["low_cents"], "email": bool(row["mail_low"])}


def _recharge_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "enabled": row["recharge_threshold_cents"] is not None,
        "threshold_cents": row["recharge_threshold_cents"],
        "amount_cents": row["recharge_amount_cents"],
    }


@router.get("/account/alerts", tags=["events"])
def get_alerts(acc: Account, st: State) -> Any:
    """The account's low-balance mark (null: none)."""
    return _alerts_view(ledger_events.alerts(st.store.db(), acc["id"]))


@router.put("/account/alerts", tags=["events"])
def put_alerts(body: AlertsIn, acc: Account, st: State) -> Any:
    """Announce ``credits.low`` (to webhooks, the stream, and by mail unless ``email`` is
    false) when the balance falls below ``low_balance_cents``, once per top-up."""
    row = ledger_events.set_alerts(
        st.store.db(), acc["id"], low_cents=body.low_balance_cents, mail_low=int(body.email)
    )
    return _alerts_view(row)


@router.delete("/account/alerts", tags=["events"])
def delete_alerts(acc: Account, st: State) -> Any:
    """No more low-balance alerts."""
    return _alerts_view(ledger_events.set_alerts(st.store.db(), acc["id"], low_cents=None))


@router.get("/account/autorecharge", tags=["events"])
def get_autorecharge(acc: Account, st: State) -> Any:
    """The account's auto-recharge (``enabled`` false: none)."""
    return _recharge_view(ledger_events.alerts(st.store.db(), acc["id"]))


@router.put("/account/autorecharge", tags=["events"])
def put_autorecharge(body: AutoRechargeIn, acc: ActiveAccount, st: State) -> Any:
    """Charge the saved card (``POST /account/cards``) ``amount_cents`` whenever the
    balance falls below ``threshold_cents``: once per crossing (the next after a top-up),
    with ``credits.purchased``, or ``credits.recharge_failed`` when the card is declined."""
    if not acc.get("stripe_payment_method"):
        raise validation_error("payment_method", "no saved card: POST /account/cards first")
    row = ledger_events.set_alerts(
        st.store.db(),
        acc["id"],
        recharge_threshold_cents=body.threshold_cents,
        recharge_amount_cents=body.amount_cents,
    )
    return _recharge_view(row)


@router.delete("/account/autorecharge", tags=["events"])
def delete_autorecharge(acc: Account, st: State) -> Any:
    """Stop automatic recharges."""
    row = ledger_events.set_alerts(
        st.store.db(), acc["id"], recharge_threshold_cents=None, recharge_amount_cents=None
    )
    return _recharge_view(row)


# -- the console's section ----------------------------------------------------------------


def console_data(st: Any, account_id: int) -> dict[str, Any]:
    """What the console's "Events and alerts" section shows (read-only; ``app.py``
    registers the section: routes never import each other)."""
    db = st.store.db()
    rows = db.query(  # the ten newest, newest first
        f"SELECT {ledger_events.EVENT_COLUMNS} FROM events WHERE account_id = ?"
        " ORDER BY id DESC LIMIT 10",
        (account_id,),
    )
    return {
        "alerts": ledger_events.alerts(db, account_id),
        "webhooks": ledger_events.subscriptions(db, account_id),
        "events": [ev.view(r) for r in rows],
    }
