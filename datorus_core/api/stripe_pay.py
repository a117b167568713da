"""Stripe top-ups: Checkout Sessions, charges of a saved card, and the webhook.

Money is credited exactly once per payment: the ledger transaction's ``external_id``
is ``stripe:<payment intent id>``, whichever path (the synchronous charge, a
``payment_intent.succeeded`` or a ``checkout.session.completed`` delivery, however
often repeated, or the payer's return from Checkout, :meth:`Payments.confirm_checkout`)
gets there first. Each webhook event id is also recorded in
``stripe_events`` in the same transaction as the credit. Every outbound write
carries an idempotency key. Blocking (HTTP to Stripe): call from worker threads.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

import stripe

from ..envelope import DatorusError, validation_error
from ..ledger import Ledger, accounts, money
from ..ledger import api as ledger_api
from ..settings import public_base
from .store import Store

log = logging.getLogger("datorus.stripe")

#: Stripe puts the Checkout Session's id in a return URL in place of this.
SESSION_PLACEHOLDER = "{CHECKOUT_SESSION_ID}"
SESSION_ID_RE = re.compile(r"cs_[A-Za-z0-9_]{1,250}")


class Payments:
    """The account's Stripe side, bound to one ledger and one Stripe key."""

    def __init__(self, store: Store, settings: dict[str, Any]) -> None:
        self.store = store
        self.settings = settings
        self._client: stripe.StripeClient | None = None

    # -- plumbing -------------------------------------------------------------------------

    @property
    def client(self) -> stripe.StripeClient:
        """The Stripe client; SERVICE_UNAVAILABLE when no key is configured."""
        if self._client is None:
            key = self.settings.get("stripe_api_key") or ""
            if not key:
                raise DatorusError(
                    "SERVICE_UNAVAILABLE",
                    message="Card payments are not configured on this Datorus.",
                    details={"reason": "stripe_api_key is not set"},
                    headers={"Retry-After": "3600"},
                )
            base = self.settings.get("stripe_api_base") or ""
            self._client = stripe.StripeClient(
                key,
                base_addresses={"api": base.rstrip("/")} if base else None,
                max_network_retries=2,
            )
        return self._client

    def _call(
        self,
        fn,
        params: dict[str, Any],
        idem: str | None = None,
        missing_field: str | None = None,
    ) -> Any:
        """One Stripe call with errors turned into envelopes.

        A 404 from Stripe means the client's *missing_field* names nothing (400), or,
        when the call names no client-given object, that Stripe lacks the feature (502).
        """
        try:
            options = {"idempotency_key": idem} if idem else None
            return fn(params=params, options=options) if options else fn(params=params)
        except stripe.CardError as e:
            err = e.error
            code = getattr(err, "code", None) or e.code
            if code == "authentication_required":
                pi = getattr(err, "payment_intent", None)
                raise DatorusError(
                    "STRIPE_3DS_REQUIRED",
                    details={"paymentIntentId": getattr(pi, "id", None)} if pi else None,
                ) from None
            decline = getattr(err, "decline_code", None) or code or "card_declined"
            raise DatorusError(
                "STRIPE_DECLINED", message=e.user_message or None, details={"declineCode": decline}
            ) from None
        except stripe.InvalidRequestError as e:
            if e.http_status == 404 and not missing_field:
                log.warning("datorus: Stripe has no such endpoint or object: %s", e)
                raise DatorusError(
                    "UPSTREAM_FAILED",
                    message="The payment provider does not support this request.",
                    details={"reason": "stripe answered 404"},
                ) from None
            field = e.param or missing_field or "body"
            raise validation_error(
                field, e.user_message or "refused by the payment provider"
            ) from None
        except stripe.AuthenticationError:
            raise DatorusError(
                "SERVICE_UNAVAILABLE",
                message="Card payments are misconfigured on this Datorus.",
                details={"reason": "Stripe rejected the API key"},
                headers={"Retry-After": "3600"},
            ) from None
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as e:
            log.warning("datorus: Stripe unavailable: %s", e)
            raise DatorusError(
                "UPSTREAM_FAILED", message="The payment provider is unavailable; retry shortly."
            ) from None
        except stripe.StripeError as e:
            log.warning("datorus: Stripe error: %s", e)
            raise DatorusError(
                "UPSTREAM_FAILED", message="The payment provider refused the request."
            ) from None

    def _metadata(self, account_id: int) -> dict[str, str]:
        return {"datorus_account": str(account_id), "datorus_ledger": self.store.ledger_id}

    def _idem(self, account_id: int, client_key: str | None, what: str) -> str:
        """Outbound idempotency key: the client's own (scoped to ledger and account) or fresh."""
        scope = f"datorus-{self.store.ledger_id}-{account_id}-{what}"
        return f"{scope}-{client_key}"[:255] if client_key else f"{scope}-{uuid.uuid4()}"

    def _customer(self, db: Ledger, account: dict[str, Any]) -> str:
        if account.get("stripe_customer_id"):
            return account["stripe_customer_id"]
        cus = self._call(
            self.client.v1.customers.create,
            {"email": account["email"], "metadata": self._metadata(account["id"])},
            f"datorus-customer-{self.store.ledger_id}-{account['id']}",
        )
        accounts.set_stripe_customer(db, account["id"], cus.id)
        account["stripe_customer_id"] = cus.id
        return cus.id

    # -- cards and charges ----------------------------------------------------------------

    def save_card(self, account: dict[str, Any], payment_method: str) -> dict[str, Any]:
        """Attach a payment method (made client-side by Stripe.js) as the account's card."""
        db = self.store.db()
        customer = self._customer(db, account)
        pm = self._call(
            lambda params, options=None: self.client.v1.payment_methods.attach(
                payment_method, params=params, options=options
            ),
            {"customer": customer},
            f"datorus-attach-{self.store.ledger_id}-{account['id']}-{payment_method}",
            missing_field="payment_method",
        )
        accounts.set_payment_method(db, account["id"], pm.id)
        card = getattr(pm, "card", None)
        return {
            "payment_method": pm.id,
            "brand": getattr(card, "brand", None),
            "last4": getattr(card, "last4", None),
        }

    def charge(
        self,
        account: dict[str, Any],
        cents: int,
        payment_method: str | None,
        client_key: str | None,
    ) -> dict[str, Any]:
        """Charge the saved card (or *payment_method*) off-session and credit the balance.

        A repeated *client_key* (the ``Idempotency-Key`` header) replays the first
        successful answer without charging again; Stripe itself sees the same
        outbound key, so even a retry racing the first request charges once.
        """
        client = self.client  # SERVICE_UNAVAILABLE first when Stripe is off
        db = self.store.db()
        if client_key:
            stored = ledger_api.stored_response(db, account["id"], client_key)
            if stored is not None:
                return {**json.loads(stored), "replayed": True}
        pm = payment_method or account.get("stripe_payment_method")
        if not pm:
            raise validation_error("payment_method", "no saved card: POST /account/cards first")
        customer = self._customer(db, account)
        currency = self.settings.get("stripe_currency") or "usd"
        intent = self._call(
            client.v1.payment_intents.create,
            {
                "amount": cents,
                "currency": currency,
                "customer": customer,
                "payment_method": pm,
                "confirm": True,
                "off_session": True,
                "metadata": self._metadata(account["id"]),
            },
            self._idem(account["id"], client_key, "charge"),
            missing_field="payment_method",
        )
        if intent.status == "requires_action":
            raise DatorusError("STRIPE_3DS_REQUIRED", details={"paymentIntentId": intent.id})
        if intent.status != "succeeded":
            err = getattr(intent, "last_payment_error", None)
            code = getattr(err, "decline_code", None) or getattr(err, "code", None)
            raise DatorusError("STRIPE_DECLINED", details={"declineCode": code or intent.status})
        applied = credit(db, account["id"], int(intent.amount), intent.id, "card top-up")
        acc = accounts.show_account(db, account["id"])
        result = {
            "payment_intent": intent.id,
            "status": intent.status,
            "amount_cents": int(intent.amount),
            "credited": applied,
            "balance_cents": acc["balanceCents"],
            "balance_nanocents": acc["balanceNanocents"],
        }
        if client_key:
            ledger_api.store_response(db, account["id"], client_key, json.dumps(result))
        return {**result, "replayed": False}

    def checkout(
        self,
        account: dict[str, Any],
        cents: int,
        client_key: str | None,
        success_url: str | None = None,
        cancel_url: str | None = None,
    ) -> dict:
        """A Checkout Session for *cents*, credited when it is paid: by the webhook or
        when the payer comes back (:meth:`confirm_checkout`), whichever is first.

        Stripe sends the payer back to *success_url* (with ``{CHECKOUT_SESSION_ID}``
        filled in) or *cancel_url*; the default is the web console, which confirms
        the session on return.
        """
        db = self.store.db()
        customer = self._customer(db, account)
        base = public_base(self.settings)
        meta = self._metadata(account["id"])
        session = self._call(
            self.client.v1.checkout.sessions.create,
            {
                "mode": "payment",
                "customer": customer,
                "client_reference_id": str(account["id"]),
                "line_items": [
                    {
                        "quantity": 1,
                        "price_data": {
                            "currency": self.settings.get("stripe_currency") or "usd",
                            "unit_amount": cents,
                            "product_data": {"name": "Datorus balance top-up"},
                        },
                    }
                ],
                "metadata": meta,
                "payment_intent_data": {"metadata": meta},
                "success_url": success_url
                or f"{base}/console?topup=success&session_id={SESSION_PLACEHOLDER}",
                "cancel_url": cancel_url or f"{base}/console?topup=cancel",
            },
            self._idem(account["id"], client_key, "checkout"),
        )
        return {"id": session.id, "url": session.url, "amount_cents": cents}

    def confirm_checkout(self, session_id: str, account_id: int | None) -> dict[str, Any]:
        """Ask Stripe (with the secret key) about Checkout Session *session_id* and, if
        it is paid, credit it to the account that opened it, once.

        Only the id comes from the payer's browser; whether it is paid, how much and
        for whom come from Stripe. The credit has the webhook's key (``stripe:`` and the
        PaymentIntent), so the two paths credit a payment once between them, on any
        number of workers and nodes. With *account_id*, a session another account
        opened (or another ledger) is 404 ``RESOURCE_NOT_FOUND``.
        """
        if not SESSION_ID_RE.fullmatch(session_id or ""):
            raise validation_error("session_id", "must be a Checkout Session id, cs_...")
        client = self.client  # SERVICE_UNAVAILABLE first when Stripe is off
        session = self._call(
            lambda params: client.v1.checkout.sessions.retrieve(session_id, params=params),
            {},
            missing_field="session_id",
        )
        obj = session.to_dict()
        meta = obj.get("metadata") or {}
        owner = str(meta.get("datorus_account", ""))
        if (
            meta.get("datorus_ledger") != self.store.ledger_id
            or not owner.isdigit()
            or (account_id is not None and int(owner) != account_id)
        ):
            raise DatorusError("RESOURCE_NOT_FOUND", details={"session_id": session_id})
        owner_id = int(owner)
        found = _payment_of("checkout.session.completed", obj)
        applied = False
        db = self.store.db()
        if found is not None:
            _, external, cents = found
            applied = credit(db, owner_id, cents, external, "Stripe Checkout (confirmed on return)")
        acc = accounts.show_account(db, owner_id)
        return {
            "id": obj["id"],
            "account_id": owner_id,
            "paid": found is not None,
            "payment_status": obj.get("payment_status"),
            "amount_cents": int(obj.get("amount_total") or 0),
            "credited": applied,
            "balance_cents": acc["balanceCents"],
        }

    # -- the webhook ----------------------------------------------------------------------

    def webhook(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        """Verify a delivery's ``Stripe-Signature`` and credit a succeeded payment once."""
        secret = self.settings.get("stripe_webhook_secret") or ""
        if not secret:
            raise DatorusError(
                "SERVICE_UNAVAILABLE",
                message="Stripe webhooks are not configured on this Datorus.",
                details={"reason": "stripe_webhook_secret is not set"},
                headers={"Retry-After": "3600"},
            )
        try:
            stripe.WebhookSignature.verify_header(
                payload.decode("utf-8"), signature or "", secret, tolerance=300
            )
            event = json.loads(payload)
            event_id, etype, obj = event["id"], event["type"], event["data"]["object"]
        except stripe.SignatureVerificationError:
            raise validation_error("Stripe-Signature", "signature verification failed") from None
        except (ValueError, KeyError, TypeError, UnicodeError):
            raise validation_error("body", "not a Stripe event") from None
        found = _payment_of(etype, obj)
        if found is None:
            return {"received": True, "credited": False, "reason": "ignored event type"}
        meta, external, cents = found
        if meta.get("datorus_ledger") != self.store.ledger_id:
            return {"received": True, "credited": False, "reason": "not for this ledger"}
        try:
            account_id = int(meta.get("datorus_account", ""))
        except ValueError:
            return {"received": True, "credited": False, "reason": "no account"}
        db = self.store.db()
        accounts.account_row(db, account_id)
        applied = credit(
            db, account_id, cents, external, f"Stripe {etype}", event_id=event_id, event_type=etype
        )
        return {"received": True, "credited": applied, "duplicate": not applied}


def _payment_of(etype: str, obj: dict[str, Any]) -> tuple[dict[str, Any], str, int] | None:
    """(metadata, payment id, cents) of an event that means money arrived, else None."""
    if etype == "payment_intent.succeeded":
        return (
            obj.get("metadata") or {},
            obj["id"],
            int(obj.get("amount_received") or obj["amount"]),
        )
    if etype in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        if obj.get("payment_status") != "paid":
            return None
        return (
            obj.get("metadata") or {},
            obj.get("payment_intent") or obj["id"],
            int(obj["amount_total"]),
        )
    return None


def credit(
    db: Ledger,
    account_id: int,
    cents: int,
    payment_id: str,
    reason: str,
    event_id: str | None = None,
    event_type: str | None = None,
) -> bool:
    """Credit *cents* for Stripe payment *payment_id* at most once; True if this call did.

    The event id (when given) is recorded in the same transaction as the credit.
    """
    if cents <= 0:
        return False
    return money.credit_payment(db, account_id, cents, payment_id, reason, event_id, event_type)
