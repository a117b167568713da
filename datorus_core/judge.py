"""The gateway's own judge (``GET /judge``): what it answers, and its checkers' pass.

The judge answers any caller the address it saw the request come from and the
headers it received, so a check through an upstream proxy learns the exit IP and what
the proxy added (``datorus_core.checkers.anonymity``). It needs no API key: the
checker reaches it *through* the proxies it checks, with nothing but a URL. It is
safe to leave open: it reads nothing from the ledger, tells a caller only what that
caller sent (credentials and cookies redacted), and is rate-limited per client address
(``api_judge_per_minute``). The gateway's own checks carry a short-lived signature
(``?check=``, an HMAC of the time window under the ledger's ``judge`` secret) that
lifts that limit, because thousands of proxies may share one exit address.

>>> token = check_token("s3cret", now=1_000_000.0)
>>> valid_check_token("s3cret", token, now=1_000_000.0 + WINDOW_SECONDS)
True
>>> valid_check_token("s3cret", token, now=1_000_000.0 + 3 * WINDOW_SECONDS)
False
>>> judge_answer("203.0.113.9", 4711, [("Host", "j"), ("Via", "a"), ("via", "b")])["headers"]
{'host': 'j', 'via': 'a, b'}
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from .settings import public_base

WINDOW_SECONDS = 600  # a check token holds for this window and the next
REDACTED = frozenset({"authorization", "proxy-authorization", "cookie"})
MAX_HEADERS = 200  # headers echoed at most (the server bounds their size)


def _mac(secret: str, window: int) -> str:
    msg = f"datorus-judge:{window}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()[:32]


def check_token(secret: str, now: float) -> str:
    """The token the gateway's checks send the judge at *now* (Unix seconds)."""
    window = int(now // WINDOW_SECONDS)
    return f"{window:x}.{_mac(secret, window)}"


def valid_check_token(secret: str, token: str, now: float) -> bool:
    """Whether *token* was made with *secret* in this window or the one before."""
    head, sep, mac = token.partition(".")
    if not sep or len(head) > 16:
        return False
    try:
        window = int(head, 16)
    except ValueError:
        return False
    current = int(now // WINDOW_SECONDS)
    if window not in (current, current - 1):
        return False
    if not mac.isascii():  # compare_digest refuses non-ASCII text (a TypeError, a 500)
        return False
    return hmac.compare_digest(mac, _mac(secret, window))


def default_judge_url(settings: Mapping[str, Any], token: str | None = None) -> str | None:
    """The judge the checks fetch: ``egress_check_url``; when empty, the gateway's own
    ``GET /judge`` at ``public_url`` (or where the API listens), signed with *token*;
    None for ``none``, or when empty and the API is off with no ``public_url``.

    >>> default_judge_url({"egress_check_url": "", "api_port": 8002}, "ab.cd")
    'http://127.0.0.1:8002/judge?check=ab.cd'
    >>> default_judge_url({"egress_check_url": "none", "api_port": 8002}) is None
    True
    """
    url = str(settings.get("egress_check_url") or "")
    if url == "none":
        return None
    if url:
        return url
    if not settings.get("api_port") and not settings.get("public_url"):
        return None
    base = f"{public_base(dict(settings))}/judge"
    return f"{base}?check={quote(token, safe='.')}" if token else base


def judge_answer(
    ip: str | None, port: int | None, headers: Iterable[tuple[str, str]]
) -> dict[str, Any]:
    """The judge's JSON: ``{"ip", "port", "headers", "judge"}``; header names in lower
    case, repeated ones joined with ``", "``, credentials and cookies redacted."""
    seen: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key not in seen and len(seen) >= MAX_HEADERS:
            continue
        shown = "(redacted)" if key in REDACTED else value
        seen[key] = f"{seen[key]}, {shown}" if key in seen else shown
    return {"ip": ip, "port": port, "headers": seen, "judge": "datorus"}
