"""Low-balance alerts and auto-recharge, checked in the background (issue 18).

:func:`check` runs every few seconds in a worker thread of each gateway (never on the
request path): accounts below their low mark get ``credits.low`` (once per top-up,
mailed to the account's email unless it opted out), and accounts below their
auto-recharge threshold get their saved card charged once per crossing. A crossing is
named by the account's newest top-up, claimed in the ledger (one gateway wins it) and
sent to Stripe with that name in the idempotency key, so however many workers or nodes
see one dip, it is charged once. A decline is ``credits.recharge_failed`` (with the
``STRIPE_DECLINED`` code and Stripe's decline code), and that crossing is not tried
again: the next top-up starts a new one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..envelope import DatorusError
from ..ledger import accounts
from ..ledger import events as ledger_events
from . import mail
from .store import Store
from .stripe_pay import Payments

log = logging.getLogger("datorus.alerts")


class Alerts:
    """The alert checks over one ledger (connections per thread, as the API's)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.store = Store(settings["db"])
        self.payments = Payments(self.store, settings)

    def check(self) -> None:
        """One pass: low-balance events and mail, then due recharges. Blocking."""
        db = self.store.db()
        for row in ledger_events.low_balances(db):
            if ledger_events.emit_low(db, row) and row["mail_low"]:
                cents = row["nanocents"] // ledger_events.NANO
                mail.send(
                    db,
                    self.settings,
                    row["email"],
                    "Your Datorus balance is low",
                    f"Your balance is {cents} cents, below the {row['low_cents']} cents you"
                    " asked to be told about. Top up to keep your traffic flowing.\n",
                )
        now = int(time.time())
        for row in ledger_events.due_recharges(db):
            aid = row["account_id"]
            key = ledger_events.claim_recharge(db, aid, now)
            if key is not None:
                self._recharge(aid, int(row["recharge_amount_cents"]), key)

    def _recharge(self, account_id: int, cents: int, key: str) -> None:
        db = self.store.db()
        try:
            account = accounts.account_row(db, account_id)
            self.payments.charge(account, cents, None, client_key=key)
        except DatorusError as e:
            if e.code not in ("STRIPE_DECLINED", "STRIPE_3DS_REQUIRED", "VALIDATION_ERROR"):
                # Stripe unreachable or misconfigured: the claim lapses and the same
                # charge (same idempotency key) is tried again
                log.warning("datorus: auto-recharge of account %s not made: %s", account_id, e)
                return
            details = {"account_id": account_id, "amount_cents": cents, "code": e.code}
            # event data is snake_case throughout (the envelope's details are camelCase)
            details.update({snake_case(k): v for k, v in (e.details or {}).items()})
            if ledger_events.emit_now(
                db, "credits.recharge_failed", account_id, details, dedupe=f"failed:{key}"
            ):
                self._mail_declined(account, cents, e)
            ledger_events.finish_recharge(db, key, "declined")
            return
        ledger_events.finish_recharge(db, key, "charged")

    def _mail_declined(self, account: dict[str, Any], cents: int, err: DatorusError) -> None:
        """Tell the account's owner the recharge failed (a payment notice: sent whatever the
        low-balance mail choice, as a card issuer's would be)."""
        why = (err.details or {}).get("declineCode") or err.message
        mail.send(
            self.store.db(),
            self.settings,
            account["email"],
            "Your Datorus auto-recharge was declined",
            f"We tried to charge your saved card {cents} cents because your balance fell"
            f" below your auto-recharge threshold, and the charge failed ({why}). Your"
            " traffic stops when the balance runs out: update the card or top up in the"
            " console. We try again after your next top-up.\n",
        )


def snake_case(key: str) -> str:
    """*key* in snake_case.

    >>> snake_case("declineCode"), snake_case("amount_cents")
    ('decline_code', 'amount_cents')
    """
    return "".join("_" + c.lower() if c.isupper() else c for c in key).lstrip("_")
