"""Checker plugins for the registry and pipeline tests: real objects behind real entry
points (``support.checker_plugins:NAME``), each doing one plain thing."""

from __future__ import annotations

import asyncio

from datorus_core.checkers.base import CheckContext, CheckOutcome
from datorus_core.egress import EgressSpec


class _Plain:
    name = "plain"
    stage = 1
    priority = 0
    answer = CheckOutcome(True, "ok")

    async def check(self, egress: EgressSpec, ctx: CheckContext) -> CheckOutcome:
        return self.answer


class Passes(_Plain):
    name = "passes"


class FailsStage1(_Plain):
    name = "fails_stage1"
    priority = 5
    answer = CheckOutcome(False, "refused")


class Stage2(_Plain):
    name = "stage2"
    stage = 2
    answer = CheckOutcome(True, "judged", latency_ms=12.0, exit_ip="192.0.2.7", country="FR")


class Stage2Early(_Plain):
    name = "stage2_early"
    stage = 2
    priority = -1
    answer = CheckOutcome(True, "early", latency_ms=3.0)


class Skips(_Plain):
    name = "skips"
    stage = 2
    answer = CheckOutcome.skip("not for this egress")


class Raises(_Plain):
    name = "raises"

    async def check(self, egress: EgressSpec, ctx: CheckContext) -> CheckOutcome:
        raise RuntimeError("plugin bug")


class AnswersNothing(_Plain):
    name = "answers_nothing"

    async def check(self, egress: EgressSpec, ctx: CheckContext):  # type: ignore[override]
        return "yes"


class Hangs(_Plain):
    name = "hangs"

    async def check(self, egress: EgressSpec, ctx: CheckContext) -> CheckOutcome:
        await asyncio.sleep(3600)
        return self.answer


class SeesEarlier(_Plain):
    name = "sees_earlier"
    stage = 3

    async def check(self, egress: EgressSpec, ctx: CheckContext) -> CheckOutcome:
        return CheckOutcome(True, f"saw {len(ctx.earlier)}")


class NotAsync:
    name = "not_async"
    stage = 1
    priority = 0

    def check(self, egress: EgressSpec, ctx: CheckContext) -> CheckOutcome:
        return CheckOutcome(True)


class BadStage(_Plain):
    name = "bad_stage"
    stage = 0


class StrStage(_Plain):
    name = "str_stage"
    stage = "1"  # type: ignore[assignment]
