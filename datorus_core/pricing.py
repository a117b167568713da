"""Pay-per-byte pricing in exact integers.

The unit of money is the *nanocent*: 10^9 nanocents make one cent. A price of
P cents per GB (10^9 bytes) is exactly P nanocents per byte, so charging is a
multiplication and fractions of a cent carry over with no rounding at all::

    >>> charge(1_000_000, trial_remaining=0, price_cents_per_gb=300)
    Charge(trial_bytes=0, paid_bytes=1000000, nanocents=300000000)
    >>> sum(charge(1, 0, 300).nanocents for _ in range(10**6)) == 300_000_000
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

NANOCENTS_PER_CENT = 10**9


class Charge(NamedTuple):
    """What *bytes* of usage cost: trial bytes spent, bytes paid for, nanocents charged."""

    trial_bytes: int
    paid_bytes: int
    nanocents: int


def charge(nbytes: int, trial_remaining: int, price_cents_per_gb: int) -> Charge:
    """Split *nbytes* between the trial (spent first) and the balance, and price the rest."""
    if nbytes < 0 or price_cents_per_gb < 0:
        raise ValueError("bytes and price must be >= 0")
    from_trial = min(nbytes, max(trial_remaining, 0))
    paid = nbytes - from_trial
    return Charge(from_trial, paid, paid * price_cents_per_gb)


def whole_cents(nanocents: int) -> int:
    """The whole cents in *nanocents*, rounded toward minus infinity (what can be spent)."""
    return nanocents // NANOCENTS_PER_CENT


def whole_cent_steps(balance_nanocents: int, amounts_nanocents: Sequence[int]) -> list[int]:
    """What each of the latest *amounts* (newest first) moved the whole-cent balance.

    The balance shows whole cents rounded down (:func:`whole_cents`), and so do the
    running totals behind the amounts: each one takes what it moved that figure, so
    amounts reaching back to the account's start add up to the balance shown::

        >>> whole_cent_steps(1_500_000_000, [-500_000_000, 2_000_000_000])
        [-1, 2]
    """
    running = balance_nanocents - sum(amounts_nanocents)  # before the oldest amount
    steps: list[int] = []
    for amount in reversed(amounts_nanocents):
        before, running = running, running + amount
        steps.append(whole_cents(running) - whole_cents(before))
    steps.reverse()
    return steps


def cents_to_nanocents(cents: int) -> int:
    """Cents as nanocents."""
    return cents * NANOCENTS_PER_CENT


def affordable_bytes(balance_nanocents: int, floor_nanocents: int, price_cents_per_gb: int) -> int:
    """How many paid bytes fit before the balance reaches *floor_nanocents* (may be negative)."""
    if price_cents_per_gb <= 0:
        return 1 << 62
    return max(0, (balance_nanocents - floor_nanocents) // price_cents_per_gb)
