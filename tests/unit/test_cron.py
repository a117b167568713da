"""Sources' cron schedules (issue 17): ``validate_cron`` and ``next_run``, in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datorus_core.envelope import DatorusError
from datorus_core.sources.schedule import next_run, validate_cron


def _at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "normal"),
    [
        ("* * * * *", "* * * * *"),
        ("*/30 * * * *", "*/30 * * * *"),
        ("\t0  3 * * 1-5 ", "0 3 * * 1-5"),
        ("0 0 1,15 * *", "0 0 1,15 * *"),
        ("15 10 * JAN-MAR mon,wed", "15 10 * JAN-MAR mon,wed"),
        ("0 0 29 2 *", "0 0 29 2 *"),  # leap days fire
        ("0 0 L * *", "0 0 L * *"),
    ],
)
def test_valid_schedules(expr, normal):
    assert validate_cron(expr) == normal


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        (None, "must be a cron expression"),
        (30, "must be a cron expression"),
        ("", "must be a cron expression"),
        ("   ", "must be a cron expression"),
        ("* * * *", "must have five fields"),
        ("0 * * * * *", "must have five fields"),  # seconds: not standard cron
        ("* * * * * 2030", "must have five fields"),
        ("@hourly", "must have five fields"),
        ("60 * * * *", "Bad minute"),
        ("* 24 * * *", "Bad hour"),
        ("* * 0 * *", "Bad day-of-month"),
        ("* * * 13 *", "Bad month"),
        ("* * * * 8", "Bad day-of-week"),
        ("*/0 * * * *", "Bad minute"),
        ("0 0 30 2 *", "Bad day-of-month"),  # never fires
        ("0 0 * * *\r\n", "printable"),
        ("* " * 100 + "*", "printable"),
        ("H * * * *", "Bad minute"),
    ],
)
def test_invalid_schedules_are_validation_errors(expr, reason):
    with pytest.raises(DatorusError) as e:
        validate_cron(expr)
    assert e.value.code == "VALIDATION_ERROR" and e.value.status == 400
    assert e.value.details is not None and e.value.details["field"] == "schedule"
    assert reason in e.value.details["reason"]


def test_the_field_can_be_named_as_the_caller_names_it():
    with pytest.raises(DatorusError) as e:
        validate_cron("nope", field="cron_schedule")
    assert e.value.details is not None and e.value.details["field"] == "cron_schedule"


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("*/30 * * * *", _at(2025, 1, 15, 10, 30), _at(2025, 1, 15, 11, 0)),
        ("*/30 * * * *", _at(2025, 1, 15, 10, 29, 59, 999999), _at(2025, 1, 15, 10, 30)),
        ("* * * * *", _at(2025, 1, 15, 10, 30, 0, 1), _at(2025, 1, 15, 10, 31)),
        ("0 0 1 * *", _at(2025, 12, 31, 23, 59), _at(2026, 1, 1)),
        ("0 0 29 2 *", _at(2025, 3, 1), _at(2028, 2, 29)),
        ("0 12 * * MON", _at(2025, 1, 15), _at(2025, 1, 20, 12)),  # a Wednesday
        ("0 0 13 * FRI", _at(2025, 1, 1), _at(2025, 1, 3)),  # cron's OR: the 13th or a Friday
    ],
)
def test_next_run_is_strictly_after(expr, after, expected):
    assert next_run(expr, after) == expected


def test_next_run_is_in_utc_whatever_zone_it_is_asked_in():
    tokyo = timezone(timedelta(hours=9))
    got = next_run("0 3 * * *", datetime(2025, 6, 1, 11, 0, tzinfo=tokyo))  # 02:00 UTC
    assert got == _at(2025, 6, 1, 3) and got.tzinfo == UTC


def test_next_run_needs_an_aware_time_and_a_valid_schedule():
    with pytest.raises(ValueError):
        next_run("* * * * *", datetime(2025, 1, 1))
    with pytest.raises(DatorusError):
        next_run("61 * * * *", _at(2025, 1, 1))


def test_missed_runs_are_not_replayed():
    # a scheduler that was away for a day asks with "now": one run, the next one
    assert next_run("*/5 * * * *", _at(2025, 1, 2, 0, 3)) == _at(2025, 1, 2, 0, 5)


aware = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1)).map(
    lambda d: d.replace(tzinfo=UTC)
)


@given(aware, st.integers(0, 59), st.integers(0, 23))
def test_a_daily_schedule_fires_once_within_a_day(after, minute, hour):
    got = next_run(f"{minute} {hour} * * *", after)
    assert (got.minute, got.hour, got.second, got.microsecond) == (minute, hour, 0, 0)
    assert timedelta(0) < got - after <= timedelta(days=1)


@given(aware, st.integers(1, 59))
def test_a_step_schedule_fires_on_its_next_multiple(after, step):
    got = next_run(f"*/{step} * * * *", after)
    assert got > after and got.minute % step == 0 and got.second == 0
    # no earlier whole minute in between matches
    m = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while m < got:
        assert m.minute % step != 0
        m += timedelta(minutes=1)
