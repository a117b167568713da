"""The web console at ``/console`` on the API port (CONTRACT.md section 8).

Server-rendered pages (Jinja2, autoescaped) over the same store and ledger functions
the REST API and the CLI call; nothing here reads or writes the ledger any other way.
Customers sign in with a one-time link mailed to them (``store.send_signin_link``) or
with one of their API keys, operators with an operator key. The session is a signed,
HttpOnly, SameSite=Lax cookie (:mod:`.console_session`); every form posts the
session's form token back and a form without it (or from another origin) is refused
with 400 ``VALIDATION_ERROR`` (``details.field: "csrf"``). A customer's session reaches
only its own account; the operator's pages (``/console/ops/...``) are 404 to anyone
else, as the operator routes of the API are. Every page carries a strict
Content-Security-Policy (scripts and styles only from ``/console/static``, no inline
code), and errors under ``/console`` are pages (:func:`error_page`) with the envelope's
status, code and request id.

Other features add panels to the customer's page with :func:`add_customer_panel`
(webhooks and auto-recharge, when they exist).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from .. import pricing
from ..envelope import DatorusError, validation_error
from ..ledger import accounts, money
from ..ledger import api as ledger_api
from ..ledger import egress as ledger_egress
from ..ledger import events as ledger_events
from ..ledger import sources as ledger_sources
from ..ledger import usage as ledger_usage
from . import console_session as cs
from . import store
from .deps import client_address, no_such_route, require_active, throttle
from .models import MAX_TOPUP_CENTS, MIN_TOPUP_CENTS, CredentialIn, KeyIn
from .state import ApiState
from .stripe_pay import SESSION_PLACEHOLDER
from .views import blocks_by_domain, domain_usage, proxy_view, receipt_view

HERE = Path(__file__).parent / "console"
STATIC = HERE / "static"
PREFIX = "/console"
MAX_FORM_BYTES = 16 * 1024
CHART_DAYS = 30

router = APIRouter(prefix=PREFIX, include_in_schema=False)


# -- formatting ---------------------------------------------------------------------------


def dollars(cents: int | None) -> str:
    """``1234`` cents as ``$12.34``.

    >>> dollars(1234), dollars(-5), dollars(None)
    ('$12.34', '-$0.05', '-')
    """
    if cents is None:
        return "-"
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents) // 100:,}.{abs(cents) % 100:02d}"


def nano_dollars(nanocents: int | None) -> str:
    """Nanocents as dollars to a hundredth of a cent, ``$0.0012``.

    >>> nano_dollars(1_234_000_000), nano_dollars(0)
    ('$0.0123', '$0.0000')
    """
    if nanocents is None:
        return "-"
    value = Decimal(nanocents) / pricing.NANOCENTS_PER_CENT / 100
    return f"{'-' if value < 0 else ''}${abs(value):,.4f}"


def size(n: int | None) -> str:
    """Bytes for people, in powers of 1000 as the price is.

    >>> size(999), size(1_500), size(2_000_000_000)
    ('999 B', '1.5 kB', '2.0 GB')
    """
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


ENV = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
ENV.filters.update(dollars=dollars, nano_dollars=nano_dollars, size=size)


# -- customer panels other features add ---------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """A section of the customer's page: *template* (under ``console/templates``)
    rendered with ``data = load(state, account_id)``."""

    anchor: str
    title: str
    template: str
    load: Callable[[ApiState, int], dict[str, Any]]


CUSTOMER_PANELS: list[Panel] = []


def add_customer_panel(panel: Panel) -> None:
    """Show *panel* on every customer's page, after the built-in sections (webhooks and
    auto-recharge plug in here)."""
    if all(p.anchor != panel.anchor for p in CUSTOMER_PANELS):
        CUSTOMER_PANELS.append(panel)


# -- sessions -----------------------------------------------------------------------------


def _state(request: Request) -> ApiState:
    return request.app.state.api


def _secret(st: ApiState) -> bytes:
    secret = st.extra.get("console_secret")
    if secret is None:
        secret = st.extra["console_secret"] = ledger_api.secret(
            st.store.db(), "console_signing"
        ).encode()
    return bytes(secret)


def _still_valid(st: ApiState, sess: dict[str, Any]) -> bool:
    """A signed-in session holds only while its key is live (and its account exists)."""
    db = st.store.db()
    if sess["kind"] == "operator" or sess["key"] is not None:
        row = ledger_api.api_key(db, int(sess["key"]))
        if row is None or row["revoked_at"] is not None:
            return False
        if sess["kind"] == "operator":
            return bool(row["operator"])
        return row["account_id"] == sess["account"] and not row["operator"]
    try:
        accounts.account_row(db, int(sess["account"]))
    except DatorusError:
        return False
    return True


def current(request: Request) -> dict[str, Any]:
    """This request's session (a fresh anonymous one when it has none); blocking."""
    sess = getattr(request.state, "console", None)
    if sess is not None:
        return dict(sess)
    st = _state(request)
    now = time.time()
    sess = cs.read(_secret(st), request.cookies.get(cs.COOKIE), now)
    if sess is not None and sess["kind"] != "anon" and not _still_valid(st, sess):
        sess = None
    if sess is None:
        _start(request, cs.new_session("anon", now))
    else:
        request.state.console = sess
    return dict(request.state.console)


