"""The canonical error envelope and the registry of Datorus's 18 error codes.

This module is the single place that knows every code, its HTTP status, its
English message and its RFC 9209 ``Proxy-Status`` error type. The gateway, the
REST API and the CLI's ``--json`` mode all build their errors here::

    >>> err = DatorusError("RATE_LIMITED", headers={"Retry-After": "1"})
    >>> err.status
    429
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .clock import iso_utc


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One entry of the registry: a machine code that never changes."""

    code: str
    status: int
    message: str
    proxy_status: str  # RFC 9209 error type, or "" where none fits


_REGISTRY = (
    ErrorCode("VALIDATION_ERROR", 400, "The submitted data is invalid.", "http_request_error"),
    ErrorCode("TOKEN_INVALID", 400, "The token is invalid.", ""),
    ErrorCode("TOKEN_EXPIRED", 410, "The token has expired.", ""),
    ErrorCode("TOKEN_USED", 409, "The token was already used.", ""),
    ErrorCode(
        "INSUFFICIENT_BALANCE",
        402,
        "Your balance is too low to complete this request.",
        "http_request_denied",
    ),
    ErrorCode("TRIAL_EXHAUSTED", 402, "Your free trial is used up.", "http_request_denied"),
    ErrorCode("STRIPE_DECLINED", 402, "The card was declined.", ""),
    ErrorCode("STRIPE_3DS_REQUIRED", 402, "Card authentication is required.", ""),
    ErrorCode(
        "AUP_VIOLATION",
        403,
        "This request violates the Acceptable Use Policy.",
        "destination_ip_prohibited",
    ),
    ErrorCode("ACCOUNT_SUSPENDED", 403, "This account is suspended.", "http_request_denied"),
    ErrorCode("RESOURCE_NOT_FOUND", 404, "The requested resource was not found.", ""),
    ErrorCode("INVALID_CREDENTIAL", 407, "Invalid proxy credentials.", "http_request_denied"),
    ErrorCode("EMAIL_TAKEN", 409, "An account with this email already exists.", ""),
    ErrorCode("EMAIL_PROVIDER_MISMATCH", 409, "This email uses a social-login provider.", ""),
    ErrorCode("RATE_LIMITED", 429, "Too many requests.", "http_request_denied"),
    ErrorCode(
        "UPSTREAM_FAILED", 502, "The upstream destination failed.", "destination_unavailable"
    ),
    ErrorCode(
        "SERVICE_UNAVAILABLE",
        503,
        "The service is temporarily unavailable.",
        "proxy_internal_error",
    ),
    ErrorCode("GATEWAY_TIMEOUT", 504, "The upstream destination timed out.", "connection_timeout"),
)

CODES: dict[str, ErrorCode] = {e.code: e for e in _REGISTRY}
assert len(CODES) == 18


# the project's one time formatter (kept under this name for the gateway's receipts)
utc_timestamp = iso_utc


def new_request_id() -> str:
    """A fresh request id: a UUIDv7 (RFC 9562), 48 bits of Unix milliseconds, 74 random.

    Time-ordered ids keep the ledger's receipts primary-key index growing at its end:
    with random (v4) ids its inserts scatter, and the usage writer slowed from about
    19,000 to 10,000 events/s once 300,000 receipts were written (``scripts/bench``).
    """
    value = (time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF) << 80
    value |= int.from_bytes(os.urandom(10), "big") & ~(0xF << 76 | 0x3 << 62)
    return str(uuid.UUID(int=value | 0x7 << 76 | 0x2 << 62))


def request_id_floor(unix_ms: int) -> str:
    """The smallest request id (UUIDv7) of Unix millisecond *unix_ms* and later.

    UUIDv7's text form sorts as its time: ``request_id < request_id_floor(t)`` holds
    exactly for the ids made before *t*. The receipts table is clustered by request id,
    so pruning by this bound needs no index of its own.
    """
    h = f"{unix_ms & 0xFFFF_FFFF_FFFF:012x}"
    return f"{h[:8]}-{h[8:]}-"


class DatorusError(Exception):
    """An error that leaves Datorus as the canonical envelope.

    ``code`` must be one of the 18 registered codes; ``details`` is any JSON
    object (or None); ``headers`` are extra response headers (Retry-After...).
    """

    def __init__(
        self,
        code: str,
        message: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.entry = CODES[code]
        self.message = message or self.entry.message
        self.details = details
        self.headers = dict(headers or {})
        super().__init__(f"{code}: {self.message}")

    @property
    def status(self) -> int:
        """The HTTP status of this error's code."""
        return self.entry.status

    def envelope(self, request_id: str | None = None) -> dict[str, Any]:
        """The envelope as a JSON-ready dict."""
        return envelope(self.code, request_id, self.details, self.message)


def validation_error(field: str, reason: str, message: str | None = None) -> DatorusError:
    """``VALIDATION_ERROR`` naming the bad *field* and why (the CLI, the API and the
    ledger all report bad input this way)::

        >>> validation_error("cents", "must be > 0").details
        {'field': 'cents', 'reason': 'must be > 0'}
    """
    return DatorusError(
        "VALIDATION_ERROR", message=message, details={"field": field, "reason": reason}
    )


def envelope(
    code: str,
    request_id: str | None = None,
    details: dict[str, Any] | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """Build the envelope dict for *code*; a request id is made when none is given."""
    entry = CODES[code]
    return {
        "error": {
            "code": code,
            "message": message or entry.message,
            "details": details,
            "requestId": request_id or new_request_id(),
            "timestamp": utc_timestamp(),
        }
    }


def envelope_json(
    code: str,
    request_id: str | None = None,
    details: dict[str, Any] | None = None,
    message: str | None = None,
) -> bytes:
    """The envelope serialised as compact UTF-8 JSON bytes."""
    return json.dumps(envelope(code, request_id, details, message), separators=(",", ":")).encode()


def proxy_status(code: str) -> str:
    """The RFC 9209 ``Proxy-Status`` value that names *code* for clients that drop bodies."""
    kind = CODES[code].proxy_status or "proxy_internal_error"
    return f'datorus; error={kind}; details="{code}"'


def has_control(text: str) -> bool:
    """Whether *text* holds a C0 or C1 control character (CR, LF, ESC, NUL, DEL...)."""
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def control_free(field: str, value: str | None) -> str | None:
    r"""*value* unchanged when it holds no control character (CR, LF, ESC, NUL...), else a
    ``VALIDATION_ERROR`` naming *field*: free text a customer or operator types (labels,
    reasons, names) is shown in tables, terminals and mail, never as raw control bytes.

    >>> control_free("label", "office laptop")
    'office laptop'
    >>> try:
    ...     control_free("label", "x\r\nInjected")
    ... except DatorusError as e:
    ...     print(e.code, e.details)
    VALIDATION_ERROR {'field': 'label', 'reason': 'must not contain control characters'}
    """
    if value is not None and has_control(value):
        raise DatorusError(
            "VALIDATION_ERROR",
            details={"field": field, "reason": "must not contain control characters"},
        )
    return value
