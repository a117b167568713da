"""Request bodies of the REST API (pydantic); they also document it in ``/openapi.json``."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from ..ledger import EMAIL_RE

MIN_TOPUP_CENTS = 50  # Stripe's smallest USD charge
MAX_TOPUP_CENTS = 1_000_000


class RegisterIn(BaseModel):
    """``POST /auth/register``."""

    email: str = Field(max_length=254, examples=["user@example.com"])
    display_name: str | None = Field(default=None, max_length=100, examples=["Alice"])

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        v = v.strip()
        if not EMAIL_RE.match(v):
            raise ValueError("must be an email address")
        return v


class VerifyIn(BaseModel):
    """``POST /auth/verify``: the token from the verification mail."""

    token: str = Field(min_length=1, max_length=1000)


class KeyIn(BaseModel):
    """``POST /auth/keys``."""

    label: str | None = Field(default=None, max_length=100)


class CredentialIn(BaseModel):
    """``POST /account/credentials``."""

    label: str | None = Field(default=None, max_length=100)
    max_bytes: int | None = Field(default=None, ge=1, le=2**62, description="Byte cap.")


class CardIn(BaseModel):
    """``POST /account/cards``: a PaymentMethod id made client-side with Stripe.js."""

    payment_method: str = Field(pattern=r"^pm_[A-Za-z0-9_]{1,250}$", examples=["pm_card_visa"])


class TopupIn(BaseModel):
    """``POST /account/topups``: charge the saved card (or the given PaymentMethod)."""

    amount_cents: int = Field(ge=MIN_TOPUP_CENTS, le=MAX_TOPUP_CENTS)
    payment_method: str | None = Field(default=None, pattern=r"^pm_[A-Za-z0-9_]{1,250}$")


class CheckoutIn(BaseModel):
    """``POST /account/topups/checkout``: a Stripe Checkout Session for this amount."""

    amount_cents: int = Field(ge=MIN_TOPUP_CENTS, le=MAX_TOPUP_CENTS)
