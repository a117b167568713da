"""Event delivery in the background of the gateway (issue 18): the durable outbox sent.

:class:`EventDelivery` ticks every ``TICK_SECONDS``: it fans new events out to the
subscriptions matching them (``ledger.events.dispatch``), claims due deliveries and sends
each one with its notifier plugin (``webhook``, ``smtp``: ``datorus_core.notifiers``) as a
task of its own, at most ``MAX_IN_FLIGHT`` at once and one at a time per subscription, so
a slow or dead receiver delays only its own deliveries. A failure is retried with
exponential back-off and jitter for ``event_retry_seconds`` (a day), then marked failed (``datorus
notifier list``, ``GET /account/webhooks``, ``/stats/plugins``). It also writes
``lease.expired`` for leases that ran out, prunes events after ``event_days``, and
checks low balances and auto-recharges (``datorus_core.api.alerts``) every second.

Nothing here is on the request path: it runs on a thread of its own with an event loop of
its own (the proxy's loop never waits for a receiver or a delivery's bookkeeping), the
ledger reached from one more thread (its own connection), the outcomes of a tick written
in one transaction. With several
workers or gateways on one ledger each runs this loop; a delivery is claimed in the
ledger by one of them at a time (``claim_until``), so it is sent once per attempt.

Webhook receivers are destinations like any other: the acceptable-use policy of the
gateway judges every address the receiver's name resolves to, and the connection goes to
the address it allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from datorus_core import events as ev
from datorus_core.api.alerts import Alerts
from datorus_core.ledger import Ledger, connect
from datorus_core.ledger import events as ledger_events
from datorus_core.notifiers import Delivery, DeliveryError, load_notifiers
from datorus_core.policy import normalize_hostname, parse_ip_literal

from .context import Gateway
from .options import Trouble
from .policy import AcceptableUse

log = logging.getLogger("datorus")

T = TypeVar("T")
TICK_SECONDS = 0.5
MAX_IN_FLIGHT = 32
HOUSEKEEPING_SECONDS = 5.0
ALERT_SECONDS = 1.0


def _expire(db: Ledger, now: int) -> int:
    return ledger_events.expire_leases(db, now)


class EventDelivery:
    """Send the outbox's due deliveries; sweep expired leases; prune old events."""

    name = "datorus_events"

    def __init__(self, gw: Gateway, policy: AcceptableUse) -> None:
        self.gw = gw
        self.policy = policy
        self.notifiers, self.failures = load_notifiers()
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.sending: set[asyncio.Task] = set()
        self.outcomes: list[ledger_events.Outcome] = []
        self.trouble = Trouble("event delivery")
        self._pool: ThreadPoolExecutor | None = None
        self._db: Ledger | None = None
        self.alerts: Alerts | None = None

    def running(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="datorus-events-db")
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="datorus-events", daemon=True
        )
        self.thread.start()

    async def done(self) -> None:
        self.stop.set()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 15)
        if self._pool is not None:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    self._pool.submit(self._db.close).result(5)
            self._pool.shutdown(wait=False)

    async def _main(self) -> None:
        """The delivery thread's event loop: the loop until the gateway stops, then the
        deliveries under way are cancelled (their claims lapse: sent again later) and the
        outcomes known written."""
        try:
            await self._loop()
        finally:
            for t in list(self.sending):
                t.cancel()
            for t in list(self.sending):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            with contextlib.suppress(Exception):
                await self._record()

    def _call(self, fn: Callable[[Ledger], T]) -> T:
        if self._db is None or self._db.broken:
            self._db = Ledger(connect(self.gw.settings["db"]))
        return fn(self._db)

    async def db(self, fn: Callable[[Ledger], T]) -> T:
        """Run *fn* on this addon's ledger connection, in its thread."""
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn)

    async def _loop(self) -> None:
        while not self.gw.ready.is_set():  # the ledger is open and migrated
            if self.stop.is_set():
                return
            await asyncio.sleep(0.1)
        next_housekeeping = next_alerts = 0.0
        next_prune = time.monotonic() + 60
        while not self.stop.is_set():
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self._record()
                await self.tick()
                now = time.monotonic()
                if now >= next_alerts:
                    next_alerts = now + ALERT_SECONDS
                    await asyncio.to_thread(self._alerts)
                if now >= next_housekeeping:
                    next_housekeeping = now + HOUSEKEEPING_SECONDS
                    await self.db(partial(_expire, now=int(time.time())))
                if now >= next_prune:
                    next_prune = now + 3600
                    days = int(self.gw.settings.get("event_days", 30))
                    await self.db(partial(ledger_events.prune, days=days))
            except Exception as e:  # never let the loop die: the next tick tries again
                self.trouble.failed(str(e))
            else:
                self.trouble.ok()

    def _alerts(self) -> None:
        """Low-balance events and auto-recharges (blocking: Stripe, SMTP; in a thread)."""
        if self.alerts is None:
            self.alerts = Alerts(self.gw.settings)
        self.alerts.check()

    async def _record(self) -> None:
        """Write the outcomes of the deliveries that ended since the last tick."""
        if self.outcomes:
            done, self.outcomes = self.outcomes, []
            try:
                await self.db(lambda d: ledger_events.record_many(d, done))
            except Exception:
                self.outcomes[:0] = done
                raise

    async def tick(self) -> None:
        """Dispatch new events, then start the due deliveries there is room for."""
        now_ms = int(time.time() * 1000)
        await self.db(lambda d: ledger_events.dispatch(d, now_ms))
        free = MAX_IN_FLIGHT - len(self.sending)
        if free <= 0:
            return
        lease_ms = (int(self.gw.settings.get("webhook_timeout", 10)) + 30) * 1000
        due = await self.db(lambda d: ledger_events.claim_due(d, now_ms, lease_ms, free))
        loop = asyncio.get_running_loop()
        for row in due:
            task = loop.create_task(self._deliver(row), name=f"datorus delivery {row['id']}")
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)

    async def _deliver(self, row: dict[str, Any]) -> None:
        sub, event = row["subscription"], row["event"]
        s = self.gw.settings
        status: int | None = None
        error: str | None = None
        plugin = self.notifiers.get(sub["kind"])
        try:
            if plugin is None:
                raise DeliveryError(f"no notifier plugin {sub['kind']!r} is loaded")
            await plugin.obj.send(
                Delivery(
                    target=sub["target"],
                    event=event,
                    body=ev.body(event),
                    secret=sub["secret"],
                    timeout=float(s.get("webhook_timeout", 10)),
                    resolve=self.resolve,
                    settings=s,
                )
            )
        except DeliveryError as e:
            error, status = e.reason, e.status
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a plugin's own bug is that delivery's failure
            error = f"{type(e).__name__}: {e}"[:300]
        now_ms = int(time.time() * 1000)
        retry_at: int | None = None
        if error is not None:
            first = float(s.get("event_retry_first_ms", 5000)) / 1000
            wait = ev.backoff_seconds(row["attempts"] + 1, first=first)
            retry_at = now_ms + int(wait * 1000)
            if retry_at - row["first_at"] > int(s.get("event_retry_seconds", 86400)) * 1000:
                retry_at = None  # retried long enough: failed, and shown
        self.outcomes.append(
            ledger_events.Outcome(
                row["id"], row["subscription_id"], error is None, status, error, retry_at
            )
        )

    async def resolve(self, host: str, port: int) -> str:
        """The address to reach *host*:*port* at, if the acceptable-use policy allows every
        address it has (DeliveryError naming the rule otherwise)."""
        policy = self.policy.policy
        ip = parse_ip_literal(host)
        if ip is not None:
            addresses = [str(ip)]
        else:
            try:
                name = normalize_hostname(host)
            except ValueError as e:
                raise DeliveryError(f"bad host name: {e}") from None
            denial = policy.check_name(name, port)
            if denial is not None:
                raise DeliveryError(f"refused by the acceptable-use policy ({denial.rule})")
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    name, port, type=socket.SOCK_STREAM
                )
            except OSError as e:
                raise DeliveryError(f"cannot resolve {name}: {e}") from None
            addresses = list(dict.fromkeys(str(i[4][0]) for i in infos))
        denial = policy.check_addresses(addresses, port)
        if denial is not None:
            raise DeliveryError(f"refused by the acceptable-use policy ({denial.rule})")
        if not addresses:
            raise DeliveryError(f"{host} has no address")
        return addresses[0]
