"""Throttling the REST API: GCRA limits per client address and per API key.

Four rules, each a :class:`~datorus_core.ratelimit.Gcra` per key:

- ``signup``: ``POST /auth/register`` per client address (``api_signups_per_hour``);
- ``resend``: ``POST /auth/verify/resend`` per client address and per account
  (``api_resends_per_hour``);
- ``key_fail``: failed API-key checks per client address (``api_key_fail_limit`` a
  minute). Only failures count, as on the proxy (``addons/auth.py``): a correct key
  from a throttled address is still accepted;
- ``key``: every other authenticated request per API key (``api_key_rps``, burst
  ``api_key_burst``);
- ``judge``: ``GET /judge`` per client address (``api_judge_per_minute``), except the
  gateway's own signed checks.

Every answer a rule applied to carries seed 001's ``X-RateLimit-Limit`` (the rule's
requests per window: per second for ``key``, as the proxy's
``X-Datorus-RateLimit-Limit``; per hour or per minute for the others) and
``X-RateLimit-Remaining``; a refusal is ``429 RATE_LIMITED`` with ``Retry-After``.

The state lives in this process's memory. :class:`ApiThrottle` is the one place that
holds it, so a shared store (Redis) can replace it without touching the routes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..envelope import DatorusError
from ..ratelimit import Gcra, Verdict

_MAX_TRACKED = 100_000


@dataclass(frozen=True, slots=True)
class Rule:
    """A limit: *count* requests per *window* seconds, at most *burst* at once."""

    name: str
    count: int
    window: float
    burst: int
    setting: str  # the setting that sets it, named in refusals

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.count / self.window


def rules_from(settings: Mapping[str, Any]) -> dict[str, Rule]:
    """The API's rules from the ``api_*`` settings (defaults for any not given)."""
    from ..settings import BY_NAME

    def get(name: str) -> int:
        return int(settings.get(name) or BY_NAME[name].default)

    signups, resends = get("api_signups_per_hour"), get("api_resends_per_hour")
    fails, judge = get("api_key_fail_limit"), get("api_judge_per_minute")
    return {
        "signup": Rule("signup", signups, 3600.0, signups, "api_signups_per_hour"),
        "resend": Rule("resend", resends, 3600.0, resends, "api_resends_per_hour"),
        "key_fail": Rule("key_fail", fails, 60.0, fails, "api_key_fail_limit"),
        "key": Rule("key", get("api_key_rps"), 1.0, get("api_key_burst"), "api_key_rps"),
        "judge": Rule("judge", judge, 60.0, judge, "api_judge_per_minute"),
    }


_MESSAGES = {
    "signup": "Too many sign-ups from this address.",
    "resend": "Too many verification mails requested.",
    "key_fail": "Too many failed API-key checks from this address.",
    "key": "Too many requests with this API key.",
    "judge": "Too many judge requests from this address.",
}


class ApiThrottle:
    """The API's limiters, keyed by (rule, key), in memory and thread-safe."""

    def __init__(
        self,
        rules: Mapping[str, Rule],
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = _MAX_TRACKED,
    ) -> None:
        self.rules = dict(rules)
        self.clock = clock
        self.max_tracked = max_tracked
        self._buckets: dict[tuple[str, str], Gcra] = {}
        self._lock = threading.Lock()

    def take(self, rule: str, key: str) -> Verdict:
        """Count one request of *key* against *rule*; the verdict says if it may go on."""
        r = self.rules[rule]
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get((rule, key))
            if bucket is None:
                if len(self._buckets) >= self.max_tracked:
                    self._evict(now)
                bucket = self._buckets[(rule, key)] = Gcra(r.rate, r.burst)
            return bucket.take(now)

    def _evict(self, now: float) -> None:
        """Forget buckets that are full again (idle); all of them if none is."""
        idle = [k for k, b in self._buckets.items() if b.peek(now).remaining >= b.burst]
        for k in idle:
            del self._buckets[k]
        if len(self._buckets) >= self.max_tracked:
            self._buckets.clear()

    def headers(self, rule: str, v: Verdict) -> dict[str, str]:
        """Seed 001's rate-limit headers for a verdict of *rule*."""
        return {
            "X-RateLimit-Limit": str(self.rules[rule].count),
            "X-RateLimit-Remaining": str(v.remaining),
        }

    def refusal(self, rule: str, v: Verdict) -> DatorusError:
        """``429 RATE_LIMITED`` for a refused verdict of *rule*, with its headers."""
        r = self.rules[rule]
        retry = v.retry_after_seconds
        return DatorusError(
            "RATE_LIMITED",
            message=_MESSAGES.get(rule),
            details={
                "limit": rule,
                "setting": r.setting,
                "count": r.count,
                "windowSeconds": int(r.window),
                "retryAfterSeconds": retry,
            },
            headers={"Retry-After": str(retry), **self.headers(rule, v)},
        )
