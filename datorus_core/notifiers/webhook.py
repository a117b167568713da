"""The ``webhook`` notifier: a signed POST of the event's JSON.

Headers: ``Datorus-Signature: t=UNIX,v1=HEX(HMAC-SHA256(secret, "t.body"))``,
``Datorus-Event-Id`` (for de-duplication: a delivery may arrive more than once) and
``Datorus-Event-Type``. Any 2xx is delivered; anything else (a redirect too: redirects are
never followed) is a failure retried later. The receiver's address is the one the
acceptable-use policy allowed (the connection goes to the address checked, never to a
second lookup of the name).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import httpx

from ..events import signature_header
from . import Delivery, DeliveryError

MAX_URL = 2000


def check_url(url: str) -> str:
    """*url* if it is an absolute http(s) URL with a host and no credentials."""
    u = urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError("must be an absolute http(s) URL with a host")
    if u.username or u.password:
        raise ValueError("must not carry credentials")
    if len(url) > MAX_URL or any(ord(c) < 33 or ord(c) == 127 for c in url.strip()):
        raise ValueError("too long, or has spaces or control characters")
    u.port  # noqa: B018 - raises ValueError for a bad port
    return url.strip()


class WebhookNotifier:
    """POST each event, signed, to a URL."""

    name = "webhook"

    def check(self, target: str) -> str:
        """*target* as stored (an http(s) URL); ValueError otherwise."""
        return check_url(target)

    async def send(self, delivery: Delivery) -> None:
        """POST the event to the URL, at the address the policy allowed."""
        u = urlsplit(delivery.target)
        host = u.hostname or ""
        port = u.port or (443 if u.scheme == "https" else 80)
        address = await delivery.resolve(host, port)
        pinned = f"[{address}]" if ":" in address else address
        url = u._replace(netloc=f"{pinned}:{port}").geturl()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Datorus-Webhook/1",
            "Host": u.netloc,
            "Datorus-Event-Id": delivery.event["id"],
            "Datorus-Event-Type": delivery.event["type"],
        }
        if delivery.secret:
            headers["Datorus-Signature"] = signature_header(
                delivery.secret, delivery.body, int(time.time())
            )
        ext = {"sni_hostname": host} if u.scheme == "https" else {}
        try:
            async with httpx.AsyncClient(
                timeout=delivery.timeout, follow_redirects=False, trust_env=False
            ) as client:
                r = await client.post(url, content=delivery.body, headers=headers, extensions=ext)
        except httpx.TimeoutException:
            raise DeliveryError(f"no answer within {delivery.timeout:g} s") from None
        except httpx.HTTPError as e:
            raise DeliveryError(f"{type(e).__name__}: {e}"[:300]) from None
        if not 200 <= r.status_code < 300:
            what = "redirect (not followed)" if 300 <= r.status_code < 400 else "answered"
            raise DeliveryError(f"{what} {r.status_code}", r.status_code)
