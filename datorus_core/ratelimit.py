"""Rate limiting with GCRA (the generic cell rate algorithm): O(1) time and state per key.

A limiter with ``rate`` requests per second and ``burst`` lets exactly ``burst``
requests through at once from idle, then one every ``1/rate`` seconds, and in any
window of ``t`` seconds never more than ``burst + rate * t``::

    >>> lim = Gcra(rate=10, burst=3)
    >>> [lim.take(0.0).allowed for _ in range(4)]
    [True, True, True, False]
    >>> lim.take(0.1).allowed
    True

Times are monotonic seconds passed in by the caller (no clock inside).

The state is GCRA's theoretical arrival time written as a *debt*: how many request
slots are in use (``tat - at``, in units of ``1/rate``) as of the last ``take``. A
burst at one instant then adds exact whole numbers, so floating point error does not
grow with the magnitude of the clock (a monotonic clock after months of uptime reads
1e7 seconds, where adding 100 intervals to an absolute time loses whole nanoseconds).
"""

from __future__ import annotations

import math
from typing import NamedTuple

# Slots of slack when comparing: absorbs clock rounding (a float clock after months of
# uptime is ~1e-9 s coarse, 1e-5 slots at 10,000 rps), never a whole request.
_EPS = 1e-3


class Verdict(NamedTuple):
    """The outcome of one ``take``: allowed or not, what is left, and when to come back."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float  # seconds until the bucket is full again
    retry_after: float  # seconds until this request would pass (0 when allowed)

    @property
    def retry_after_seconds(self) -> int:
        """Retry-After as whole seconds, at least 1 (RFC 9110): waiting that long suffices."""
        return max(1, math.ceil(self.retry_after - 1e-9))


class Gcra:
    """One key's limiter: the slots in use at the last take are its whole state."""

    __slots__ = ("at", "burst", "debt", "interval", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = 0.0
        self.interval = 0.0
        self.burst = 0
        self.reconfigure(rate, burst)
        self.debt = 0.0  # slots in use as of ``at``
        self.at = 0.0

    def reconfigure(self, rate: float, burst: int) -> None:
        """Change rate and burst, keeping the slots in use (the debt, in requests)."""
        if not (rate > 0 and burst > 0) or math.isinf(rate):
            raise ValueError("rate and burst must be > 0")
        self.rate = float(rate)
        self.interval = 1.0 / self.rate
        self.burst = int(burst)

    def _debt_at(self, now: float) -> float:
        """Slots in use at *now* (the debt drains at ``rate`` slots per second)."""
        if now <= self.at:
            return self.debt
        return max(0.0, self.debt - (now - self.at) * self.rate)

    def _verdict(self, allowed: bool, debt: float, retry_after: float) -> Verdict:
        remaining = max(0, math.floor(self.burst - debt + _EPS))
        return Verdict(allowed, self.burst, remaining, debt / self.rate, retry_after)

    def peek(self, now: float) -> Verdict:
        """The state at *now* without taking anything."""
        debt = self._debt_at(now)
        return self._verdict(debt + 1 <= self.burst + _EPS, debt, 0.0)

    def take(self, now: float, cost: int = 1) -> Verdict:
        """Take *cost* requests at *now*; allowed only if all fit.

        When refused, ``retry_after`` is exact: a ``take(now + retry_after, cost)``
        with no other takes in between is allowed.
        """
        debt = self._debt_at(now)
        if debt + cost <= self.burst + _EPS:
            self.debt = debt + cost
            self.at = max(now, self.at)
            return self._verdict(True, self.debt, 0.0)
        if cost > self.burst:
            return self._verdict(False, debt, math.inf)
        retry = (debt + cost - self.burst) / self.rate
        for _ in range(64):  # rounding: step up to the first instant that fits
            if self._debt_at(now + retry) + cost <= self.burst + _EPS:
                break
            retry = math.nextafter(now + retry, math.inf) - now
        return self._verdict(False, debt, retry)
