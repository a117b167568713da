"""``router_seed``: the egress router's random choices can be repeated (for tests)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from addons.egress import EgressRouter
from datorus_core import egress as eg
from datorus_core.egress_status import Health
from datorus_core.settings import BY_NAME, SettingsError, coerce

ACTIVE = Health("active")  # checked and passing: the pool may choose it


def router(seed: int) -> EgressRouter:
    """A router over four source addresses, configured as mitmproxy would at start-up."""
    gw = SimpleNamespace(settings={"router_seed": seed})
    r = EgressRouter(gw)  # type: ignore[arg-type]
    r.configure({"datorus_router_seed"})
    r.pool.replace(
        [
            eg.Egress(i, eg.parse_egress_url(f"direct://127.0.0.{i}"), health=ACTIVE)
            for i in range(2, 6)
        ]
    )
    return r


def picks(r: EgressRouter, n: int = 50) -> list[int]:
    return [r.pool.pick("example.com", None, 0.0, r.rng).id for _ in range(n)]


def test_a_seed_repeats_the_picks():
    a, b = router(7), router(7)
    assert picks(a) == picks(b)
    assert len(set(picks(a))) == 4  # still a spread over the pool, not one fixed egress
    assert picks(router(8)) != picks(router(7))
    # and the same as the pure pick driven by random.Random(seed)
    rng = random.Random(7)
    pool = router(7).pool
    assert picks(router(7)) == [pool.pick("example.com", None, 0.0, rng).id for _ in range(50)]


def test_prefix_addresses_without_a_session_follow_the_seed():
    spec = eg.parse_egress_url("direct://2001:db8::/64")
    a, b = router(3), router(3)
    assert [eg.source_for(spec, None, a.rng) for _ in range(5)] == [
        eg.source_for(spec, None, b.rng) for _ in range(5)
    ]


def test_seed_zero_is_the_systems_randomness():
    # two unseeded routers agreeing on 64 random bits would be a 2**-64 accident
    assert router(0).rng.getrandbits(64) != router(0).rng.getrandbits(64)


def test_router_seed_setting_is_validated():
    assert BY_NAME["router_seed"].default == 0
    assert coerce(BY_NAME["router_seed"], "12345") == 12345
    with pytest.raises(SettingsError, match="datorus_router_seed"):
        coerce(BY_NAME["router_seed"], "-1")
    with pytest.raises(SettingsError, match="datorus_router_seed"):
        coerce(BY_NAME["router_seed"], "x")
