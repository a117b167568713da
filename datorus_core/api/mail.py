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

log = logging.getLogger("datorus.mail")


def send(db: Ledger, settings: dict[str, Any], to: str, subject: str, body: str) -> int:
    """Record and (if configured) deliver one message; returns its outbox id.

    Blocking (SMTP): call it from a worker thread, never from the event loop.
    """
    cur = db.conn.execute(
        "INSERT INTO outbox (recipient, subject, body) VALUES (?, ?, ?)", (to, subject, body)
    )
    outbox_id = int(cur.lastrowid or 0)
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
        db.conn.execute("UPDATE outbox SET error = ? WHERE id = ?", (str(e)[:500], outbox_id))
    else:
        db.conn.execute(
            "UPDATE outbox SET sent_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE id = ?",
            (outbox_id,),
        )
    return outbox_id


def list_outbox(db: Ledger, to: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest messages first (optionally only those to *to*)."""
    sql = "SELECT id, recipient, subject, body, created_at, sent_at, error FROM outbox"
    args: list[Any] = []
    if to:
        sql += " WHERE recipient = ? COLLATE NOCASE"
        args.append(to)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
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
        for r in db.query(sql, args)
    ]
