"""Property tests for the GCRA limiter: exact burst, exact rate, exact Retry-After."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datorus_core.ratelimit import Gcra

rates = st.integers(min_value=1, max_value=10_000)
bursts = st.integers(min_value=1, max_value=1_000)
clock = st.floats(min_value=0.0, max_value=1e7, allow_nan=False)


@given(rates, bursts, clock)
def test_exactly_burst_requests_pass_at_once_from_idle(rate, burst, t0):
    lim = Gcra(rate, burst)
    verdicts = [lim.take(t0) for _ in range(burst + 1)]
    assert all(v.allowed for v in verdicts[:burst])
    assert not verdicts[-1].allowed
    assert [v.remaining for v in verdicts[:burst]] == list(range(burst - 1, -1, -1))


@settings(max_examples=200)
@given(
    rates,
    bursts,
    clock,
    st.lists(st.floats(min_value=0.0, max_value=0.05, allow_nan=False), min_size=1, max_size=300),
)
def test_no_window_ever_passes_more_than_burst_plus_rate_times_t(rate, burst, t0, gaps):
    lim = Gcra(rate, burst)
    now, passed = t0, []
    for g in gaps:
        now += g
        if lim.take(now).allowed:
            passed.append(now)
    for i, start in enumerate(passed):
        for j in range(i, len(passed)):
            span = passed[j] - start
            assert j - i + 1 <= burst + rate * span + 1e-6 * rate + 1


@given(rates, bursts, clock, st.integers(min_value=1, max_value=50))
def test_retry_after_is_exact(rate, burst, t0, extra):
    lim = Gcra(rate, burst)
    for _ in range(burst):
        assert lim.take(t0).allowed
    for _ in range(extra):
        v = lim.take(t0)
        assert not v.allowed and v.retry_after > 0
    v = lim.take(t0)
    assert lim.take(t0 + v.retry_after).allowed  # waiting exactly retry_after suffices
    assert v.retry_after_seconds == max(1, math.ceil(v.retry_after - 1e-9))


@given(rates, bursts, clock)
def test_a_client_at_exactly_the_rate_is_never_refused(rate, burst, t0):
    lim = Gcra(rate, burst)
    for k in range(3 * burst + 10):
        assert lim.take(t0 + k / rate).allowed


@given(rates, bursts, clock)
def test_reset_after_is_when_the_burst_is_whole_again(rate, burst, t0):
    lim = Gcra(rate, burst)
    v = None
    for _ in range(burst):
        v = lim.take(t0)
    assert v is not None
    assert lim.peek(t0 + v.reset_after + 1e-9).remaining == burst


def test_bad_configuration_is_refused():
    for rate, burst in ((0, 1), (1, 0), (-1, 5), (math.inf, 5)):
        with pytest.raises(ValueError):
            Gcra(rate, burst)
