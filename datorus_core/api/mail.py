"""Outgoing mail: every message is recorded in the ledger's ``outbox``; with an SMTP
host configured it is also delivered over SMTP (and marked sent or failed).

With no ``smtp_host`` the operator reads the outbox with ``datorus outbox``.
"""

from __future__ import annotations

import logging
import smtplib
from email.message import EmailMessage
from typing import Any

from ..ledger import Ledger
from ..ledger import api as ledger_api

log = logging.getLogger("datorus.mail")


def send(db: Ledger, settings: dict[str, Any], to: str, subject: str, body: str) -> int:
    """Record and (if configured) deliver one message; returns its outbox id.

    Blocking (SMTP): call it from a worker thread, never from the event loop.
    """
    outbox_id = ledger_api.add_outbox(db, to, subject, body)
    host = settings.get("smtp_host") or ""
    if not host:
        return outbox_id
    msg = EmailMessage()
    msg["From"] = settings.get("mail_from") or "datorus@localhost"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    try:
        with smtplib.SMTP(host, int(settings.get("smtp_port") or 25), timeout=10) as smtp:
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException) as e:
        log.warning("datorus: mail to %s not delivered: %s", to, e)
        ledger_api.outbox_failed(db, outbox_id, str(e)[:500])
    else:
        ledger_api.outbox_sent(db, outbox_id)
    return outbox_id


def list_outbox(db: Ledger, to: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest messages first (optionally only those to *to*)."""
    return [
        {
            "id": r["id"],
            "to": r["recipient"],
            "subject": r["subject"],
            "body": r["body"],
            "createdAt": r["created_at"],
            "sentAt": r["sent_at"],
            "error": r["error"],
        }
        for r in ledger_api.outbox(db, to, limit)
    ]
