"""What a checker is: the ``Checker`` protocol, what it is given and what it answers.

A checker is any object with a ``name``, a ``stage`` (1, 2, ...: every checker of a
stage runs before any of the next, and a failure ends the check), a ``priority``
(order within a stage, lower first) and ``async check(egress, ctx)`` answering a
:class:`CheckOutcome`. Third parties register theirs in the ``datorus.checkers``
entry-point group (:mod:`.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..egress import EgressSpec

ANONYMITY = ("transparent", "anonymous", "elite")


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """What one checker found about one egress.

    ``skipped``: the checker does not apply (no judge is configured, a source address
    of the other family than the judge); it counts neither way. The other fields are
    findings a later stage or the pool may use: latency of this checker's exchange,
    the exit address the judge saw, the anonymity grade, the exit's country (ISO
    3166-1 alpha-2, upper case).
    """

    passed: bool
    detail: str = ""
    latency_ms: float | None = None
    exit_ip: str | None = None
    anonymity: str | None = None
    country: str | None = None
    skipped: bool = False

    @classmethod
    def skip(cls, why: str) -> CheckOutcome:
        """A checker that does not apply to this egress, and why."""
        return cls(False, why, skipped=True)

    def __post_init__(self) -> None:
        if self.anonymity is not None and self.anonymity not in ANONYMITY:
            raise ValueError(f"anonymity must be one of {', '.join(ANONYMITY)}")


@dataclass(frozen=True, slots=True)
class CheckContext:
    """What every checker of one check is given.

    *judge_url*: the URL that answers the caller's address and headers (JSON
    ``{"ip", "headers"}``), or None when there is none; *timeout*: seconds one checker
    may take; *own_addresses*: the gateway's own addresses as targets may see them (a
    proxy that passes one on is transparent); *earlier*: the outcomes of the checkers
    that ran before this one in this check.
    """

    judge_url: str | None
    timeout: float
    own_addresses: frozenset[str] = frozenset()
    earlier: tuple[CheckOutcome, ...] = ()


@runtime_checkable
class Checker(Protocol):
    """A checker plugin (entry-point group ``datorus.checkers``); ``name`` is the entry
    point's name."""

    name: str
    stage: int
    priority: int

    async def check(self, egress: EgressSpec, ctx: CheckContext) -> CheckOutcome:
        """Check *egress* once; never raises for the egress's own faults (a refused
        connection is a failed outcome, not an exception)."""
        ...
