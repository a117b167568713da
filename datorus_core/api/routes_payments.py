"""Stripe top-ups: save a card, charge it, open a Checkout Session; and the webhook."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request

from .deps import Account, State
from .models import CardIn, CheckoutIn, TopupIn

router = APIRouter()
IdemKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Repeat a top-up safely: the same key never charges twice.",
    ),
]


@router.post("/account/cards", status_code=201, tags=["payments"])
def save_card(body: CardIn, acc: Account, st: State) -> Any:
    """Save a card (a PaymentMethod made with Stripe.js) for direct top-ups.

    402 ``STRIPE_DECLINED`` (with ``details.declineCode``) if Stripe refuses it.
    """
    return st.payments.save_card(acc, body.payment_method)


@router.post("/account/topups", status_code=201, tags=["payments"])
def topup(body: TopupIn, acc: Account, st: State, idempotency_key: IdemKey = None) -> Any:
    """Charge the saved card and credit the balance at once.

    402 ``STRIPE_DECLINED`` with ``details.declineCode``; 402 ``STRIPE_3DS_REQUIRED``
    when the card needs authentication (use Checkout instead).
    """
    return st.payments.charge(acc, body.amount_cents, body.payment_method, idempotency_key)


@router.post("/account/topups/checkout", status_code=201, tags=["payments"])
def checkout(body: CheckoutIn, acc: Account, st: State, idempotency_key: IdemKey = None) -> Any:
    """A Stripe Checkout Session for the amount: pay at ``url``; credited when Stripe's
    webhook arrives or the payer comes back (``GET /account/topups/checkout/{id}``)."""
    return st.payments.checkout(acc, body.amount_cents, idempotency_key)


@router.get("/account/topups/checkout/{session_id}", tags=["payments"])
def confirm_checkout(session_id: str, acc: Account, st: State) -> Any:
    """Ask Stripe about one of your Checkout Sessions and credit it now if it is paid.

    Credited once whichever of this and the webhook comes first (``credited`` says
    whether this call did); 404 ``RESOURCE_NOT_FOUND`` for another account's session.
    """
    return st.payments.confirm_checkout(session_id, acc["id"])


@router.post("/stripe/webhook", tags=["payments"], include_in_schema=True)
async def webhook(
    request: Request,
    st: State,
    stripe_signature: Annotated[str | None, Header(alias="Stripe-Signature")] = None,
) -> Any:
    """Stripe's event deliveries, verified by ``Stripe-Signature``; credits exactly once."""
    from starlette.concurrency import run_in_threadpool

    payload = await request.body()
    return await run_in_threadpool(st.payments.webhook, payload, stripe_signature)
