"""Route dependencies and shared parameters: the state, the account, throttles, paging.

Keys come in two kinds: a customer's (of an account) and the operator's (``datorus key
create --operator``, of no account). Customer routes take the first (an operator key
there is 401: it has no account), operator routes (``/sources*``) only the second (a
customer's key there is 404, as if the route did not exist), and the read-only pool
routes either.

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
from .store import ApiKeyError, OperatorKeyError, key_owner, live_key

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer pp_<48 characters>`, from sign-up or POST /auth/keys.",
)
operator_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="OperatorKey",
    description=(
        "An operator key, `Authorization: Bearer pp_<48 characters>` from `datorus key create"
        " --operator`. Routes marked `x-datorus-operator: true` take only this key: a"
        " customer's key gets 404 RESOURCE_NOT_FOUND there, as for a route that does not exist."
    ),
)
#: ``openapi_extra`` of every route that needs an operator key.
OPERATOR_ONLY: dict[str, Any] = {"x-datorus-operator": True}


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
    row = _live_key(request)
    return key_owner(st.store.db(), row)


def _live_key(request: Request) -> dict[str, Any]:
    """The request's live API key of either kind (401, counted against the address, for
    a wrong one; a request with no ``Authorization`` is no attempt)."""
    st: ApiState = request.app.state.api
    header = request.headers.get("authorization")
    try:
        return live_key(st.store.db(), header)
    except ApiKeyError as e:
        if header is not None and not isinstance(e, OperatorKeyError):
            throttle(request, "key_fail", client_address(request))
        raise


def no_such_route(request: Request) -> DatorusError:
    """The 404 of a route that does not exist, word for word (``app._http_error``'s)."""
    return DatorusError(
        "RESOURCE_NOT_FOUND",
        message=f"No such endpoint: {request.method} {request.url.path}.",
        details={"path": request.url.path},
    )


def operator_key(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(operator_bearer)],
) -> dict[str, Any]:
    """The operator key that authorised this request, throttled per key.

    No key or a wrong one: 401 as everywhere. A customer's key: 404
    ``RESOURCE_NOT_FOUND``, the answer to a route that does not exist (for it, it does
    not), before the request's body or path is even looked at.
    """
    row = _live_key(request)
    if not row["operator"]:
        raise no_such_route(request)
    throttle(request, "key", str(row["id"]))
    return row


def any_key(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    __: Annotated[HTTPAuthorizationCredentials | None, Depends(operator_bearer)],
) -> dict[str, Any]:
    """A customer's or the operator's key (read-only pool routes), throttled per key."""
    row = _live_key(request)
    throttle(request, "key", str(row["id"]))
    return row


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
Operator = Annotated[dict[str, Any], Depends(operator_key)]
AnyKey = Annotated[dict[str, Any], Depends(any_key)]  # a customer's or the operator's
SignupThrottle = Annotated[None, Depends(signup_throttle)]
ResendThrottle = Annotated[None, Depends(resend_throttle)]

# the paging parameters of every list (``?limit=&cursor=``, seed 002's shape)
Limit = Annotated[int, Query(ge=1, le=200, description="Items per page.")]
Cursor = Annotated[str | None, Query(max_length=200, description="From next_cursor.")]
