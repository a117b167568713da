"""One check of one egress: every loaded checker, stage by stage.

Stages run in order (1, 2, ...), the checkers of a stage by priority. The first
checker that fails ends the check: later ones do not run (a proxy that refuses TCP is
not fetched through). A checker that does not apply is skipped and counts neither
way. A checker that raises (a plugin's bug) or does not answer a ``CheckOutcome``
fails the check, and the error is kept for its health (``GET /stats/plugins``): what a
stage could not verify is never taken as verified, so a proxy that makes the judge's
checker raise never carries traffic on the strength of its TCP check alone (a broken
plugin shows in its ``errors``, and the pool's dead proxies point at it). A checker
that overruns the timeout by a second is stopped and failed.

The check passes when at least one checker ran and every one that ran passed; what
that does to the egress's status is ``datorus_core.egress_status``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from ..egress import EgressSpec
from .base import CheckContext, CheckOutcome
from .registry import CheckerRegistry

log = logging.getLogger("datorus.checkers")
_GRACE = 1.0  # seconds past the timeout before a checker is stopped
_DETAIL_CHARS = 200


@dataclass(frozen=True, slots=True)
class Ran:
    """One checker's part in a check: its outcome, or the error it raised."""

    name: str
    stage: int
    outcome: CheckOutcome
    error: str | None = None

    @property
    def counted(self) -> bool:
        """Whether it counts for the check: it applied (an error counts, as a failure)."""
        return not self.outcome.skipped


@dataclass(frozen=True, slots=True)
class CheckReport:
    """Every checker's part in one check, in run order, and what they add up to."""

    ran: tuple[Ran, ...]

    @property
    def passed(self) -> bool:
        """At least one checker counted and every one that counted passed."""
        counted = [r for r in self.ran if r.counted]
        return bool(counted) and all(r.outcome.passed for r in counted)

    @property
    def stage(self) -> int:
        """The last stage a counted checker ran in (0: none)."""
        return max((r.stage for r in self.ran if r.counted), default=0)

    def _found(self, attr: str) -> str | float | None:
        for r in reversed(self.ran):
            value = getattr(r.outcome, attr)
            if r.counted and r.outcome.passed and value is not None:
                return value  # type: ignore[no-any-return]
        return None

    @property
    def latency_ms(self) -> float | None:
        """The latency the last passing checker measured (the deepest stage's)."""
        v = self._found("latency_ms")
        return float(v) if v is not None else None

    @property
    def exit_ip(self) -> str | None:
        """The exit address a passing checker found."""
        v = self._found("exit_ip")
        return str(v) if v is not None else None

    @property
    def anonymity(self) -> str | None:
        """The anonymity grade a passing checker found."""
        v = self._found("anonymity")
        return str(v) if v is not None else None

    @property
    def country(self) -> str | None:
        """The exit's country a passing checker found."""
        v = self._found("country")
        return str(v) if v is not None else None

    @property
    def detail(self) -> str:
        """Why it failed (the failing checker's detail), or the last counted detail."""
        counted = [r for r in self.ran if r.counted]
        failed = [r for r in counted if not r.outcome.passed]
        if failed:
            return f"{failed[0].name}: {failed[0].outcome.detail}"
        return counted[-1].outcome.detail if counted else "no checker applied"


async def run_check(
    egress: EgressSpec, registry: CheckerRegistry, ctx: CheckContext
) -> CheckReport:
    """Run every checker of *registry* on *egress*, stage by stage (see the module)."""
    ran: list[Ran] = []
    for plugin in registry.plugins:
        if any(r.counted and not r.outcome.passed for r in ran):
            break
        c = replace(ctx, earlier=tuple(r.outcome for r in ran if r.counted))
        try:
            outcome = await asyncio.wait_for(plugin.checker.check(egress, c), ctx.timeout + _GRACE)
            if not isinstance(outcome, CheckOutcome):
                raise TypeError(f"check() answered a {type(outcome).__name__}, no CheckOutcome")
        except TimeoutError:
            outcome = CheckOutcome(False, f"no answer within {ctx.timeout:g} s")
        except Exception as e:  # a plugin's bug: a failure, kept for its health too
            error = f"{type(e).__name__}: {e}"[:_DETAIL_CHARS]
            log.warning(
                "datorus: checker %s raised on %s: %s", plugin.name, egress.public_url(), error
            )
            outcome = CheckOutcome(False, f"checker error: {error}"[:_DETAIL_CHARS])
            ran.append(Ran(plugin.name, plugin.stage, outcome, error))
            continue
        outcome = replace(outcome, detail=str(outcome.detail)[:_DETAIL_CHARS])
        ran.append(Ran(plugin.name, plugin.stage, outcome))
    return CheckReport(tuple(ran))
