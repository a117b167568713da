"""The REST API's throttle (datorus_core.api.throttle): rules from settings, GCRA per key."""

from __future__ import annotations

import pytest

from datorus_core.api.throttle import ApiThrottle, rules_from
from datorus_core.settings import BY_NAME, SettingsError, coerce


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rules_follow_the_settings_and_default_generously() -> None:
    rules = rules_from({})
    assert (rules["key"].count, rules["key"].burst, rules["key"].window) == (50, 100, 1.0)
    assert (rules["signup"].count, rules["signup"].window) == (60, 3600.0)
    assert rules["key_fail"].count == 20 and rules["resend"].count == 10
    assert rules_from({"api_signups_per_hour": 3})["signup"].burst == 3


def test_each_key_has_its_own_bucket_and_refusals_say_when_to_return() -> None:
    clock = Clock()
    t = ApiThrottle(rules_from({"api_signups_per_hour": 2}), clock=clock)
    assert [t.take("signup", "10.0.0.1").remaining for _ in range(2)] == [1, 0]
    v = t.take("signup", "10.0.0.1")
    assert not v.allowed and v.retry_after_seconds == 1800
    assert t.take("signup", "10.0.0.2").allowed  # another address
    err = t.refusal("signup", v)
    assert (err.status, err.code) == (429, "RATE_LIMITED")
    assert err.headers == {
        "Retry-After": "1800",
        "X-RateLimit-Limit": "2",
        "X-RateLimit-Remaining": "0",
    }
    clock.now += 1800
    assert t.take("signup", "10.0.0.1").allowed


def test_a_full_table_forgets_idle_buckets_first() -> None:
    clock = Clock()
    t = ApiThrottle(rules_from({"api_key_rps": 1, "api_key_burst": 2}), clock=clock, max_tracked=3)
    t.take("key", "busy")
    t.take("key", "busy")
    clock.now += 5
    t.take("key", "idle1")
    clock.now += 5  # idle1 is full again, busy too
    t.take("key", "busy")
    t.take("key", "busy")
    t.take("key", "x")
    t.take("key", "y")  # the table is full: the idle buckets go, the busy one stays
    assert not t.take("key", "busy").allowed


@pytest.mark.parametrize(
    "name", ["api_key_rps", "api_key_burst", "api_signups_per_hour", "max_fetch_timeout"]
)
def test_a_bad_value_names_the_setting(name: str) -> None:
    with pytest.raises(SettingsError, match=f"datorus_{name}"):
        coerce(BY_NAME[name], "0")