def _start(request: Request, sess: dict[str, Any]) -> None:
    """Make *sess* this request's session; its cookie goes out with the answer."""
    request.state.console = sess
    request.state.console_fresh = True


def _put_cookie(request: Request, response: Response) -> None:
    sess = getattr(request.state, "console", None)
    if sess is None or not getattr(request.state, "console_fresh", False):
        return
    st = _state(request)
    secure = request.url.scheme == "https" or str(st.settings.get("public_url") or "").startswith(
        "https:"
    )
    response.set_cookie(
        cs.COOKIE,
        cs.sign(_secret(st), sess),
        max_age=max(1, sess["exp"] - int(time.time())),
        path=PREFIX,
        httponly=True,
        samesite="lax",
        secure=secure,
    )


def _same_origin(request: Request) -> bool:
    """Whether a form came from the console's own pages, as far as the browser says
    (``Sec-Fetch-Site``, else ``Origin``); the form token is the check that always holds."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def posted(request: Request) -> dict[str, str]:
    """A console form's fields, once its form token (and origin) check out."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise validation_error("body", f"a form is at most {MAX_FORM_BYTES} bytes")
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    sess = await run_in_threadpool(current, request)
    fresh = getattr(request.state, "console_fresh", False)
    if fresh or not cs.form_token_ok(sess, form.get("csrf")) or not _same_origin(request):
        raise DatorusError(
            "VALIDATION_ERROR",
            message="This form's security token is missing or out of date."
            " Reload the page and send it again.",
            details={"field": "csrf", "reason": "missing or not this session's form token"},
        )
    return form


Form = Annotated[dict[str, str], Depends(posted)]


def _customer(request: Request) -> tuple[ApiState, dict[str, Any]]:
    """The state and the signed-in customer's account row; 404 for anyone else."""
    sess = current(request)
    if sess["kind"] != "customer":
        raise no_such_route(request)
    st = _state(request)
    return st, accounts.account_row(st.store.db(), int(sess["account"]))


def _operator(request: Request) -> ApiState:
    """The state, for the operator's pages; 404 for anyone else (as the API's)."""
    if current(request)["kind"] != "operator":
        raise no_such_route(request)
    return _state(request)


# -- answers ------------------------------------------------------------------------------


def security_headers(request: Request, response: Response) -> None:
    """The console's headers: a strict CSP (no inline code, nothing from elsewhere but
    Stripe Checkout as a form's destination), no framing, no referrer to other sites (a
    sign-in link's token must not leak), and no caching (a password is shown once)."""
    st = _state(request)
    checkout = "https://checkout.stripe.com"
    base = str(st.settings.get("stripe_api_base") or "")
    if base:  # a test double of Stripe: its Checkout pages are where it runs
        parts = urlsplit(base)
        checkout = f"{parts.scheme}://{parts.netloc}"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        f" connect-src 'self'; form-action 'self' {checkout}; frame-ancestors 'none';"
        " base-uri 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if not request.url.path.startswith(f"{PREFIX}/static/"):
        response.headers["Cache-Control"] = "no-store"


