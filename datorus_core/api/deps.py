"""Route dependencies and shared parameters: the state, the account, throttles, paging.

Authenticated routes are throttled per API key (``api_key_rps``/``api_key_burst``);
a failed key check counts against the client address (``api_key_fail_limit`` a
minute; past it the address's failures get 429, a correct key still passes).
``POST /fetch`` authenticates without the per-key throttle: it goes through the
gateway's proxy port, whose per-credential limit is the one that binds.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..envelope import DatorusError
from ..ratelimit import Verdict
from .state import ApiState
from .store import ApiKeyError, authenticate

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer pp_<48 characters>`, from sign-up or POST /auth/keys.",
)


def state(request: Request) -> ApiState:
    """The API's shared state."""
    return request.app.state.api


def client_address(request: Request) -> str:
    """The client's address as the server saw it (``?`` when unknown)."""
    return request.client.host if request.client else "?"


def note_limit(request: Request, headers: dict[str, str], force: bool = False) -> None:
    """Put *headers* (``X-RateLimit-*``) on this request's answer.

    When several limits apply the tightest one (least remaining) is shown, and a
    refusal always shows the limit that refused.
    """
    old = getattr(request.state, "rate_headers", None)
    if (
        not force
        and old
        and int(old["X-RateLimit-Remaining"]) <= int(headers["X-RateLimit-Remaining"])
    ):
        return
    request.state.rate_headers = headers


def throttle(request: Request, rule: str, key: str) -> Verdict:
    """Count this request against *rule* for *key*; 429 ``RATE_LIMITED`` when over."""
    t = request.app.state.api.throttle
    v = t.take(rule, key)
    note_limit(request, t.headers(rule, v), force=not v.allowed)
    if not v.allowed:
        raise t.refusal(rule, v)
    return v


def key_account(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> dict[str, Any]:
    """The account whose API key authorised this request (401 otherwise).

    A wrong key counts against the client address; past ``api_key_fail_limit`` a
    minute it is ``429 RATE_LIMITED`` instead of 401. Only failures count (a correct
    key is never refused for them), and a request with no ``Authorization`` at all is
    no attempt, as on the proxy.
    """
    st: ApiState = request.app.state.api
    header = request.headers.get("authorization")
    try:
        return authenticate(st.store.db(), header)
    except ApiKeyError:
        if header is not None:
            throttle(request, "key_fail", client_address(request))
        raise


def account(
    request: Request, acc: Annotated[dict[str, Any], Depends(key_account)]
) -> dict[str, Any]:
    """Like :func:`key_account`, throttled per API key (``api_key_rps``, ``api_key_burst``)."""
    throttle(request, "key", str(acc["api_key_id"]))
    return acc


def require_active(acc: dict[str, Any]) -> dict[str, Any]:
    """*acc* if it is active; 403 ``ACCOUNT_SUSPENDED`` otherwise."""
    if acc["status"] != "active":
        raise DatorusError("ACCOUNT_SUSPENDED", details={"accountId": acc["id"]})
    return acc


def active_account(acc: Annotated[dict[str, Any], Depends(account)]) -> dict[str, Any]:
    """Like :func:`account`, refusing suspended accounts (403) for things that create access."""
    return require_active(acc)


def signup_throttle(request: Request) -> None:
    """Count a sign-up against the client address (``api_signups_per_hour``)."""
    throttle(request, "signup", client_address(request))


def resend_throttle(request: Request, acc: Annotated[dict[str, Any], Depends(account)]) -> None:
    """Count a verification mail against the address and the account (``api_resends_per_hour``)."""
    throttle(request, "resend", f"addr:{client_address(request)}")
    throttle(request, "resend", f"account:{acc['id']}")


State = Annotated[ApiState, Depends(state)]
Account = Annotated[dict[str, Any], Depends(account)]
ActiveAccount = Annotated[dict[str, Any], Depends(active_account)]
KeyAccount = Annotated[dict[str, Any], Depends(key_account)]  # not throttled per key
SignupThrottle = Annotated[None, Depends(signup_throttle)]
ResendThrottle = Annotated[None, Depends(resend_throttle)]

# the paging parameters of every list (``?limit=&cursor=``, seed 002's shape)
Limit = Annotated[int, Query(ge=1, le=200, description="Items per page.")]
Cursor = Annotated[str | None, Query(max_length=200, description="From next_cursor.")]
