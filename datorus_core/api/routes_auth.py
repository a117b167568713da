"""Sign-up, email verification and API keys (``/auth/...``), and ``GET /health``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from ..envelope import DatorusError
from ..ledger import api as ledger_api
from . import store
from .deps import Account, ActiveAccount, Cursor, Limit, ResendThrottle, SignupThrottle, State
from .models import KeyIn, RegisterIn, VerifyIn
from .state import VERSION

router = APIRouter()


@router.get("/health", tags=["system"])
def health(st: State) -> Any:
    """The ledger's state and the version; 503 when the ledger cannot be read."""
    try:
        db = st.store.db()
        schema = db.schema_version()
        db.config_version()
    except Exception as e:
        raise DatorusError(
            "SERVICE_UNAVAILABLE",
            details={"ledger": "unavailable", "reason": str(e)[:200]},
            headers={"Retry-After": "1"},
        ) from None
    answer = {
        "status": "healthy",
        "ledger": "connected",
        "schema_version": schema,
        "version": VERSION,
        "gateway": st.runtime is not None,
    }
    if st.hot_status is not None:
        answer["hotState"] = st.hot_status()
    return answer


@router.post("/auth/register", status_code=201, tags=["auth"])
def register(_: SignupThrottle, body: RegisterIn, st: State) -> Any:
    """Create an account and its first API key (shown this once); mail a verification token.

    409 ``EMAIL_TAKEN`` if the email has an account; 409 ``EMAIL_PROVIDER_MISMATCH``
    if it belongs to a social-login (google/github) account. Every attempt counts
    against the client address: past ``api_signups_per_hour``, 429 ``RATE_LIMITED``.
    """
    return store.register(st.store, st.settings, body.email, body.display_name)


def _verify(st: State, token: str) -> Any:
    return store.verify(st.store, st.settings, token)


@router.post("/auth/verify", tags=["auth"])
def verify(body: VerifyIn, st: State) -> Any:
    """Consume a verification token and grant the free trial.

    400 ``TOKEN_INVALID``, 410 ``TOKEN_EXPIRED``, 409 ``TOKEN_USED``.
    """
    return _verify(st, body.token)


@router.get("/auth/verify", tags=["auth"])
def verify_link(st: State, token: Annotated[str, Query(min_length=1, max_length=1000)]) -> Any:
    """The link in the verification mail: same as ``POST /auth/verify``."""
    return _verify(st, token)


@router.post("/auth/verify/resend", status_code=202, tags=["auth"])
def resend(acc: Account, _: ResendThrottle, st: State) -> Any:
    """Mail a fresh verification token (earlier ones stay valid until they expire).

    At most ``api_resends_per_hour`` per client address and per account (429 past it).
    """
    if acc["verified_at"] is not None:
        return {"sent": False, "verified": True}
    store.send_verification(st.store, st.settings, acc["id"], acc["email"])
    return {"sent": True, "verified": False}


@router.post("/auth/keys", status_code=201, tags=["auth"])
def create_key(acc: ActiveAccount, st: State, body: KeyIn | None = None) -> Any:
    """A new API key; ``key`` is returned only in this response."""
    return store.create_key(st.store.db(), acc["id"], body.label if body else None)


@router.get("/auth/keys", tags=["auth"])
def list_keys(acc: Account, st: State, limit: Limit = 50, cursor: Cursor = None) -> Any:
    """The account's keys by prefix and metadata, never the keys themselves."""
    rows, nxt, total = store.page(st.store.db(), ledger_api.KEYS_SQL, [acc["id"]], limit, cursor)
    return store.listing([store.key_view(r) for r in rows], nxt, total)


@router.delete("/auth/keys/{key_id}", tags=["auth"])
def revoke_key(key_id: str, acc: Account, st: State) -> Any:
    """Revoke a key; requests with it get 401 from then on."""
    return store.revoke_key(st.store.db(), acc["id"], key_id)