def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    """Template *name* as this request's page (its session cookie set when new)."""
    sess = getattr(request.state, "console", None) or {"kind": "anon", "csrf": ""}
    html = ENV.get_template(name).render(session=sess, csrf=sess["csrf"], **ctx)
    response = HTMLResponse(html, status_code=status)
    _put_cookie(request, response)
    return response


def _redirect(request: Request, to: str) -> RedirectResponse:
    response = RedirectResponse(to, status_code=303)
    _put_cookie(request, response)
    return response


def error_page(request: Request, err: DatorusError, request_id: str) -> Response:
    """A console error as a page: the envelope's status, code, message and request id."""
    response = render(
        request,
        "error.html",
        status=err.status,
        err=err,
        request_id=request_id,
        signed_in=(getattr(request.state, "console", None) or {}).get("kind", "anon") != "anon",
    )
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def is_console(path: str) -> bool:
    """Whether *path* is the console's (errors there are pages, not JSON)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


# -- signing in ---------------------------------------------------------------------------


@router.get("")
async def home(request: Request) -> Response:
    """The signed-in customer's or operator's page, or the sign-in page."""
    sess = await run_in_threadpool(current, request)
    back = request.query_params.get("topup", "")
    session_id = request.query_params.get("session_id", "")[:300]
    confirmed = None
    if back == "success" and session_id and sess["kind"] in ("customer", "anon"):
        account_id = int(sess["account"]) if sess["kind"] == "customer" else None
        confirmed = await run_in_threadpool(confirm_topup, _state(request), session_id, account_id)
    if sess["kind"] == "customer":
        notice = {"success": "topup_success", "cancel": "topup_cancel"}.get(back)
        return await run_in_threadpool(customer_page, request, notice, confirmed=confirmed)
    if sess["kind"] == "operator":
        blocks = blocks_by_domain(_state(request))  # the live pool: read in the event loop
        q = request.query_params.get("q", "")[:200]
        return await run_in_threadpool(operator_page, request, q, blocks)
    return render(request, "signin.html", confirmed=confirmed)


def confirm_topup(st: ApiState, session_id: str, account_id: int | None) -> dict[str, Any]:
    """The payer is back from Stripe Checkout: ask Stripe about the session (the browser
    gives only its id) and credit it if paid, once whichever of this and the webhook is
    first. What the page says about it: ``state`` is ``paid`` (credited, now or before),
    ``pending`` (Stripe has not confirmed it yet), ``unknown`` (not this account's) or
    ``unreachable`` (Stripe did not answer). A visitor not signed in (a session that
    expired while paying) gets the payment credited to the account that opened it."""
    try:
        found = st.payments.confirm_checkout(session_id, account_id)
    except DatorusError as e:
        if e.code in ("UPSTREAM_FAILED", "SERVICE_UNAVAILABLE"):
            return {"state": "unreachable"}
        return {"state": "unknown"}
    return {"state": "paid" if found["paid"] else "pending", "amount": found["amount_cents"]}


@router.post("/signin/mail")
def signin_mail(request: Request, form: Form) -> Response:
    """Mail a one-time sign-in link (the page says the same whether the address has an
    account or not); at most ``api_resends_per_hour`` per client address and per email."""
    email = form.get("email", "").strip()[:254]
    if not accounts.EMAIL_RE.fullmatch(email):
        raise validation_error("email", "must be an email address")
    throttle(request, "resend", f"console:{client_address(request)}")
    throttle(request, "resend", f"console-to:{email.lower()}")  # nobody's inbox flooded
    st = _state(request)
    store.send_signin_link(st.store, st.settings, email)
    return render(request, "signin_sent.html", email=email)


@router.get("/signin")
def signin_link(request: Request) -> Response:
    """The mailed link: a page whose button signs in (a mail scanner that fetches the
    link does not use it up)."""
    current(request)
    token = request.query_params.get("token", "")[:1000]
    return render(request, "signin_confirm.html", token=token)


@router.post("/signin")
def signin_token(request: Request, form: Form) -> Response:
    """Use a mailed sign-in token: a customer session for its account."""
    st = _state(request)
    account_id = store.signin_account(st.store, form.get("token", "")[:1000])
    _start(request, cs.new_session("customer", time.time(), account_id=account_id))
    return _redirect(request, PREFIX)


@router.post("/signin/key")
def signin_key(request: Request, form: Form) -> Response:
    """Sign in with an API key: a customer's opens its account, an operator key the
    operator's pages. A wrong key counts against the client address as on the API."""
    st = _state(request)
    try:
        row = store.live_key(st.store.db(), "Bearer " + form.get("key", "").strip()[:200])
    except store.ApiKeyError:
        throttle(request, "key_fail", client_address(request))
        raise
    if row["operator"]:
        sess = cs.new_session("operator", time.time(), key_id=row["id"])
    else:
        sess = cs.new_session(
            "customer", time.time(), account_id=row["account_id"], key_id=row["id"]
        )
    _start(request, sess)
    return _redirect(request, PREFIX)


@router.post("/signout")
def signout(request: Request, form: Form) -> Response:
    """End the session."""
    _start(request, cs.new_session("anon", time.time()))
    return _redirect(request, PREFIX)


# -- the customer's page ------------------------------------------------------------------


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def chart_days(days: list[dict[str, Any]], today: date) -> dict[str, Any]:
    """The chart's series: bytes and charges on each of the last :data:`CHART_DAYS` days
    (days without usage are zero), and whether there is any usage at all.

    >>> c = chart_days([{"day": "2026-01-02", "bytes": 5, "chargedNanocents": 10**9}],
    ...                date(2026, 1, 3))
    >>> c["days"][-2:], c["bytes"][-2:], c["cents"][-2:], c["empty"]
    (['2026-01-02', '2026-01-03'], [5, 0], [1.0, 0.0], False)
    """
    by_day = {d["day"]: d for d in days}
    span = [(today - timedelta(days=n)).isoformat() for n in range(CHART_DAYS - 1, -1, -1)]
    rows = [by_day.get(d, {"bytes": 0, "chargedNanocents": 0}) for d in span]
    return {
        "days": span,
        "bytes": [r["bytes"] for r in rows],
        "cents": [r["chargedNanocents"] / pricing.NANOCENTS_PER_CENT for r in rows],
        "empty": not days,
    }


def customer_page(
    request: Request,
    notice: str | None = None,
    shown: dict[str, Any] | None = None,
    status: int = 200,
    confirmed: dict[str, Any] | None = None,
) -> Response:
    """Balance and trial, usage by day and by domain, receipts, credentials, keys, top-up,
    payments."""
    st, acc = _customer(request)
    db = st.store.db()
    view = store.account_view(db, acc["id"], st.settings)
    usage = ledger_usage.usage(db, acc["id"], by_day=True)
    days = usage["days"][-CHART_DAYS:]
    today = next((d for d in days if d["day"] == _today()), None)
    domains = domain_usage(st, acc["id"], CHART_DAYS, 25)
    panels = [(p, p.load(st, acc["id"])) for p in CUSTOMER_PANELS]
    return render(
        request,
        "customer.html",
        status=status,
        acc=view,
        usage=usage,
        today=today,
        chart=chart_days(usage["days"], datetime.now(UTC).date()),
        domains=domains,
        top_domain=max(domains, key=lambda d: d["charged_nanocents"], default=None),
        receipts=[receipt_view(r) for r in ledger_usage.recent_receipts(db, acc["id"], 20)],
        credentials=[store.credential_view(r) for r in accounts.credential_rows(db, acc["id"])],
        keys=[store.key_view(r) for r in ledger_api.api_keys(db, acc["id"])],
        session_key=current(request)["key"],
        payments=bool(st.settings.get("stripe_api_key")),
        history=payment_history(db, acc["id"]),
        notice=notice,
        confirmed=confirmed,
        shown=shown,
        panels=panels,
    )


@router.get("/live")
def live(request: Request) -> JSONResponse:
    """The numbers the customer's page refreshes by itself (balance, trial, usage)."""
    st, acc = _customer(request)
    view = store.account_view(st.store.db(), acc["id"], st.settings)
    return JSONResponse(
        {
            "balance": dollars(view["balance_cents"]),
            "trial": size(view["trial_remaining_bytes"]),
            "used": size(view["used_bytes"]),
            "status": view["status"],
        },
        headers={"Cache-Control": "no-store"},
    )


#: What a payment row's ``tx_type`` in ``/account/credits`` is called on the page.
PAYMENT_KINDS = {"purchase": "Top-up", "adjustment": "Correction", "acquire": "Lease"}


def payment_history(db: Any, account_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """The account's money in and out other than usage, newest first, as
    ``GET /account/credits`` lists it (top-ups by card, Checkout, auto-recharge or the
    operator; corrections; lease charges), and the auto-recharges Stripe declined
    (``credits.recharge_failed`` events, which move no money)."""
    rows = store.credits(db, account_id, 60)["recent_transactions"]
    items = [
        {
            "at": r["created_at"],
            "what": PAYMENT_KINDS.get(r["tx_type"], r["tx_type"]),
            "description": r["description"] or "",
            "amount": r["amount"],
            "declined": False,
        }
        for r in rows
        if r["tx_type"] in PAYMENT_KINDS
    ]
    for e in ledger_events.newest_of_type(db, account_id, "credits.recharge_failed", limit):
        data = e["data"]
        why = data.get("decline_code") or data.get("declineCode")  # older events: camelCase
        items.append(
            {
                "at": e["created_at"],
                "what": "Auto-recharge declined",
                "description": str(why or data.get("code") or ""),
                "amount": int(data.get("amount_cents") or 0),
                "declined": True,
            }
        )
    items.sort(key=lambda i: str(i["at"]), reverse=True)
    return items[:limit]


def _field_error(e: ValidationError, names: dict[str, str]) -> DatorusError:
    first = e.errors()[0]
    field = str(first["loc"][0]) if first.get("loc") else "body"
    reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return validation_error(names.get(field, field), reason)


@router.post("/credentials")
def create_credential(request: Request, form: Form) -> Response:
    """A new proxy credential; the page shows its password this once."""
    st, acc = _customer(request)
    require_active(acc)
    fields = {"label": form.get("label", "").strip() or None}
    cap = form.get("max_bytes", "").strip().replace(",", "").replace("_", "")
    if cap:
        fields["max_bytes"] = cap  # pydantic reads the digits (and refuses anything else)
    try:
        # a form's fields are text: read as such here, unlike the API's JSON (strict)
        body = CredentialIn.model_validate(fields, strict=False)
    except ValidationError as e:
        raise _field_error(e, {}) from None
    c = accounts.create_credential(st.store.db(), acc["id"], body.max_bytes, body.label)
    shown = {"what": "credential", "username": c["username"], "password": c["password"]}
    return customer_page(request, "credential_created", shown, status=201)


@router.post("/credentials/{credential_id}/revoke")
def revoke_credential(credential_id: str, request: Request, form: Form) -> Response:
    """Revoke one of the account's credentials (404 for anyone else's)."""
    st, acc = _customer(request)
    store.revoke_credential(st.store.db(), acc["id"], credential_id)
    return _redirect(request, f"{PREFIX}#credentials")


@router.post("/keys")
def create_key(request: Request, form: Form) -> Response:
    """A new API key; the page shows it this once."""
    st, acc = _customer(request)
    require_active(acc)
    try:
        body = KeyIn(label=form.get("label", "").strip() or None)
    except ValidationError as e:
        raise _field_error(e, {}) from None
    key = store.create_key(st.store.db(), acc["id"], body.label)
    return customer_page(request, "key_created", {"what": "key", "key": key["key"]}, status=201)


@router.post("/keys/{key_id}/revoke")
def revoke_key(key_id: str, request: Request, form: Form) -> Response:
    """Revoke one of the account's API keys (the session signed in with it ends too)."""
    st, acc = _customer(request)
    store.revoke_key(st.store.db(), acc["id"], key_id)
    return _redirect(request, f"{PREFIX}#keys")


def parse_dollars(field: str, text: str) -> int:
    """``"12.50"`` dollars as 1250 cents; VALIDATION_ERROR otherwise.

    >>> parse_dollars("a", "12.5"), parse_dollars("a", "$7")
    (1250, 700)
    """
    try:
        value = Decimal(text.strip().removeprefix("$").replace(",", ""))
    except InvalidOperation:
        raise validation_error(field, "must be an amount in dollars, like 10 or 12.50") from None
    cents = value * 100
    if not value.is_finite() or cents != cents.to_integral_value():
        raise validation_error(field, "must be whole cents, like 10 or 12.50")
    return int(cents)


@router.post("/topup")
def topup(request: Request, form: Form) -> Response:
    """Top up through Stripe Checkout: off to Stripe's page, back to the console after."""
    st, acc = _customer(request)
    if not st.settings.get("stripe_api_key"):
        raise DatorusError(
            "SERVICE_UNAVAILABLE",
            message="Top-ups are not available on this Datorus: card payments are not"
            " configured. Ask the operator to top up your balance.",
            details={"reason": "stripe_api_key is not set"},
            headers={"Retry-After": "3600"},
        )
    cents = parse_dollars("amount", form.get("amount", ""))
    if cents < MIN_TOPUP_CENTS:
        raise validation_error("amount", f"must be at least {dollars(MIN_TOPUP_CENTS)}")
    if cents > MAX_TOPUP_CENTS:
        raise validation_error("amount", f"must be at most {dollars(MAX_TOPUP_CENTS)}")
    base = str(request.base_url).rstrip("/")
    session = st.payments.checkout(
        acc,
        cents,
        None,
        success_url=f"{base}{PREFIX}?topup=success&session_id={SESSION_PLACEHOLDER}",
        cancel_url=f"{base}{PREFIX}?topup=cancel",
    )
    return _redirect(request, str(session["url"]))


# -- the operator's pages -----------------------------------------------------------------


def operator_page(
    request: Request, q: str, blocks: dict[str, Any], notice: str | None = None
) -> Response:
    """Accounts (search, suspend, top up), the pool, sources and blocks by domain."""
    st = _operator(request)
    db = st.store.db()
    today = ledger_usage.bytes_by_account(db, _today())
    needle = q.strip().lower()
    rows = [
        {**r, "bytes_today": today.get(r["id"], 0)}
        for r in accounts.list_accounts(db)
        if not needle or needle in str(r["email"]).lower() or needle == str(r["id"])
    ]
    rows.sort(key=lambda r: (-r["bytes_today"], r["id"]))
    pool = [proxy_view(r) for r in ledger_egress.list_egress(db)]
    order = {"dead": 0, "unchecked": 1, "disabled": 2, "active": 3}
    pool.sort(key=lambda p: (order.get(p["status"], 9), -p["score"], p["id"]))
    failures = ledger_egress.last_failures(db, [p["id"] for p in pool if p["status"] != "active"])
    pool = [{**p, "failure": failures.get(p["id"])} for p in pool]
    by_status: dict[str, int] = {}
    for p in pool:
        by_status[p["status"]] = by_status.get(p["status"], 0) + 1
    source_rows, _, sources_total = store.page(db, ledger_sources.SOURCES_SQL, [], 200, None)
    now = time.time()
    return render(
        request,
        "operator.html",
        q=q,
        accounts=rows[:200],
        accounts_total=len(rows),
        top=rows[0] if rows and rows[0]["bytes_today"] else None,
        pool=pool,
        by_status=by_status,
        sources=[ledger_sources.source_view(r, now) for r in source_rows],
        sources_total=sources_total,
        blocks=blocks,
        notice=notice,
        whole_cents=pricing.whole_cents,
    )


def _back(form: dict[str, str]) -> str:
    q = form.get("q", "")[:200]
    return f"{PREFIX}?q={quote(q)}#accounts" if q else f"{PREFIX}#accounts"


@router.post("/ops/accounts/{account_id}/suspend")
def suspend(account_id: str, request: Request, form: Form) -> Response:
    """``datorus account suspend``: its requests get 403 within 2 seconds."""
    st = _operator(request)
    accounts.set_status(st.store.db(), store.parse_id(account_id, "account"), "suspended")
    return _redirect(request, _back(form))


@router.post("/ops/accounts/{account_id}/unsuspend")
def unsuspend(account_id: str, request: Request, form: Form) -> Response:
    """``datorus account unsuspend``."""
    st = _operator(request)
    accounts.set_status(st.store.db(), store.parse_id(account_id, "account"), "active")
    return _redirect(request, _back(form))


@router.post("/ops/accounts/{account_id}/topup")
def operator_topup(account_id: str, request: Request, form: Form) -> Response:
    """``datorus balance add``: a top-up the operator enters (counts as a top-up)."""
    st = _operator(request)
    cents = parse_dollars("amount", form.get("amount", ""))
    money.add_balance(
        st.store.db(), store.parse_id(account_id, "account"), cents, "operator top-up (console)"
    )
    return _redirect(request, _back(form))
