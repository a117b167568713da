"""Assertions the e2e tests share: the canonical envelope and raw requests."""

from __future__ import annotations

import json
import math
import re

from support.clients import raw_connection, read_response

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def assert_envelope(status: int, headers, body: bytes, code: str, expect_status: int) -> dict:
    """The canonical envelope, with the header/body request ids agreeing."""
    assert status == expect_status, body
    h = {k.lower(): v for k, v in dict(headers).items()}
    assert h["content-type"] == "application/json"
    env = json.loads(body)
    err = env["error"]
    assert set(err) == {"code", "message", "details", "requestId", "timestamp"}
    assert err["code"] == code
    assert UUID_RE.fullmatch(err["requestId"])
    assert TS_RE.fullmatch(err["timestamp"])
    assert h["x-datorus-request-id"] == err["requestId"]
    assert f'details="{code}"' in h["proxy-status"]
    return err


def raw_request(port: int, req: bytes) -> tuple[int, dict, bytes]:
    with raw_connection(port) as s:
        s.sendall(req)
        return read_response(s)


def assert_rate_headers(headers, sent: float, received: float, rate: int, burst: int) -> int:
    """The ``X-Datorus-RateLimit-*`` headers of a response to a request sent at Unix time
    *sent* and answered by *received*, for a credential limited to *rate* / *burst*.

    Remaining is what is left of the burst after this request (0 when refused by the
    limiter, the whole burst when refused before it took anything); Reset is
    when the bucket is full again, so it lies ``(burst - remaining - 1) / rate`` to
    ``(burst - remaining) / rate`` seconds after the moment the gateway answered, which
    was between *sent* and *received*. Returns Remaining.
    """
    h = {k.lower(): v for k, v in dict(headers).items()}
    assert h["x-datorus-ratelimit-limit"] == str(rate)
    remaining = int(h["x-datorus-ratelimit-remaining"])
    assert 0 <= remaining <= burst
    reset = int(h["x-datorus-ratelimit-reset"])
    lo = math.floor(sent + (burst - remaining - 1) / rate)
    hi = math.ceil(received + (burst - remaining + 0.01) / rate)
    assert lo <= reset <= hi, (remaining, reset, sent, received)
    return remaining
