"""What a source says, validated: the fields of ``POST``/``PATCH /sources`` and of
``datorus source add``, checked once for the API and the CLI alike.

Each check returns the value as it is stored, or raises ``VALIDATION_ERROR`` whose
``details.field`` is the API body's name for the field::

    >>> check_url(" https://lists.example/proxies.txt ")
    'https://lists.example/proxies.txt'
    >>> check_country("de"), check_tags({"provider": "dc"})
    ('DE', {'provider': 'dc'})
    >>> from datorus_core.envelope import DatorusError
    >>> try:
    ...     check_cron("*/5 * * *")
    ... except DatorusError as e:
    ...     print(e.details["field"], "-", e.details["reason"])
    cron_schedule - must have five fields

A source's URL is the operator's (only operator keys reach ``/sources``) and is fetched
by the gateway for itself, not for a customer: the acceptable-use policy, which guards
what customers reach, does not apply to it (a list on the loopback or the LAN is fine);
it must be ``http://`` or ``https://``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from ..egress import COUNTRY_RE
from ..envelope import has_control, validation_error
from .found import PROTOCOLS
from .registry import ParserRegistry, installed_parsers
from .schedule import next_run, validate_cron

MAX_URL_CHARS = 2048
MAX_NAME_CHARS = 100
MAX_WEIGHT = 1000
MAX_TAGS = 20
MAX_TAG_VALUE_CHARS = 200
_TAG_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_url(url: object) -> str:
    """An ``http(s)://`` URL with a host, at most 2048 printable characters."""
    if not isinstance(url, str) or not url.strip():
        raise validation_error("url", "must be an http:// or https:// URL")
    url = url.strip()
    if len(url) > MAX_URL_CHARS or has_control(url) or " " in url:
        raise validation_error("url", f"must be at most {MAX_URL_CHARS} printable characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        raise validation_error("url", "is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise validation_error("url", "must be an http:// or https:// URL with a host")
    return url


def check_name(name: object) -> str | None:
    """An optional label: at most 100 printable characters (blank: none)."""
    if name is None:
        return None
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or has_control(name):
        raise validation_error(
            "name", f"must be at most {MAX_NAME_CHARS} characters, no control characters"
        )
    return name.strip() or None


def check_protocol(protocol: object) -> str:
    """The protocol of entries that do not name theirs: http, https, socks4 or socks5."""
    if not isinstance(protocol, str) or protocol.lower() not in PROTOCOLS:
        raise validation_error("default_protocol", "must be http, https, socks4 or socks5")
    return protocol.lower()


def check_country(country: object) -> str | None:
    """An optional ISO 3166-1 alpha-2 code, upper case."""
    if country is None:
        return None
    if not isinstance(country, str) or not COUNTRY_RE.fullmatch(country):
        raise validation_error("default_country", "must be a two-letter country code")
    return country.upper()


def check_weight(weight: object) -> int:
    """The share of traffic each found proxy gets: 1-1000."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise validation_error("default_weight", f"must be a whole number 1-{MAX_WEIGHT}")
    return weight


def check_tags(tags: object) -> dict[str, str]:
    """At most 20 ``name: text`` pairs (names of letters, digits, ``_ . -``)."""
    if tags is None:
        return {}
    if not isinstance(tags, Mapping) or len(tags) > MAX_TAGS:
        raise validation_error("tags", f"must be an object of at most {MAX_TAGS} tags")
    out: dict[str, str] = {}
    for k, v in tags.items():
        if not isinstance(k, str) or not _TAG_KEY.fullmatch(k):
            raise validation_error("tags", "a tag's name is 1-64 of A-Z a-z 0-9 _ . -")
        if not isinstance(v, str) or len(v) > MAX_TAG_VALUE_CHARS or has_control(v):
            raise validation_error(
                "tags", f"a tag's value is text of at most {MAX_TAG_VALUE_CHARS} characters"
            )
        out[k] = v
    return out


def check_cron(expr: object) -> str | None:
    """An optional five-field cron expression (None or blank: not scheduled)."""
    if expr is None or (isinstance(expr, str) and not expr.strip()):
        return None
    return validate_cron(expr, "cron_schedule")


def check_parser(name: object, registry: ParserRegistry | None = None) -> str | None:
    """An optional parser name that is installed (None: pick one from the content)."""
    if name is None:
        return None
    reg = registry or installed_parsers()
    if not isinstance(name, str) or has_control(name) or reg.get(name) is None:
        raise validation_error(
            "parser_name",
            "no parser of this name is installed",
            f"Unknown parser; installed: {', '.join(reg.names()) or 'none'}.",
        )
    return name


def next_run_at(cron: str | None, now: float, test_seconds: int = 0) -> int | None:
    """When a source with schedule *cron* runs next after *now* (Unix seconds), or None.

    *test_seconds* > 0 (the test-only ``test_schedule_seconds`` setting) replaces every
    schedule by "every *test_seconds* seconds"::

        >>> next_run_at("*/30 * * * *", 1736937000.0)   # 2025-01-15 10:30:00 UTC
        1736938800
        >>> next_run_at("*/30 * * * *", 1736937000.0, test_seconds=2), next_run_at(None, 0.0)
        (1736937002, None)
    """
    if cron is None:
        return None
    if test_seconds > 0:
        return int(now) + test_seconds
    return int(next_run(cron, datetime.fromtimestamp(now, UTC)).timestamp())


def check_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of *body* that a source has, checked (a partial body for PATCH).

    Unknown names are ignored (the API's models refuse them first).
    """
    checks = {
        "url": check_url,
        "name": check_name,
        "parser_name": check_parser,
        "cron_schedule": check_cron,
        "default_protocol": check_protocol,
        "default_country": check_country,
        "default_weight": check_weight,
        "tags": check_tags,
    }
    out = {k: check(body[k]) for k, check in checks.items() if k in body}
    if "is_active" in body:
        out["enabled"] = bool(body["is_active"])
    return out
