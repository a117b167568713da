"""Named events and what is decided about them: types, glob subscriptions, signatures,
back-off, the Server-Sent Events framing (issue 18).

Pure: no I/O, no database. The ledger keeps the events (:mod:`.ledger.events`); the
gateway's delivery task sends them (``addons/events.py``).

An event as every reader sees it::

    >>> e = view({"id": 7, "type": "credits.purchased", "created_at": "2026-12-06T18:00:00Z",
    ...           "data": '{"amount_cents": 500}', "account_id": 1})
    >>> e["id"], e["data"]
    ('7', {'amount_cents': 500})

Subscriptions are comma-separated glob patterns::

    >>> matches(parse_patterns("proxy.*, credits.*"), "credits.low")
    True
    >>> matches(parse_patterns("proxy.pool_low"), "proxy.dead")
    False

Signatures are Stripe's scheme: ``t=UNIX,v1=HEX(HMAC-SHA256(secret, "t.body"))``::

    >>> header = signature_header("whsec_x", b'{"id":"1"}', 1700000000)
    >>> header.startswith("t=1700000000,v1=")
    True
    >>> verify_signature("whsec_x", b'{"id":"1"}', header, now=1700000010)
    True
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import random
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "ACCOUNT_TYPES",
    "TYPES",
    "backoff_seconds",
    "matches",
    "parse_patterns",
    "signature_header",
    "sse_frame",
    "verify_signature",
    "view",
]

# every event Datorus writes, with what it means
TYPES: dict[str, str] = {
    "proxy.pool_low": "the active egress fell below event_pool_low (once per crossing)",
    "proxy.dead": "an egress failed its checks and left the pool",
    "proxy.recovered": "a dead egress passed its checks again",
    "source.scraped": "a proxy-list source was scraped",
    "source.failed": "a proxy-list source could not be scraped",
    "credits.low": "a balance fell below the account's low mark (once per crossing)",
    "credits.purchased": "money was added to a balance (a top-up, a card payment)",
    "credits.exhausted": "an account was first refused for money since its last top-up",
    "credits.recharge_failed": "an automatic recharge was declined",
    "lease.acquired": "an egress was leased",
    "lease.expired": "a lease ran out",
    "account.suspended": "an account was suspended",
}
# the events that belong to one account (its customer sees them; the rest are the operator's)
ACCOUNT_TYPES = frozenset(t for t in TYPES if t.startswith(("credits.", "lease.", "account.")))
_PATTERN = re.compile(r"[a-z*?_.\[\]]{1,64}")
MAX_PATTERNS = 32


def parse_patterns(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Glob patterns from ``"proxy.*,credits.*"`` (or a list of them); ValueError if one is
    malformed or matches no known event type."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in parts:
        p = raw.strip().lower()
        if not p:
            continue
        if not _PATTERN.fullmatch(p):
            raise ValueError(f"{raw!r} is not an event pattern (like 'credits.*')")
        if not any(fnmatch.fnmatchcase(t, p) for t in TYPES):
            raise ValueError(f"{raw!r} matches no event type ({', '.join(sorted(TYPES))})")
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError("at least one event pattern is needed (like 'credits.*')")
    if len(out) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} patterns")
    return tuple(out)


def matches(patterns: Iterable[str], event_type: str) -> bool:
    """Whether *event_type* matches any of *patterns*."""
    return any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


def view(row: Mapping[str, Any]) -> dict[str, Any]:
    """An event row as readers see it: ``{"id", "type", "created_at", "data"}``; the id is
    a string (an SSE id, and no client need care that it is a number)."""
    data = row["data"]
    return {
        "id": str(row["id"]),
        "type": row["type"],
        "created_at": row["created_at"],
        "data": json.loads(data) if isinstance(data, str) else data,
    }


def body(event: Mapping[str, Any]) -> bytes:
    """The JSON body a webhook or notifier delivers for *event* (a :func:`view`)."""
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: str, payload: bytes, timestamp: int) -> str:
    """HEX(HMAC-SHA256(secret, "timestamp.payload"))."""
    msg = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def signature_header(secret: str, payload: bytes, timestamp: int) -> str:
    """The ``Datorus-Signature`` header value: ``t=UNIX,v1=HEX``."""
    return f"t={timestamp},v1={sign(secret, payload, timestamp)}"


def verify_signature(
    secret: str, payload: bytes, header: str, now: int, tolerance: int = 300
) -> bool:
    """Whether *header* signs *payload* with *secret* within *tolerance* seconds of *now*
    (the receiver's side; the README shows the same check standing alone)."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        k, _, v = part.strip().partition("=")
        fields.setdefault(k, []).append(v)
    try:
        t = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(now - t) > tolerance:
        return False
    want = sign(secret, payload, t)
    return any(hmac.compare_digest(want, v) for v in fields.get("v1", []))


def backoff_seconds(
    attempts: int, rng: random.Random | None = None, cap: float = 3600.0, first: float = 5.0
) -> float:
    """How long to wait after the *attempts*-th failed delivery: exponential from *first*,
    capped at *cap*, with full jitter on the upper half (so a crowd of retries spreads).

    >>> r = random.Random(1)
    >>> [round(backoff_seconds(n, r)) for n in (1, 2, 3, 10)]
    [3, 9, 18, 1606]
    """
    base = min(cap, first * 2 ** max(0, attempts - 1))
    return base / 2 + (rng or random).random() * base / 2


def sse_frame(event: Mapping[str, Any]) -> str:
    """One Server-Sent Events message for *event* (a :func:`view`)."""
    data = json.dumps(event, separators=(",", ":"))
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {data}\n\n"
