"""The ``webhook`` notifier: a signed POST of the event's JSON.

Headers: ``Datorus-Signature: t=UNIX,v1=HEX(HMAC-SHA256(secret, "t.body"))``,
``Datorus-Event-Id`` (for de-duplication: a delivery may arrive more than once) and
``Datorus-Event-Type``. Any 2xx is delivered; anything else (a redirect too: redirects are
never followed) is a failure retried later. The receiver's address is the one the
acceptable-use policy allowed (the connection goes to the address checked, never to a
second lookup of the name).
"""

from __future__ import annotations

import asyncio
import time
import weakref
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

    def __init__(self) -> None:
        # one client (its connection pool, its TLS context) per event loop: making one per
        # delivery costs milliseconds of CPU (the CA bundle is read each time)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._clients = weakref.WeakKeyDictionary()

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            )
            self._clients[loop] = client
        return client

    def check(self, target: str) -> str:
        """*target* as stored (an http(s) URL); ValueError otherwise."""
        return check_url(target)

    async def send(self, delivery: Delivery) -> int:
        """POST the event to the URL, at the address the policy allowed; the receiver's
        (2xx) status."""
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
            r = await self._client().post(
                url,
                content=delivery.body,
                headers=headers,
                extensions=ext,
                timeout=delivery.timeout,
            )
        except httpx.TimeoutException:
            raise DeliveryError(f"no answer within {delivery.timeout:g} s") from None
        except httpx.HTTPError as e:
            raise DeliveryError(f"{type(e).__name__}: {e}"[:300]) from None
        if not 200 <= r.status_code < 300:
            what = "redirect (not followed)" if 300 <= r.status_code < 400 else "answered"
            raise DeliveryError(f"{what} {r.status_code}", r.status_code)
        return r.status_code
