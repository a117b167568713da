"""Run localstripe (a fake Stripe API, from PyPI) on 127.0.0.1:PORT for the tests.

Its own launcher listens on every interface and pickles its store to /tmp on every
write; the tests need neither, so this one binds loopback and keeps state in memory.
Two additions for the tests: localstripe has no Checkout Sessions, so a minimal
``POST /v1/checkout/sessions`` answers with a session and its URL, whose page
(``GET /checkout/{id}``) has a Pay button that marks it paid, delivers a signed
``checkout.session.completed`` to the webhooks configured with ``/_config/webhooks``
(as Stripe would) and sends the payer to the session's ``success_url`` (with
``{CHECKOUT_SESSION_ID}`` filled in, as Stripe does), and ``GET
/v1/checkout/sessions/{id}`` retrieves a session; ``POST /_config/hold`` keeps Checkout's
webhook deliveries back until ``POST /_config/release`` (a webhook that comes late);
and every request
is recorded (method, path, Idempotency-Key) for ``GET /_config/requests``, so a test can
check that each write Datorus sends carries an idempotency key.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import re
import secrets
import sys
import time

import aiohttp
from aiohttp import web
from localstripe import resources, webhooks
from localstripe.server import app

resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]

SEEN: list[dict[str, str | None]] = []
SESSIONS: dict[str, dict] = {}
HELD: list[bytes] | None = None  # Checkout's deliveries kept back (None: deliver at once)


@web.middleware
async def record(request: web.Request, handler):
    if not request.path.startswith("/_config/"):
        SEEN.append(
            {
                "method": request.method,
                "path": request.path,
                "idempotency_key": request.headers.get("Idempotency-Key"),
            }
        )
    return await handler(request)


async def seen(request: web.Request) -> web.Response:
    return web.json_response(SEEN)


async def create_checkout_session(request: web.Request) -> web.Response:
    form = await request.post()
    try:
        amount = int(form["line_items[0][price_data][unit_amount]"])
        quantity = int(form.get("line_items[0][quantity]", "1"))
        assert form["mode"] == "payment" and amount > 0 and quantity > 0
        assert str(form["success_url"]).startswith("http")
    except (KeyError, ValueError, AssertionError):
        return web.json_response(
            {"error": {"type": "invalid_request_error", "message": "Bad request"}}, status=400
        )
    sid = "cs_test_" + secrets.token_hex(12)
    host = request.headers.get("Host", "127.0.0.1")
    session = {
        "id": sid,
        "object": "checkout.session",
        "mode": "payment",
        "amount_total": amount * quantity,
        "currency": form.get("line_items[0][price_data][currency]", "usd"),
        "customer": form.get("customer"),
        "client_reference_id": form.get("client_reference_id"),
        "metadata": {
            k[len("metadata[") : -1]: v for k, v in form.items() if k.startswith("metadata[")
        },
        "payment_status": "unpaid",
        "status": "open",
        "url": f"http://{host}/checkout/{sid}",
        "success_url": str(form["success_url"]),
        "cancel_url": str(form.get("cancel_url", form["success_url"])),
        "created": int(time.time()),
    }
    SESSIONS[sid] = session
    return web.json_response(session)


async def retrieve_checkout_session(request: web.Request) -> web.Response:
    session = SESSIONS.get(request.match_info["id"])
    if session is None:
        return web.json_response(
            {"error": {"type": "invalid_request_error", "message": "No such checkout.session"}},
            status=404,
        )
    return web.json_response(session)


async def deliver(payload: bytes, created: int) -> None:
    """One event to every webhook configured with ``/_config/webhooks``, signed."""
    async with aiohttp.ClientSession() as client:
        for hook in list(webhooks._webhooks.values()):
            signed = f"{created}.".encode() + payload
            sig = hmac.new(hook.secret.encode(), signed, hashlib.sha256).hexdigest()
            headers = {
                "Content-Type": "application/json",
                "Stripe-Signature": f"t={created},v1={sig}",
            }
            try:
                async with client.post(hook.url, data=payload, headers=headers) as r:
                    await r.read()
            except aiohttp.ClientError:
                pass  # another test's API, gone: Stripe would retry; we need not


async def hold(request: web.Request) -> web.Response:
    global HELD
    HELD = HELD if HELD is not None else []
    return web.json_response({"held": len(HELD)})


async def release(request: web.Request) -> web.Response:
    """Deliver what was held (signed now: Stripe signs each attempt) and stop holding."""
    global HELD
    held, HELD = HELD or [], None
    for payload in held:
        await deliver(payload, int(time.time()))
    return web.json_response({"delivered": len(held)})


async def checkout_page(sid: str) -> web.Response:
    """The hosted payment page: the amount, a Pay button and a way back."""
    session = SESSIONS.get(sid)
    if session is None:
        raise web.HTTPNotFound()
    amount = f"{session['amount_total'] / 100:.2f} {str(session['currency']).upper()}"
    page = (
        '<!doctype html><html><head><meta name="viewport" content="width=device-width">'
        f"<title>Checkout</title></head><body><h1>Pay {html.escape(amount)}</h1>"
        f'<form method="post" action="/checkout/{session["id"]}/pay">'
        '<button id="pay" type="submit">Pay</button></form>'
        f'<p><a id="cancel" href="{html.escape(session["cancel_url"])}">Cancel</a></p>'
        "</body></html>"
    )
    return web.Response(text=page, content_type="text/html")


async def checkout_pay(sid: str) -> web.Response:
    """Pay the session: deliver ``checkout.session.completed``, then back to the shop."""
    session = SESSIONS.get(sid)
    if session is None:
        raise web.HTTPNotFound()
    if session["payment_status"] != "paid":
        session.update(
            payment_status="paid", status="complete", payment_intent="pi_" + secrets.token_hex(12)
        )
        event = {
            "id": "evt_" + secrets.token_hex(12),
            "object": "event",
            "type": "checkout.session.completed",
            "created": int(time.time()),
            "data": {"object": session},
        }
        payload = json.dumps(event).encode()
        if HELD is not None:
            HELD.append(payload)
        else:
            await deliver(payload, event["created"])
    raise web.HTTPSeeOther(session["success_url"].replace("{CHECKOUT_SESSION_ID}", sid))


@web.middleware
async def hosted_checkout(request: web.Request, handler):
    """Stripe's hosted Checkout pages need no API key (localstripe's own middleware
    would ask for one), so they are answered here, before it."""
    m = re.fullmatch(r"/checkout/(cs_test_[0-9a-f]+)(/pay)?", request.path)
    if m is None:
        return await handler(request)
    if m.group(2) and request.method == "POST":
        return await checkout_pay(m.group(1))
    if not m.group(2) and request.method == "GET":
        return await checkout_page(m.group(1))
    raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])


app.middlewares.insert(0, record)
app.middlewares.insert(0, hosted_checkout)
app.router.add_get("/_config/requests", seen)
app.router.add_post("/_config/hold", hold)
app.router.add_post("/_config/release", release)
app.router.add_post("/v1/checkout/sessions", create_checkout_session)
app.router.add_get("/v1/checkout/sessions/{id}", retrieve_checkout_session)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
