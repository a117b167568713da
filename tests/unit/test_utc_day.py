"""The cached UTC day used for usage rows equals strftime's, across day boundaries."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from datorus_core.runtime import utc_day


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_utc_day_matches_strftime(now: float) -> None:
    assert utc_day(now) == time.strftime("%Y-%m-%d", time.gmtime(now))


def test_utc_day_changes_at_midnight_utc() -> None:
    midnight = 1_795_478_400  # 2026-11-24T00:00:00Z
    assert utc_day(midnight - 0.001) == "2026-11-23"
    assert utc_day(midnight) == "2026-11-24"
    assert utc_day(midnight - 1) == "2026-11-23"
    assert utc_day() == time.strftime("%Y-%m-%d", time.gmtime())
