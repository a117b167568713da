"""Sources' schedules: standard five-field cron expressions, evaluated in UTC.

Five fields (minute, hour, day of month, month, day of week) with Debian cron's meaning,
as ``cronsim`` evaluates them (names like ``MON`` and ``JAN``, ranges, steps, lists; a
day of month and a day of week that are both restricted match either, as in cron)::

    >>> validate_cron("  */30   *  * * * ")
    '*/30 * * * *'
    >>> next_run("*/30 * * * *", datetime(2025, 1, 15, 10, 30, tzinfo=UTC))
    datetime.datetime(2025, 1, 15, 11, 0, tzinfo=datetime.timezone.utc)
    >>> from datorus_core.envelope import DatorusError
    >>> try:
    ...     validate_cron("0 25 * * *")
    ... except DatorusError as e:
    ...     print(e.code, e.details["field"])
    VALIDATION_ERROR schedule

``next_run`` is strictly after the time given, so a scheduler that asks with the current
time skips every run it missed instead of replaying them in a burst.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cronsim import CronSim, CronSimError

from ..envelope import has_control, validation_error

MAX_CRON_CHARS = 200


def validate_cron(expr: object, field: str = "schedule") -> str:
    """*expr* with its fields separated by single spaces, if it is a five-field cron
    expression that names a date at all (not ``0 0 30 2 *``); else ``VALIDATION_ERROR``
    with ``details.field`` *field* (spaces and tabs separate fields, as in a crontab)."""
    if not isinstance(expr, str) or not expr.strip():
        raise validation_error(field, "must be a cron expression", "A cron schedule is required.")
    if len(expr) > MAX_CRON_CHARS or has_control(expr.replace("\t", " ")):
        raise validation_error(
            field,
            f"must be at most {MAX_CRON_CHARS} printable characters",
            "A cron schedule is a short line of printable characters.",
        )
    parts = expr.split()
    if len(parts) != 5:  # cronsim would also take a sixth field (seconds)
        raise validation_error(
            field,
            "must have five fields",
            "A cron schedule has five fields: minute hour day-of-month month day-of-week.",
        )
    normal = " ".join(parts)
    try:
        next(CronSim(normal, datetime(2000, 1, 1, tzinfo=UTC)))
    except CronSimError as e:
        raise validation_error(field, str(e), f"Invalid cron schedule: {e}.") from None
    except StopIteration:
        raise validation_error(
            field, "never fires", "This cron schedule never fires (no such date)."
        ) from None
    return normal


def next_run(expr: str, after: datetime) -> datetime:
    """The first time (UTC, whole minute) strictly after *after* that *expr* names.

    *after* must be timezone-aware. Raises ``VALIDATION_ERROR`` as ``validate_cron``
    does, or when the schedule fires no more (50 years on).
    """
    if after.tzinfo is None:
        raise ValueError("after must be timezone-aware")
    normal = validate_cron(expr)
    try:
        return next(CronSim(normal, after.astimezone(UTC)))
    except StopIteration:
        raise validation_error(
            "schedule", "never fires", "This cron schedule fires no more."
        ) from None
