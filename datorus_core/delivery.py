"""Event delivery, in a process of its own beside each gateway (issue 18): the durable
outbox sent.

The gateway (``addons/events.py``) starts ``python -m datorus_core.delivery`` once its
ledger is open, hands it its settings and listening sockets on stdin, restarts it if it
dies and stops it at a clean stop; the process exits by itself when the gateway is gone.
Nothing of it shares the proxy's interpreter: delivering 100 events a second in the
gateway's own process (even on a thread of its own) took a third off its forward
requests a second, through the interpreter's lock.

:class:`Deliverer` ticks every ``TICK_SECONDS``: it fans new events out to the
subscriptions matching them (``ledger.events.dispatch``), claims due deliveries and sends
each one with its notifier plugin (``webhook``, ``smtp``: ``datorus_core.notifiers``) as a
task of its own, at most ``MAX_IN_FLIGHT`` at once and one at a time per subscription, so
a slow or dead receiver delays only its own deliveries. A failure is retried with
exponential back-off and jitter for ``event_retry_seconds`` (a day), then marked failed
(``datorus notifier list``, ``GET /account/webhooks``, ``/stats/plugins``). It also writes
``lease.expired`` for leases that ran out, prunes events after ``event_days``, and checks
low balances and auto-recharges (:mod:`datorus_core.api.alerts`) every second.

Under ``datorus serve`` worker 0 runs it; several gateways on one ledger each have one;
a delivery is claimed in the ledger by one of them at a time (``claim_until``), so it is sent once
per attempt. Webhook receivers are destinations like any other: the acceptable-use
policy (the operator's rules and settings, the gateway's own sockets, read again when an
operator change bumps the ledger's configuration version) judges every address the
receiver's name resolves to, and the connection goes to the address it allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from . import events as ev
from .api.alerts import Alerts
from .ledger import Ledger, connect
from .ledger import events as ledger_events
from .notifiers import Delivery, DeliveryError, load_notifiers
from .notifiers.targets import policy_for
from .policy import Policy, normalize_hostname, parse_ip_literal

log = logging.getLogger("datorus.delivery")

T = TypeVar("T")
TICK_SECONDS = 0.5
MAX_IN_FLIGHT = 128
HOUSEKEEPING_SECONDS = 5.0
ALERT_SECONDS = 1.0
POLICY_SECONDS = 5.0


class Trouble:
    """One kind of failure, logged once when it starts and once when it ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0

    def failed(self, detail: str) -> None:
        """Count a failure; log only the first of an episode."""
        if self.count == 0:
            log.warning("datorus: %s failed: %s", self.what, detail)
        self.count += 1

    def ok(self) -> None:
        """A success: log the end of an episode, if one was going on."""
        if self.count:
            log.warning("datorus: %s recovered after %d failures", self.what, self.count)
            self.count = 0


def _expire(db: Ledger, now: int) -> int:
    return ledger_events.expire_leases(db, now)


class Deliverer:
    """Send the outbox's due deliveries; sweep expired leases; prune old events; check
    low balances and auto-recharges."""

    def __init__(self, settings: dict[str, Any], own: list[tuple[str, int]]) -> None:
        self.settings = settings
        self.own = own  # the gateway's listening sockets: never a delivery's target
        self.policy = Policy()
        self.policy_at = 0.0
        self.policy_version = -1  # the ledger's config_version the policy was read at
        self.parent = os.getppid()
        self.notifiers, self.failures = load_notifiers()
        self.stop = asyncio.Event()
        self.sending: set[asyncio.Task] = set()
        self.outcomes: list[ledger_events.Outcome] = []
        self.trouble = Trouble("event delivery")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="datorus-delivery-db")
        self._db: Ledger | None = None
        self.alerts: Alerts | None = None

    async def main(self) -> None:
        """Run until SIGTERM or the gateway is gone; then the deliveries under way are
        cancelled (their claims lapse: they are sent again later) and the outcomes known
        written."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
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
            if self._db is not None:
                with contextlib.suppress(Exception):
                    await self.db(lambda d: d.close())
            self._pool.shutdown(wait=False)

    def _call(self, fn: Callable[[Ledger], T]) -> T:
        if self._db is None or self._db.broken:
            self._db = Ledger(connect(self.settings["db"]))
        return fn(self._db)

    async def db(self, fn: Callable[[Ledger], T]) -> T:
        """Run *fn* on this process's ledger connection, in its thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn)

    async def _read_policy(self) -> None:
        """Re-read the acceptable-use policy when an operator change bumped the ledger's
        configuration version (checked every tick, so a ``datorus policy allow`` reaches
        deliveries within a second, as it reaches the gateway), and every
        ``POLICY_SECONDS`` whatever the version says."""
        version = await self.db(lambda d: d.config_version())
        if version == self.policy_version and time.monotonic() < self.policy_at:
            return
        self.policy = await self.db(lambda d: policy_for(d, self.settings, self.own))
        self.policy_version = version
        self.policy_at = time.monotonic() + POLICY_SECONDS

    async def _loop(self) -> None:
        next_housekeeping = next_alerts = 0.0
        next_prune = time.monotonic() + 60
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), TICK_SECONDS)
            if self.stop.is_set():
                return
            if os.getppid() != self.parent:
                return  # the gateway died (kill -9): so does its delivery process
            try:
                await self._record()
                await self._read_policy()
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
                    days = int(self.settings.get("event_days", 30))
                    await self.db(partial(ledger_events.prune, days=days))
            except Exception as e:  # never let the loop die: the next tick tries again
                self.trouble.failed(str(e))
            else:
                self.trouble.ok()

    def _alerts(self) -> None:
        """Low-balance events and auto-recharges (blocking: Stripe, SMTP; in a thread)."""
        if self.alerts is None:
            self.alerts = Alerts(self.settings)
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
        lease_ms = (int(self.settings.get("webhook_timeout", 10)) + 30) * 1000
        due = await self.db(lambda d: ledger_events.claim_due(d, now_ms, lease_ms, free))
        loop = asyncio.get_running_loop()
        for row in due:
            task = loop.create_task(self._deliver(row), name=f"datorus delivery {row['id']}")
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)

    async def _deliver(self, row: dict[str, Any]) -> None:
        sub, event = row["subscription"], row["event"]
        s = self.settings
        status: int | None = None
        error: str | None = None
        plugin = self.notifiers.get(sub["kind"])
        try:
            if plugin is None:
                raise DeliveryError(f"no notifier plugin {sub['kind']!r} is loaded")
            answered = await plugin.obj.send(
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
            status = answered if isinstance(answered, int) else None
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
        policy = self.policy
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


def main() -> None:
    """``python -m datorus_core.delivery``: ``{"settings": {...}, "own": [[host, port]...]}``
    on stdin (what the gateway runs with)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    given = json.load(sys.stdin)
    own = [(str(h), int(p)) for h, p in given.get("own", [])]
    asyncio.run(Deliverer(given["settings"], own).main())


if __name__ == "__main__":
    main()
