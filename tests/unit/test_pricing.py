"""Property tests for the pricing arithmetic: integers only, nothing lost, nothing made."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datorus_core import pricing
from datorus_core.pricing import NANOCENTS_PER_CENT, affordable_bytes, charge, whole_cents

sizes = st.integers(min_value=0, max_value=10**13)
prices = st.integers(min_value=0, max_value=10**7)
trials = st.integers(min_value=-(10**9), max_value=10**13)


@given(sizes, trials, prices)
def test_charge_splits_every_byte_once(nbytes, trial, price):
    c = charge(nbytes, trial, price)
    assert c.trial_bytes + c.paid_bytes == nbytes
    assert 0 <= c.trial_bytes <= max(trial, 0)
    assert c.nanocents == c.paid_bytes * price
    assert all(type(v) is int for v in c)


@given(st.lists(sizes, max_size=50), trials, prices)
def test_many_small_charges_cost_what_one_big_charge_costs(parts, trial, price):
    """Fractions of a cent carry over exactly: splitting usage never changes the price."""
    whole = charge(sum(parts), trial, price)
    left, trial_used, paid = trial, 0, 0
    for n in parts:
        c = charge(n, left, price)
        left -= c.trial_bytes
        trial_used += c.trial_bytes
        paid += c.nanocents
    assert (trial_used, paid) == (whole.trial_bytes, whole.nanocents)


def test_a_million_one_byte_charges_cost_one_million_byte_charge():
    one = sum(charge(1, 0, 300).nanocents for _ in range(10**6))
    assert one == charge(10**6, 0, 300).nanocents == 300_000_000
    assert whole_cents(one) == 0 and whole_cents(one * 4) == 1


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_whole_cents_rounds_toward_minus_infinity(nanocents):
    cents = whole_cents(nanocents)
    assert cents * NANOCENTS_PER_CENT <= nanocents < (cents + 1) * NANOCENTS_PER_CENT


@given(
    st.integers(min_value=-(10**15), max_value=10**15),
    st.integers(min_value=0, max_value=10**12),
    st.integers(min_value=1, max_value=10**9),
)
def test_affordable_bytes_is_the_most_that_keeps_the_floor(balance, overdraft, price):
    floor = -overdraft
    n = affordable_bytes(balance, floor, price)
    assert n >= 0
    if balance >= floor:
        assert balance - n * price >= floor  # n bytes keep the floor
        assert balance - (n + 1) * price < floor  # one more would break it
    else:
        assert n == 0


def test_free_price_is_unbounded_and_bad_input_is_refused():
    assert affordable_bytes(0, 0, 0) >= 1 << 62
    with pytest.raises(ValueError):
        charge(-1, 0, 300)
    with pytest.raises(ValueError):
        charge(1, 0, -1)
    assert pricing.cents_to_nanocents(3) == 3 * NANOCENTS_PER_CENT
