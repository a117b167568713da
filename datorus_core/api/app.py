"""The FastAPI application factory and its error handling.

Every error leaves as the canonical envelope (``datorus_core.envelope``) with the
``X-Datorus-Request-Id`` header equal to its ``requestId``: Datorus's own errors,
FastAPI's validation errors (400 ``VALIDATION_ERROR`` with ``details.field`` and
``details.reason``), unknown routes and methods (404 ``RESOURCE_NOT_FOUND``), and
anything unexpected (503 ``SERVICE_UNAVAILABLE``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles

from ..envelope import DatorusError, envelope, new_request_id
from ..ledger import DatabaseError
from ..live import LiveRouting
from . import (
    routes_account,
    routes_auth,
    routes_console,
    routes_events,
    routes_fetch,
    routes_judge,
    routes_payments,
    routes_pool,
    routes_routing,
    routes_sources,
    routes_ws,
)
from .models import ERROR_RESPONSES
from .state import VERSION, ApiState
from .store import Store
from .stripe_pay import Payments
from .throttle import ApiThrottle, rules_from

log = logging.getLogger("datorus.api")


def error_response(request: Request, err: DatorusError) -> Response:
    """The envelope for *err*, with its status and headers (under ``/console``, the
    web console's error page with the same status)."""
    rid = getattr(request.state, "request_id", None) or new_request_id()
    if routes_console.is_console(request.url.path):
        return routes_console.error_page(request, err, rid)
    headers = {**err.headers, "X-Datorus-Request-Id": rid}
    return JSONResponse(
        envelope(err.code, rid, err.details, err.message), status_code=err.status, headers=headers
    )


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:] or parts[:1]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: Exception) -> Response:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        reason = "not valid JSON"
    field = "body" if first.get("type") == "json_invalid" else _field(first.get("loc", ("body",)))
    details = {"field": field, "reason": reason}
    return error_response(request, DatorusError("VALIDATION_ERROR", details=details))


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers on this request's path, in a fixed
    order.

    Starlette's 405 names only the methods of the first route whose path matched; a
    path served by several routes (``GET`` and ``POST /account/webhooks`` are two) has
    them all. The router itself is asked, method by method, so included routers count.
    """
    # a mount (the static files) matches every method; it serves GET and HEAD
    routes = [r for r in request.app.router.routes if not isinstance(r, Mount)]
    static = any(
        r.matches(request.scope)[0] == Match.FULL
        for r in request.app.router.routes
        if isinstance(r, Mount)
    )
    found = []
    for method in _METHOD_ORDER:
        scope = {**request.scope, "method": method}
        if (static and method in ("GET", "HEAD")) or any(
            route.matches(scope)[0] == Match.FULL for route in routes
        ):
            found.append(method)
    return found


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    if status == 405:
        allowed = allowed_methods(request)
        err = DatorusError(
            "RESOURCE_NOT_FOUND",
            message=f"{request.method} is not supported on {request.url.path}.",
            details={"method": request.method, "allowed": allowed},
            headers={"Allow": ", ".join(allowed)} if allowed else None,
        )
    elif status == 400:
        err = DatorusError("VALIDATION_ERROR", details={"field": "body", "reason": "bad request"})
    else:
        err = DatorusError(
            "RESOURCE_NOT_FOUND",
            message=f"No such endpoint: {request.method} {request.url.path}.",
            details={"path": request.url.path},
        )
    return error_response(request, err)


async def _datorus_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DatorusError)
    return error_response(request, exc)


DOCS_ASSETS = "/docs/assets"


def create_app(
    settings: dict[str, Any],
    runtime: Any = None,
    router: LiveRouting | None = None,
    proxy_url: str | None = None,
    hot_status: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """The REST API over the ledger at ``settings["db"]``.

    *runtime* is the gateway's live :class:`~datorus_core.runtime.Runtime` and *router*
    its routing state (:class:`~datorus_core.live.LiveRouting`, the egress router) when
    the gateway serves the API (``GET /usage`` then reports the live rate-limit state,
    ``/debug/pick`` and ``/network/health`` the live pool), and
    *proxy_url* its own proxy port (``POST /fetch`` goes through it).
    """
    store = Store(settings["db"])
    # /docs (Swagger UI) and /redoc load their scripts and styles from this server
    # (fastapi-offline's installed copies under DOCS_ASSETS), never from a CDN: they work
    # on a box without internet
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="Datorus API",
        version=VERSION,
        description=(
            "Accounts, API keys, proxy credentials, usage, Stripe top-ups and routing insight;"
            " the egress pool and, for operator keys only, its proxy-list sources."
        ),
        responses=ERROR_RESPONSES,
    )
    app.state.api = ApiState(
        store, settings, Payments(store, settings), runtime, router, hot_status
    )
    app.state.api.throttle = ApiThrottle(rules_from(settings))
    if proxy_url is not None:
        app.state.api.extra["proxy_url"] = proxy_url
    app.add_exception_handler(DatorusError, _datorus_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        request.state.request_id = new_request_id()
        try:
            response = await call_next(request)
        except DatabaseError as e:
            log.warning("datorus api: ledger error on %s: %s", request.url.path, e)
            response = error_response(
                request,
                DatorusError(
                    "SERVICE_UNAVAILABLE",
                    message="The ledger is busy or unavailable; retry shortly.",
                    headers={"Retry-After": "1"},
                ),
            )
        except Exception:
            log.exception("datorus api: unexpected error on %s", request.url.path)
            response = error_response(
                request, DatorusError("SERVICE_UNAVAILABLE", headers={"Retry-After": "1"})
            )
        response.headers["X-Datorus-Request-Id"] = request.state.request_id
        # the limit that applied to this request (routes and dependencies note it)
        for name, value in getattr(request.state, "rate_headers", {}).items():
            response.headers[name] = value
        if routes_console.is_console(request.url.path):
            routes_console.security_headers(request, response)
        return response

    app.include_router(routes_auth.router)
    app.include_router(routes_account.router)
    app.include_router(routes_events.router)
    app.include_router(routes_payments.router)
    app.include_router(routes_routing.router)
    app.include_router(routes_pool.router)
    app.include_router(routes_sources.router)
    app.include_router(routes_judge.router)
    app.include_router(routes_fetch.router)
    app.include_router(routes_ws.router)
    # the web console: pages at /console, its script, styles and vendored chart library
    # from the repository (never a CDN)
    app.include_router(routes_console.router)
    routes_console.add_customer_panel(  # issue 18's section of the customer's page
        routes_console.Panel(
            "events", "Events and alerts", "events_panel.html", routes_events.console_data
        )
    )
    app.mount(
        routes_console.PREFIX + "/static",
        StaticFiles(directory=routes_console.STATIC),
        name="console-static",
    )
    return app
