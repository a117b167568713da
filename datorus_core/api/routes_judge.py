"""``GET /judge``: the caller's address and the headers it sent, for anonymity checks.

No API key: the gateway's checker fetches it *through* the upstream proxies it checks
(``egress_check_url`` defaults to it, at ``public_url``). Why it is safe open:
``datorus_core.judge``. Anyone may call it ``api_judge_per_minute`` times a minute per
address (429 ``RATE_LIMITED`` past that); the gateway's own checks, signed with
``?check=``, are not counted.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..judge import judge_answer, valid_check_token
from ..ledger import api as ledger_api
from .deps import State, client_address, throttle

router = APIRouter(tags=["pool"])

JUDGE_SECRET = "judge"  # the ledger's api_secrets name the check tokens are signed with


async def judge_secret(st: Any) -> str:
    """The ledger's judge secret (read once per process)."""
    value = st.extra.get("judge_secret")
    if value is None:
        value = await run_in_threadpool(lambda: ledger_api.secret(st.store.db(), JUDGE_SECRET))
        st.extra["judge_secret"] = value
    return str(value)


@router.get(
    "/judge",
    summary="The caller's address and request headers (an anonymity judge)",
    responses={
        200: {
            "description": "What the judge saw",
            "content": {
                "application/json": {
                    "example": {
                        "ip": "203.0.113.9",
                        "port": 51234,
                        "headers": {"host": "gw.example:8002", "via": "1.1 squid"},
                        "judge": "datorus",
                    }
                }
            },
        }
    },
)
async def judge(
    request: Request,
    st: State,
    check: Annotated[
        str | None, Query(max_length=64, description="The gateway's own check signature.")
    ] = None,
) -> Any:
    """Answer the address this request came from and the headers it carried (names in
    lower case; ``Authorization``, ``Proxy-Authorization`` and ``Cookie`` redacted).

    Open to anyone, limited per client address (``api_judge_per_minute``); the
    gateway's own checks carry ``check`` and are not counted.
    """
    if not (check and valid_check_token(await judge_secret(st), check, time.time())):
        throttle(request, "judge", client_address(request))
    client = request.client
    body = judge_answer(
        client.host if client else None,
        client.port if client else None,
        ((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw),
    )
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
