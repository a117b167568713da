"""Route dependencies: the shared state and the authenticated account."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..envelope import DatorusError
from .app import ApiState
from .store import authenticate

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer pp_<48 characters>`, from sign-up or POST /auth/keys.",
)


def state(request: Request) -> ApiState:
    """The API's shared state."""
    return request.app.state.api


def account(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> dict[str, Any]:
    """The account whose API key authorised this request (401 otherwise)."""
    st: ApiState = request.app.state.api
    return authenticate(st.store.db(), request.headers.get("authorization"))


def active_account(acc: Annotated[dict[str, Any], Depends(account)]) -> dict[str, Any]:
    """Like :func:`account`, refusing suspended accounts (403) for things that create access."""
    if acc["status"] != "active":
        raise DatorusError("ACCOUNT_SUSPENDED", details={"accountId": acc["id"]})
    return acc


State = Annotated[ApiState, Depends(state)]
Account = Annotated[dict[str, Any], Depends(account)]
ActiveAccount = Annotated[dict[str, Any], Depends(active_account)]
