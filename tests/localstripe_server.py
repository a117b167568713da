"""Run localstripe (a fake Stripe API, from PyPI) on 127.0.0.1:PORT for the tests.

Its own launcher listens on every interface and pickles its store to /tmp on every
write; the tests need neither, so this one binds loopback and keeps state in memory.
Two additions for the tests: localstripe has no Checkout Sessions, so a minimal
``POST /v1/checkout/sessions`` answers with a session and its URL; and every request
is recorded (method, path, Idempotency-Key) for ``GET /_config/requests``, so a test can
check that each write Datorus sends carries an idempotency key.
"""

from __future__ import annotations

import secrets
import sys
import time

from aiohttp import web
from localstripe import resources
from localstripe.server import app

resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]

SEEN: list[dict[str, str | None]] = []
SESSIONS: dict[str, dict] = {}


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
        "created": int(time.time()),
    }
    SESSIONS[sid] = session
    return web.json_response(session)


app.middlewares.insert(0, record)
app.router.add_get("/_config/requests", seen)
app.router.add_post("/v1/checkout/sessions", create_checkout_session)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
