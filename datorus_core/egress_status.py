"""An egress's status, moved by its background checks alone: the one home of that rule.

- A new egress, added by the operator or found by a source, is ``unchecked``: it
  carries no customer traffic yet.
- A check that passes (every checker it ran, up to its last stage) makes it ``active``,
  whatever it was: a dead egress recovers by itself.
- A check that fails adds one to its streak of failures; ``dead_after`` failures in a
  row make it ``dead`` (one failure never does: free proxies flap). Below that an
  active egress stays active; the failure still takes it out of the choice for a short,
  doubling back-off (``egress.Egress.failed``), as a failed connection does.
- Customer connections that fail never move the status: only checks do.

>>> s = Health()
>>> s = after_check(s, passed=True, dead_after=3); s
Health(status='active', streak=0)
>>> for _ in range(2):
...     s = after_check(s, passed=False, dead_after=3)
>>> s
Health(status='active', streak=2)
>>> after_check(s, passed=False, dead_after=3)
Health(status='dead', streak=3)
"""

from __future__ import annotations

from dataclasses import dataclass

UNCHECKED, ACTIVE, DEAD = "unchecked", "active", "dead"
STATUSES = (UNCHECKED, ACTIVE, DEAD)
DEFAULT_DEAD_AFTER = 3


@dataclass(frozen=True, slots=True)
class Health:
    """An egress's status and its streak of failed checks (0 after a pass)."""

    status: str = UNCHECKED
    streak: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        if self.streak < 0:
            raise ValueError("streak must be >= 0")


def after_check(prev: Health, passed: bool, dead_after: int) -> Health:
    """The health after one check that *passed* or not (*dead_after* >= 1 failures in a
    row make an egress dead)."""
    if dead_after < 1:
        raise ValueError("dead_after must be >= 1")
    if passed:
        return Health(ACTIVE, 0)
    streak = prev.streak + 1
    return Health(DEAD if streak >= dead_after else prev.status, streak)


def change(prev: Health, new: Health) -> str | None:
    """The event a move from *prev* to *new* is: ``proxy.dead``, ``proxy.recovered``
    (dead to active), ``proxy.activated`` (unchecked to active), or None.

    >>> change(Health("dead", 4), Health("active", 0))
    'proxy.recovered'
    """
    if prev.status == new.status:
        return None
    if new.status == DEAD:
        return "proxy.dead"
    if new.status == ACTIVE:
        return "proxy.recovered" if prev.status == DEAD else "proxy.activated"
    return None
