"""The ``smtp`` notifier: one mail per event to an address, through ``smtp_host``.

The mail server is the operator's own (``smtp_host``/``smtp_port``, as for sign-up
mail); with no ``smtp_host`` set a delivery fails, saying so, and is retried (the
operator sees it in ``datorus notifier list`` and ``/stats/plugins``).
"""

from __future__ import annotations

import asyncio
import json
import smtplib
from email.message import EmailMessage

from . import Delivery, DeliveryError


def check_address(target: str) -> str:
    """*target* if it looks like one email address."""
    t = target.strip()
    local, at, domain = t.partition("@")
    if not at or not local or "." not in domain or any(c in t for c in " \r\n,;<>"):
        raise ValueError("must be one email address, like ops@example.com")
    return t


class SmtpNotifier:
    """Mail each event to an address."""

    name = "smtp"

    def check(self, target: str) -> str:
        """*target* as stored (an email address); ValueError otherwise."""
        return check_address(target)

    async def send(self, delivery: Delivery) -> None:
        """Send the mail (in a worker thread: smtplib blocks)."""
        s = delivery.settings
        host = s.get("smtp_host") or ""
        if not host:
            raise DeliveryError("no smtp_host is set")
        event = delivery.event
        msg = EmailMessage()
        msg["From"] = s.get("mail_from") or "datorus@localhost"
        msg["To"] = delivery.target
        msg["Subject"] = f"[Datorus] {event['type']}"
        msg["Datorus-Event-Id"] = event["id"]
        msg.set_content(
            f"{event['type']} at {event['created_at']}\n\n"
            + json.dumps(event["data"], indent=2, sort_keys=True)
            + f"\n\nEvent id: {event['id']}\n"
        )
        port = int(s.get("smtp_port") or 25)

        def deliver() -> None:  # the operator's own mail server: no policy check
            with smtplib.SMTP(host, port, timeout=delivery.timeout) as smtp:
                smtp.send_message(msg)

        try:
            await asyncio.to_thread(deliver)
        except (OSError, smtplib.SMTPException) as e:
            raise DeliveryError(f"{type(e).__name__}: {e}"[:300]) from None
