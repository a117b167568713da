"""Request bodies of the REST API (pydantic); they also document it in ``/openapi.json``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from .. import leases
from ..egress import COUNTRY_PATTERN
from ..envelope import has_control
from ..ledger.accounts import EMAIL_RE


def _control_free(v: str | None) -> str | None:
    if v is not None and has_control(v):
        raise ValueError("must not contain control characters")
    return v


# free text a customer types: shown in the operator's tables and terminals, and in mail
Label = Annotated[str | None, Field(default=None, max_length=100), AfterValidator(_control_free)]


class Body(BaseModel):
    """A request body: a field of the wrong JSON type (``"no"`` for a boolean, ``"5"``
    for a number) or one the route does not know is 400 ``VALIDATION_ERROR`` with
    ``details.field``, never coerced or silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)


MIN_TOPUP_CENTS = 50  # Stripe's smallest USD charge
MAX_TOPUP_CENTS = 1_000_000


class RegisterIn(Body):
    """``POST /auth/register``."""

    email: str = Field(max_length=254, examples=["user@example.com"])
    display_name: Label = Field(default=None, examples=["Alice"])

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        v = v.strip()
        if not EMAIL_RE.fullmatch(v):
            raise ValueError("must be an email address")
        return v


class VerifyIn(Body):
    """``POST /auth/verify``: the token from the verification mail."""

    token: str = Field(min_length=1, max_length=1000)


class KeyIn(Body):
    """``POST /auth/keys``."""

    label: Label = None


class AcquireIn(Body):
    """``POST /proxies/acquire``: which egress to lease, and for how long (seed 002)."""

    protocol: Literal["direct", "http", "https", "socks4", "socks5"] | None = None
    country: str | None = Field(default=None, pattern=COUNTRY_PATTERN)
    anonymity: Literal["transparent", "anonymous", "elite"] | None = None
    min_score: float | None = Field(default=None, ge=0, le=1)
    lease_duration_seconds: int = Field(default=leases.DEFAULT_SECONDS, ge=1, le=leases.MAX_SECONDS)


class CredentialIn(Body):
    """``POST /account/credentials``."""

    label: Label = None
    max_bytes: int | None = Field(default=None, ge=1, le=2**62, description="Byte cap.")


class AllowedIpIn(Body):
    """``POST /account/credentials/{id}/allowed-ips``: a client CIDR that may connect
    without credentials, as this credential."""

    cidr: str = Field(max_length=64, examples=["203.0.113.0/24", "2001:db8::/48"])


class CardIn(Body):
    """``POST /account/cards``: a PaymentMethod id made client-side with Stripe.js."""

    payment_method: str = Field(pattern=r"^pm_[A-Za-z0-9_]{1,250}$", examples=["pm_card_visa"])


class TopupIn(Body):
    """``POST /account/topups``: charge the saved card (or the given PaymentMethod)."""

    amount_cents: int = Field(ge=MIN_TOPUP_CENTS, le=MAX_TOPUP_CENTS)
    payment_method: str | None = Field(default=None, pattern=r"^pm_[A-Za-z0-9_]{1,250}$")


class CheckoutIn(Body):
    """``POST /account/topups/checkout``: a Stripe Checkout Session for this amount."""

    amount_cents: int = Field(ge=MIN_TOPUP_CENTS, le=MAX_TOPUP_CENTS)


class ErrorBody(BaseModel):
    """The inside of every error envelope."""

    code: str = Field(examples=["VALIDATION_ERROR"], description="One of the 18 codes.")
    message: str = Field(examples=["The submitted data is invalid."])
    details: dict[str, Any] | None = Field(examples=[{"field": "email", "reason": "..."}])
    requestId: str = Field(description="Equals the X-Datorus-Request-Id header.")  # noqa: N815
    timestamp: str = Field(examples=["2026-05-19T14:32:18Z"])


class ErrorEnvelope(BaseModel):
    """Every error the API answers: ``{"error": {...}}``."""

    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorEnvelope, "description": "VALIDATION_ERROR or TOKEN_INVALID"},
    401: {"model": ErrorEnvelope, "description": "INVALID_CREDENTIAL: missing or wrong API key"},
    404: {"model": ErrorEnvelope, "description": "RESOURCE_NOT_FOUND"},
    503: {"model": ErrorEnvelope, "description": "SERVICE_UNAVAILABLE"},
}
