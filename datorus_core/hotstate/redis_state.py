"""The hot state shared by the workers of ``datorus serve --workers N``, in Redis.

:class:`RedisHotState` implements :class:`~.base.HotState` with one atomic Lua script
per decision (:mod:`.redis_lua`):

- **rate and tunnels** (:meth:`~RedisHotState.take`): GCRA per credential with
  :class:`~datorus_core.ratelimit.Gcra`'s arithmetic in a hash ``{p}rl:{credential}``,
  on Redis's clock; the account's open tunnels in a sorted set ``{p}tun:{account}``
  whose members (worker id + tunnel key) hold a 60 s lease that their worker renews
  every 20 s, so the slots of a killed worker lapse by themselves.
- **failed logins** per client address (:meth:`~RedisHotState.login_failed`).
- **sticky sessions**: ``{p}s:{account}:{session}`` -> egress id, expiring after the
  session TTL. The rate limit's script also reads the request's session (so a forward
  request makes one round trip, not two); routing keeps it alive when it uses the pin
  (``PEXPIRE`` with the next batch, within :data:`TOUCH_SECONDS`, one per session).
  **News** (blocks, leases): ``PUBLISH`` on ``{p}news``.
- **the request path's commands** of one event-loop turn go as one batch on one
  pipelined connection (:class:`~.redis_link.RedisLink`).
- **byte credit** (:meth:`~RedisHotState.claim`), the part that bounds money.

Byte credit
-----------
Each account and credential has a hash ``{p}cr:a:{id}`` / ``{p}cr:c:{id}`` with one
field per worker ``w``: ``t[w]``, every byte ``w`` has claimed in its life (what it
charged, flushed or not, plus the credit it still holds). The ledger keeps, per worker,
the bytes it has flushed (``worker_usage``, written in the same transaction as the
usage), and each snapshot carries the ledger's own allowance ``A`` (trial plus what
the balance buys down to the overdraft floor, this worker's pending batch left out)
with the flushed bytes ``F[w]`` read in the same transaction. The room left is::

    room = A - sum over workers w in the hash of (t[w] - F[w])

``t[w] - F[w]`` is what ``w`` holds or spent that the snapshot's balance does not yet
reflect, so this is exact *whatever the age of the snapshot*: a snapshot taken before
``w`` flushed ``b`` more bytes has ``F[w]`` lower by ``b`` and a balance that buys ``b``
bytes more, and the two cancel. (When the account ran below its floor the balance
buys less than ``b`` more, so an old snapshot only ever gives less room, never more:
:func:`room` and the property test in ``tests/unit/test_redis_state.py``.) Workers
therefore need no common snapshot, and a usage flush needs no Redis round trip.

Trial credit
------------
Byte credit bounds the bytes; which of them are trial bytes is claimed apart, or two
workers could each spend the same remaining trial from their own view of the ledger.
Each account also has a trial hash ``{p}tr:a:{id}`` with ``tt[w]``, every trial byte
``w`` has claimed in its life; the ledger keeps the trial bytes each worker flushed
(``worker_usage.trial_bytes``, in the same transaction), and each snapshot carries the
ledger's trial ``T`` with the flushed trial ``FT[w]``. The trial room is::

    trial room = T - sum over workers w of (tt[w] - FT[w])

exact whatever the age of the snapshot for the same reason as the byte room (a trial
flush lowers ``T`` by what it raises ``FT[w]``; ``T`` is never below 0, so nothing is
clipped). A claim grants trial first: out of the bytes it grants and the paid credit the
worker already holds, up to the trial room, so a worker never holds more trial credit
than byte credit. In this state the runtime's ``AccountState.trial`` *is* the trial
credit the worker holds (``Runtime.apply_snapshot`` leaves it alone, the ledger's trial
goes to ``ledger_trial``), so ``Runtime.settle`` charges as trial only trial credit
claimed here. Then the trial charged never passes ``T``, and the paid bytes never pass
what the balance buys down to the floor: each worker's paid credit ``t[w] - tt[w]``
bounds what it charges as paid bytes, and their sum is the byte room less the trial
room. (The order across workers is trial first per claim: a worker may charge paid
bytes from its paid credit while another still holds a little unspent trial credit;
once the account runs dry both totals are exact.)

A worker claims blocks (at least :data:`BLOCK` bytes) and reserves from them locally
(``AccountState.granted``, ``CredentialState.granted``: ``Runtime.reserve`` never
reserves beyond them, ``Runtime.settle`` moves charged bytes out of them), gives back
what it leaves idle for 2 s, and keeps a mirror of its ``t[w]`` and ``tt[w]`` so that
it can write its fields again after Redis lost them.

Pulls and refusals
------------------
Credit a worker holds idle would strand: a flow on another worker would be cut, or a
request refused, with the account's last bytes (or its trial) unused. So a claim that
leaves its caller short (less than the bytes it *needs*, or no trial credit when the
request can only run on trial) while other workers hold or spent something in those
hashes *pulls*: it publishes ``want`` on ``{p}news``, each worker named gives back at
once what it holds beyond its flows' reservations and answers ``gave``, and the claim
is made again (:meth:`~RedisHotState._pull`, at most :data:`PULL_SECONDS`). Still
short, the account or credential is dry for the gateway: what the other workers held
or charged beyond this worker's snapshot (the claim script sums it) goes to
``AccountState.paid_elsewhere`` and ``CredentialState.used_elsewhere``, which
``Runtime.admit`` and ``Runtime.dry_error`` count, so a 402 tells the gateway's balance
and bytes used; the ledger is read again soon (``refresh_wanted``), after which the
view says it alone. A request a worker's own view refuses is first looked at again
(:meth:`~RedisHotState.catch_up`): each worker records the newest configuration
version it read (``{p}version``), and a worker behind it reads the ledger first (a
top-up another worker already saw).

A worker whose heartbeat lapses (10 s) is reaped by any other (every 5 s; a script
makes two reapers at once harmless): its fields leave every hash, so its held credit is
free again (usage it never flushed is lost, as a ``kill -9`` loses it in one process),
then its ``worker_usage`` rows go. Its field stood for the bytes it flushed after other
workers' snapshots were read; so the reap also marks each of its hashes with a count
(``{p}reaps``, field ``~r``), and a claim made with a snapshot read before that count
is refused: the worker reads the ledger again (:attr:`~RedisHotState.snapshot_wanted`;
the claim waits for it) and its new balance holds every flush of the dead worker. A
worker that only stalled past its heartbeat is counted again when it notices (its next
heartbeat or claim); until then its unflushed and held bytes go uncounted, and later
its flushed bytes may be counted twice (less credit, never more).

The gateway's ledger task reads snapshots for this state as follows (see
:meth:`~RedisHotState.adopt`)::

    token = await hot.before_snapshot()        # before the ledger read
    *snap, rows = await link.snapshot_shared()  # balances and worker_usage, one read
    await hot.seen_version(snap[3])            # the newest version any worker read
    runtime.apply_snapshot(*snap, worker_usage=rows)
    hot.adopt(runtime, token)                  # before any request sees the view

whenever the configuration version changed or ``hot.snapshot_wanted`` (or
``hot.refresh_wanted``) is True.

When Redis fails
----------------
No request waits on a dead Redis for more than :data:`TIMEOUT` seconds: the first
error switches this worker to local fallbacks at once (one log line), a probe every
:data:`PROBE_SECONDS` brings it back (one log line), with its fields written again.

- rate limits: a local GCRA per credential at ``rps/N`` and burst ``max(1, burst//N)``,
  open tunnels: at most ``max(1, max_tunnels//N)`` opened by this worker, so N workers
  together stay within the limits (tunnels opened before the failure still count);
- failed logins: counted in this worker (:class:`~.local.LoginFailures`);
- byte and trial credit: nothing new is granted; flows go on spending the credit this
  worker already holds, and a request that needs more gets 0 from :meth:`claim` at once
  (the caller answers 503 with ``Retry-After``; while Redis answers but this worker's
  fields are being written again, or its snapshot must be read again, a claim waits up
  to :data:`WAIT_SECONDS` instead). Usage is billed from each worker's own batch as
  always: Redis only bounds spending, so nothing is lost or billed twice;
- sessions: a local :class:`~datorus_core.sessions.SessionTable` (pins are written to
  it always, so sessions this worker pinned stay put); news: dropped.

A Redis that restarted empty is recognised by its missing ``{p}epoch`` key: every
claim carries the epoch it knows and Redis refuses a mismatch, the worker writes its
fields again from its mirror (and reads the ledger again: workers that died meanwhile
left no trace), and no credit is granted to anyone for :data:`SETTLE_SECONDS` (until
every live worker has done the same at its next heartbeat). A worker that starts while
Redis has just restarted, before the older workers noticed, may be granted up to their
unflushed and held bytes once. A command that timed out against a hung Redis may still
run when it wakes; the re-assert that follows (over a new connection, after a PING)
overwrites what it did to this worker's fields.

Order at a clean stop (the caller's): stop new requests and settle the flows under
way, write the final usage batch, then :meth:`RedisHotState.stop` (gives back the
credit still held and removes this worker's fields, then its ``worker_usage`` rows
while the ledger is still open), then close the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from ..live import Lease
from ..ratelimit import Gcra, Verdict
from ..runtime import UNLIMITED, AccountState, CredentialState, Runtime
from ..sessions import SessionTable
from . import redis_lua
from .base import BlockNews, HotState, LeaseNews, Listener, Take
from .local import LoginFailures
from .redis_link import RedisLink, resolve

log = logging.getLogger(__name__)

BLOCK = 1 << 20  # bytes claimed at least per round trip
TIMEOUT = 0.25  # seconds: connect and read timeout of every command
PROBE_SECONDS = 0.5  # while Redis is unreachable, how often to try again
HEARTBEAT_MS = 10_000  # a worker is dead when its heartbeat is this old
HEARTBEAT_SECONDS = 3.0  # how often a worker refreshes its heartbeat
REAP_SECONDS = 5.0  # how often a worker looks for dead ones
LEASE_SECONDS = 60  # a tunnel slot lapses this long after its worker last renewed it
RENEW_SECONDS = 20.0
GIVE_BACK_SECONDS = 1.0  # how often idle credit is given back
IDLE_SECONDS = 2.0  # credit of an account that reserved nothing for this long goes back
SETTLE_SECONDS = HEARTBEAT_SECONDS + 1.0  # no grants this long after a Redis restart
WAIT_SECONDS = 1.0  # a claim waits this long for a usable snapshot or a re-assert
PULL_SECONDS = 0.5  # a short claim waits this long for the other workers to give back
TOUCH_SECONDS = 0.005  # a session's keep-alive waits at most this long for a batch to join
VERSION_MS = 600_000  # the newest configuration version read is kept this long
WINDOW = 60.0  # failed logins are counted per minute (as in .local)
_MAX_LUA = 1 << 52  # Lua numbers are doubles: keep every sum exact
_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

State = AccountState | CredentialState


def room(allowance: int, flushed: Mapping[str, int], claimed: Mapping[str, int]) -> int:
    """The bytes left to claim: *allowance* (a snapshot's) less what every worker in
    *claimed* (the hash: worker -> bytes claimed in all) holds or spent beyond what the
    same snapshot's *flushed* (worker -> bytes flushed) already counts.

    The Lua claim computes exactly this::

        >>> room(10_000, {"w1": 3_000}, {"w1": 4_000, "w2": 1_000})
        8000
    """
    return allowance - sum(t - flushed.get(w, 0) for w, t in claimed.items())


def new_worker_id() -> str:
    """A worker id unique to this process incarnation: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(eq=False)
class _Holder:
    """One runtime object (account or credential) holding credit of a :class:`_Held`."""

    state: State
    sig: tuple[int, int] = (0, 0)  # (granted, inflight) when last looked at
    quiet_since: float = 0.0


@dataclass(eq=False)
class _Held:
    """One account or credential (one Redis hash) this worker has claimed credit for."""

    key: str
    claimed: int = 0  # the mirror of t[worker]: what Redis holds for this worker
    # the runtime objects holding it: one, or more for a while when a snapshot replaced
    # the object (a credential whose password changed) and flows still run on the old one
    holders: list[_Holder] = field(default_factory=list)
    # an account's trial hash, and the mirror of this worker's field there
    trial_key: str | None = None
    trial_claimed: int = 0


@dataclass(frozen=True, slots=True)
class _Grant:
    """What one claim script granted, and what it saw the other workers hold."""

    grant: int
    trial: int
    others: int  # account bytes the other workers held or charged beyond the snapshot
    others_cap: int  # the same for the credential (0 without a cap)
    others_trial: int  # the same for the account's trial
    holders: tuple[str, ...]  # the other workers with something there


class RedisHotState:
    """:class:`~.base.HotState` in Redis, shared by every worker that names the same
    *url* and *prefix*.

    *settings* is the gateway's settings dict (``session_ttl``, ``max_sessions``,
    ``auth_fail_limit``, ``auth_block_seconds``); *worker* a unique id per process
    incarnation (:func:`new_worker_id`); *workers* the number of workers N (the local
    fallback limits are 1/N of the gateway's).
    """

    shared = True

    def __init__(
        self,
        settings: dict[str, Any],
        url: str,
        prefix: str = "datorus:",
        worker: str | None = None,
        workers: int = 1,
    ) -> None:
        self.settings = settings
        self.url = url
        self.prefix = p = prefix
        self.worker = worker or new_worker_id()
        self.workers = max(1, workers)
        # the gateway's ledger link, for the reaper's deletions (set it once it is open)
        self.ledger: Any = None
        self.listener: Listener | None = None
        self.redis: aredis.Redis = aredis.Redis.from_url(
            url,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 0),  # a script is never sent twice
        )
        # the request path's batches (:meth:`_command`): one pipelined connection
        self.link = RedisLink(url, TIMEOUT, self._resolve, self._round_trip)
        r = self.redis
        self._take = r.register_script(redis_lua.TAKE)
        self._renew = r.register_script(redis_lua.RENEW)
        self._login = r.register_script(redis_lua.LOGIN)
        self._claim_script = r.register_script(redis_lua.CLAIM)
        self._give = r.register_script(redis_lua.GIVE)
        self._epoch_script = r.register_script(redis_lua.EPOCH)
        self._reassert = r.register_script(redis_lua.REASSERT)
        self._heartbeat = r.register_script(redis_lua.HEARTBEAT)
        self._reap = r.register_script(redis_lua.REAP)
        self._version = r.register_script(redis_lua.VERSION)
        self.k_epoch, self.k_settle = f"{p}epoch", f"{p}settle"
        self.k_version = f"{p}version"
        self.k_workers, self.k_news = f"{p}workers", f"{p}news"
        self.k_hb, self.k_wk = f"{p}hb:{self.worker}", f"{p}wk:{self.worker}"
        self.k_reaps = f"{p}reaps"
        # the timings (module defaults; tests shorten them)
        self.heartbeat_ms = HEARTBEAT_MS
        self.heartbeat_seconds = HEARTBEAT_SECONDS
        self.lease_seconds = LEASE_SECONDS
        self.renew_seconds = RENEW_SECONDS
        self.reap_seconds = REAP_SECONDS
        self.idle_seconds = IDLE_SECONDS
        self.give_back_seconds = GIVE_BACK_SECONDS
        self.settle_seconds = SETTLE_SECONDS
        # the snapshot the credit is computed from: (epoch, reap count) read before it
        self._token: tuple[str, int] | None = None
        self._fresh = asyncio.Event()  # set when a snapshot with a good token is adopted
        self.snapshot_wanted = True  # read the ledger again (and adopt it) before claiming
        # read the ledger again soon (the snapshot still counts: a short claim found
        # other workers' usage that this view may miss, or another worker read a newer
        # configuration)
        self.refresh_wanted = False
        self._adopted = asyncio.Event()  # set (and replaced) at every adopt
        self._caught_up = -1  # the newest configuration version waited for
        self._synced = asyncio.Event()  # set while self.synced
        # connection state: up = Redis answers (rate, sessions, news go to it);
        # synced = this worker's credit fields are in Redis (claims may be sent)
        self.up = False
        self.synced = False
        self._settling = False  # the last claim met a restart's settle window
        self.epoch: str | None = None
        self.last_error: str | None = None
        self.down_since: float | None = None
        self.clock = 0.0  # Redis's clock (seconds since ORIGIN) at the last take
        self._offset = 0.0  # Redis clock (seconds since ORIGIN) minus time.monotonic()
        self._ops = 0  # credit scripts in flight (a re-assert waits for none)
        self._no_ops = asyncio.Event()
        self._no_ops.set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # writes nobody waits for (session pins, freed tunnel slots, news), sent in order
        # by one task, batched in a pipeline: a re-pin never overtakes its pin
        self._outbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._stopping = False
        # told each batch's round trip in seconds (the metrics' Redis RTT), if set
        self.rtt_observer: Callable[[float], None] | None = None
        self._held: dict[str, _Held] = {}
        self._tunnels: dict[int, dict[str, None]] = {}  # account -> this worker's tunnel keys
        self._mirror: dict[int, Gcra] = {}  # credential -> its limiter as Redis last said
        self._fallback: dict[int, Gcra] = {}  # credential -> its 1/N limiter while down
        self._forget: set[str] = set()  # reaped workers whose ledger rows remain
        self._claims: dict[int, asyncio.Future[None]] = {}  # credential -> its claim under way
        # pulls under way: id -> (workers yet to answer, set when all have)
        self._pulls: dict[str, tuple[set[str], asyncio.Event]] = {}
        self._pull_seq = 0
        self._answers: set[asyncio.Task[None]] = set()  # give-backs other workers asked for
        # the request path's commands waiting for this loop turn's pipeline
        self._batch: list[tuple[tuple[Any, ...], asyncio.Future[Any] | None]] = []
        # sessions to keep alive (key -> TTL ms), sent with the next batch
        self._touches: dict[str, int] = {}
        self._touch_timer: asyncio.TimerHandle | None = None
        self._retried: set[asyncio.Future[Any]] = set()  # sent again after a script load
        self._sending: set[asyncio.Task[None]] = set()
        self._scripts: dict[str, AsyncScript] = {}
        self.logins = LoginFailures()
        self.sessions = SessionTable(3600.0, 100_000)
        self.configure()

    # -- lifecycle ---------------------------------------------------------------------

    def configure(self) -> None:
        """Follow the settings' session TTL and size (the local fallback table's too)."""
        ttl, size = self.settings.get("session_ttl"), self.settings.get("max_sessions")
        if ttl is None or size is None:
            return
        if self.sessions.ttl != ttl or self.sessions.max_sessions != size:
            old = self.sessions.table
            self.sessions = SessionTable(ttl, size)
            self.sessions.table = old

    async def start(self, listener: Listener) -> None:
        """Connect (or start degraded, retrying: see the module's notes) and start the
        heartbeat, the housekeeping and the news subscriber."""
        self.listener = listener
        try:
            await self._resync()
        except _ERRORS as e:
            self._failed(e)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._supervise(), name="datorus redis supervisor"),
            loop.create_task(self._housekeep(), name="datorus redis housekeeping"),
            loop.create_task(self._subscribe(), name="datorus redis news"),
            loop.create_task(self._write_out(), name="datorus redis writes"),
        ]

    async def stop(self) -> None:
        """Give back the credit still held, free this worker's tunnel slots and fields
        (and its ``worker_usage`` rows, when :attr:`ledger` is set), and disconnect.

        Call it after the final usage batch is written and before the ledger closes.
        """
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self.up and self.synced:
            try:
                await self._send_outbox()
                await self._give_back(force=True)
                members: dict[str, list[str]] = {}
                for aid, keys in self._tunnels.items():
                    members[self._tun_key(aid)] = [self._member(k) for k in keys]
                async with self.redis.pipeline(transaction=False) as pipe:
                    for zkey, ms in members.items():
                        if ms:
                            pipe.zrem(zkey, *ms)
                    pipe.delete(self.k_hb)
                    await pipe.execute()
                # with the ledger at hand, free the fields and rows now; else another
                # worker's reaper does it (it finds the heartbeat gone)
                if self.ledger is not None and await self._reap(
                    keys=[self.k_hb, self.k_wk, self.k_workers, self.k_reaps], args=[self.worker]
                ):
                    self._forget.add(self.worker)
                    await self._forget_rows()
            except _ERRORS as e:
                log.warning("datorus: redis at stop: %s (the reaper frees what is left)", e)
        if self._sending or self._answers:
            await asyncio.wait([*self._sending, *self._answers], timeout=TIMEOUT * 2)
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        with contextlib.suppress(Exception):
            await self.link.aclose()

    def reachable(self) -> bool:
        """Whether a claim's answer is about money: False while Redis is out of reach,
        this worker's claims are being written again, its snapshot must be read again,
        or a restart is being settled (a 0 of :meth:`claim` then means "retry shortly")."""
        return self.up and self.synced and self._snapshot_ok() and not self._settling

    def status(self) -> dict[str, Any]:
        """For /health: whether Redis answers, since when it does not, the last error."""
        return {
            "state": "redis",
            "redis": "connected" if self.up else "unreachable",
            "worker": self.worker,
            "workers": self.workers,
            "synced": self.synced,
            "downForSeconds": (
                None if self.down_since is None else round(time.monotonic() - self.down_since, 1)
            ),
            "lastError": self.last_error,
        }

    async def before_snapshot(self) -> tuple[str, int] | None:
        """Read what a snapshot's credit depends on in Redis; call it just *before*
        reading the ledger (``LedgerLink.snapshot_shared``) and pass the result to
        :meth:`adopt`. None when Redis does not answer (claims then wait for the next)."""
        if not (self.up and self.synced and self.epoch):
            return None
        try:
            n = await self.redis.get(self.k_reaps)
        except _ERRORS as e:
            self._failed(e)
            return None
        return self.epoch, int(n or 0)

    def adopt(self, rt: Runtime, token: tuple[str, int] | None) -> None:
        """Take over the runtime's credit after each snapshot load (call it right after
        ``Runtime.apply_snapshot``, before any request sees the new view) with the
        *token* :meth:`before_snapshot` returned: accounts and credentials new to this
        process start with no credit (``granted = 0``, no trial credit) instead of the
        in-process state's unlimited one and the ledger's trial, and usage batches carry
        this worker's id (so the ledger records what it flushed).

        Read the ledger again (:meth:`before_snapshot`, snapshot, :meth:`adopt`) whenever
        :attr:`snapshot_wanted` is True, within a tick: claims wait for it (up to a second)
        after a worker left, after Redis restarted, and at start."""
        self._token = token
        if token is not None and token[0] == self.epoch:
            self.snapshot_wanted = False
            self._fresh.set()
        rt.worker = self.worker
        rt.batch.worker = self.worker
        for acc in rt.accounts.values():
            _no_credit_yet(acc)
        for cred in rt.by_username.values():
            _no_credit_yet(cred)
        self._adopted.set()  # wake those waiting for a newer view (catch_up)
        self._adopted = asyncio.Event()

    # -- keys --------------------------------------------------------------------------

    def _tun_key(self, account_id: int) -> str:
        return f"{self.prefix}tun:{account_id}"

    def _member(self, tunnel_key: str) -> str:
        return f"{self.worker}|{tunnel_key}"

    # -- Redis failures ------------------------------------------------------------------

    def _failed(self, e: BaseException) -> None:
        """Redis did not answer: switch to the local fallbacks (logged once)."""
        self.last_error = f"{type(e).__name__}: {e}"
        if self.down_since is None:
            log.warning(
                "datorus: redis %s unreachable (%s): limits fall back to this worker's"
                " 1/%d share, no new byte credit, local sessions; retrying",
                self.url,
                self.last_error,
                self.workers,
            )
            self.down_since = time.monotonic()
        self.up = False
        self.synced = False
        self._synced.clear()
        self._wake.set()

    def _stale(self, why: str) -> None:
        """Redis answers but lost this worker's fields: re-assert before claiming again."""
        if self.synced:
            log.warning("datorus: redis %s: %s; re-asserting this worker's claims", self.url, why)
        self.synced = False
        self._synced.clear()
        self._wake.set()

    # -- the request path's round trips, batched -------------------------------------------

    def _call(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Awaitable[Any]:
        """Run *script* in the next batch (see :meth:`_command`)."""
        self._scripts[script.sha] = script
        return self._command("EVALSHA", script.sha, len(keys), *keys, *args)

    def _command(self, *command: Any) -> asyncio.Future[Any]:
        """Send *command* with every other one issued in this turn of the event loop, in
        one pipeline: one write and one read for all of them (under load, concurrent
        requests share a round trip; alone, a request pays one loop turn)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._batch.append((command, fut))
        if len(self._batch) == 1:
            loop.call_soon(self._send_batch)
        return fut

    def _touch_later(self, key: str, ttl_ms: int) -> None:
        """Renew *key*'s expiry to *ttl_ms* with the next batch of the request path, or
        within :data:`TOUCH_SECONDS` by itself (nobody waits for the answer). Touches of one
        key in between go as one: each sets the expiry from when it runs, so a touch sent
        late keeps the key alive a little longer, never shorter."""
        if not self._touches:
            self._touch_timer = asyncio.get_running_loop().call_later(
                TOUCH_SECONDS, self._flush_touches
            )
        self._touches[key] = ttl_ms

    def _flush_touches(self) -> None:
        self._touch_timer = None
        if self._touches and not self._batch:  # else the batch due this turn takes them
            self._send_batch()

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        if self._touches:
            touches, self._touches = self._touches, {}
            if self._touch_timer is not None:
                self._touch_timer.cancel()
                self._touch_timer = None
            batch += [(("PEXPIRE", k, ttl), None) for k, ttl in touches.items()]
        t = asyncio.get_running_loop().create_task(self.link.send(batch))
        if not t.done():  # written at once unless connecting or the socket is full
            self._sending.add(t)
            t.add_done_callback(self._sending.discard)

    def _resolve(
        self, command: tuple[Any, ...], fut: asyncio.Future[Any] | None, reply: Any
    ) -> None:
        """A reply of the link: to the command's future; a script Redis lost (it
        restarted) is loaded again and the command sent again, once."""
        if fut is None or fut.done():
            return
        if isinstance(reply, NoScriptError) and fut not in self._retried:
            t = asyncio.get_running_loop().create_task(self._reload(command, fut))
            self._sending.add(t)
            t.add_done_callback(self._sending.discard)
        else:
            resolve(command, fut, reply)

    def _round_trip(self, seconds: float) -> None:
        if self.rtt_observer is not None:
            self.rtt_observer(seconds)

    async def _reload(self, command: tuple[Any, ...], fut: asyncio.Future[Any]) -> None:
        try:
            await self.redis.script_load(self._scripts[command[1]].script)
            again = self._command(*command)
            self._retried.add(again)
            try:
                reply = await again
            finally:
                self._retried.discard(again)
        except Exception as e:
            reply = e
        resolve(command, fut, reply)

    def _send_later(self, *command: Any) -> None:
        """Queue a write nobody waits for (dropped while Redis is unreachable)."""
        if self.up and not self._stopping:
            self._outbox.put_nowait(command)

    async def _write_out(self) -> None:
        """Send the queued writes in order, all that are waiting in one pipeline."""
        while True:
            self._outbox.put_nowait(await self._outbox.get())  # wait for one, keep it
            try:
                await self._send_outbox()
            except _ERRORS as e:
                self._failed(e)
            except Exception as e:  # a bad command: drop it, keep the writer alive
                log.warning("datorus: redis write dropped: %s", e)

    async def _send_outbox(self) -> None:
        batch = []
        while not self._outbox.empty():
            batch.append(self._outbox.get_nowait())
        if not batch or not self.up:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in batch:
                pipe.execute_command(*command)
            await pipe.execute()

    def _begin(self) -> None:
        self._ops += 1
        self._no_ops.clear()

    def _end(self) -> None:
        self._ops -= 1
        if self._ops == 0:
            self._no_ops.set()

    # -- rate and tunnels ------------------------------------------------------------------

    async def take(
        self,
        cred: CredentialState,
        tunnel_key: str | None,
        now: float,
        session_id: str | None = None,
    ) -> Take:
        """GCRA and the tunnel cap in one script on Redis's clock (*now*, monotonic, is
        used only by the fallback), and the sticky session's pin read in the same step
        (not kept alive: :meth:`touch_session`)."""
        acc = cred.account
        if self.up:
            keys = [f"{self.prefix}rl:{cred.id}"]
            args: list[Any] = [
                acc.rps,
                acc.burst,
                math.ceil((acc.burst + 1) / acc.rps * 1000) + 1000,
                0 if session_id is None else 1,
            ]
            if session_id is not None:
                keys.append(self._session_key(acc.id, session_id))
            if tunnel_key is not None:
                keys.append(self._tun_key(acc.id))
                args += [self._member(tunnel_key), acc.max_tunnels, self.lease_seconds]
            try:
                res = await self._call(self._take, keys, args)
            except _ERRORS as e:
                self._failed(e)
            else:
                allowed, debt0, at0, rnow, count, taken, pinned = res
                g = self._mirror.get(cred.id)
                if g is None or g.burst != acc.burst or g.rate != float(acc.rps):
                    g = self._mirror[cred.id] = Gcra(acc.rps, acc.burst)
                g.debt, g.at = float(debt0), float(at0)
                self.clock = float(rnow)
                v = g.take(self.clock)  # the script's decision, replayed for its fields
                self._offset = self.clock - time.monotonic()
                read = session_id is not None and bool(allowed)
                egress = None if pinned is None else int(pinned)
                if tunnel_key is None:
                    return Take(v, session=egress, session_read=read)
                if taken:
                    self._opened(acc, tunnel_key)
                return Take(v, int(count), bool(taken), egress, read)
        return self._take_locally(cred, tunnel_key, now)

    def _take_locally(self, cred: CredentialState, tunnel_key: str | None, now: float) -> Take:
        """This worker's 1/N share of the limits, while Redis is unreachable."""
        acc = cred.account
        n = self.workers
        burst = max(1, acc.burst // n)
        g = self._fallback.get(cred.id)
        if g is None or g.burst != burst or g.rate != acc.rps / n:
            g = self._fallback[cred.id] = Gcra(acc.rps / n, burst)
        v = g.take(now)
        if tunnel_key is None:
            return Take(v)
        mine = len(self._tunnels.get(acc.id, ()))
        if not v.allowed or mine >= max(1, acc.max_tunnels // n):
            return Take(v, mine, False)
        self._opened(acc, tunnel_key)
        return Take(v, mine, True)

    def _opened(self, acc: AccountState, tunnel_key: str) -> None:
        self._tunnels.setdefault(acc.id, {})[tunnel_key] = None
        acc.tunnels.setdefault(tunnel_key, None)  # the flow's context replaces it when admitted

    def peek(self, cred: CredentialState, now: float) -> Verdict:
        """The limiter as Redis last answered for *cred* (its fallback's while down)."""
        acc = cred.account
        if self.up:
            g = self._mirror.get(cred.id)
            if g is not None:
                return g.peek(now + self._offset)
            return Gcra(acc.rps, acc.burst).peek(now)
        g = self._fallback.get(cred.id)
        return (g or Gcra(acc.rps, acc.burst)).peek(now)

    def tunnel_closed(self, account: AccountState, tunnel_key: str) -> None:
        """Free the slot (``ZREM`` in the background; a lost one lapses with its lease)."""
        account.tunnels.pop(tunnel_key, None)
        mine = self._tunnels.get(account.id)
        if mine is None or tunnel_key not in mine:
            return
        del mine[tunnel_key]
        if not mine:
            del self._tunnels[account.id]
        if self.up:
            self._send_later("ZREM", self._tun_key(account.id), self._member(tunnel_key))

    async def _renew_tunnels(self) -> None:
        """Extend the lease of every tunnel slot this worker holds (also re-adds them)."""
        keys: list[str] = []
        members: list[str] = []
        for aid, mine in self._tunnels.items():
            zkey = self._tun_key(aid)
            for k in mine:
                keys.append(zkey)
                members.append(self._member(k))
        if keys:
            await self._renew(keys=keys, args=[self.lease_seconds, *members])

    # -- failed logins -----------------------------------------------------------------

    async def login_failed(self, peer: str, now: float) -> float:
        """Count the failure in Redis (locally while it is unreachable)."""
        s = self.settings
        limit, block = s["auth_fail_limit"], s["auth_block_seconds"]
        if self.up:
            try:
                res = await self._call(
                    self._login, [f"{self.prefix}lf:{peer}"], [limit, block, WINDOW]
                )
            except _ERRORS as e:
                self._failed(e)
            else:
                return float(res)
        return self.logins.record(peer, now, limit, block)

    # -- byte credit -----------------------------------------------------------------------

    def credit(self, cred: CredentialState) -> int:
        """Bytes this worker may still reserve for *cred* without claiming."""
        acc = cred.account
        return max(0, min(acc.granted - acc.inflight, cred.granted - cred.inflight))

    def _held_for(self, key: str, state: State) -> _Held:
        h = self._held.get(key)
        if h is None:
            h = self._held[key] = _Held(key)
        if not any(o.state is state for o in h.holders):
            h.holders.append(_Holder(state, quiet_since=time.monotonic()))
        _no_credit_yet(state)
        return h

    async def claim(
        self, cred: CredentialState, nbytes: int, need: int = 0, trial: bool = False
    ) -> int:
        """Claim at least :data:`BLOCK` bytes (or what *nbytes* still needs) within the
        account's and the credential's rooms, and trial credit first out of the bytes
        held; returns :meth:`credit` afterwards (the credit already held, unchanged,
        while Redis is unreachable).

        A claim that leaves less than *need* bytes (or, with *trial*, no trial credit
        beyond what flows reserved) while other workers hold or spent something there
        *pulls*: it asks them to give back what they hold idle at once (see
        :meth:`_pull`) and claims again. If it is still short, the account or credential
        is dry for the gateway as a whole: what the others held or charged beyond this
        worker's snapshot goes to ``paid_elsewhere`` / ``used_elsewhere`` (so that a
        refusal tells the gateway's balance), and the ledger is read again soon.

        Claims for one credential go one at a time: a claim that finds another under way
        waits for it and sends its own only if that did not make room for *nbytes*.
        While the snapshot in use is too old to count with (see :meth:`adopt`) or this
        worker's fields are being written again, waits up to :data:`WAIT_SECONDS` for
        that to pass (never while Redis is out of reach)."""
        under_way = self._claims.get(cred.id)
        if under_way is not None:
            await asyncio.shield(under_way)
            if self.credit(cred) >= nbytes and not (trial and _no_trial(cred.account)):
                return self.credit(cred)
        done = asyncio.get_running_loop().create_future()
        self._claims[cred.id] = done
        try:
            return await self._claim_fresh(cred, nbytes, need, trial)
        finally:
            if self._claims.get(cred.id) is done:
                del self._claims[cred.id]
            done.set_result(None)

    async def _claim_fresh(self, cred: CredentialState, nbytes: int, need: int, trial: bool) -> int:
        """Claim with a snapshot fit to count with, pulling once if short."""
        acc = cred.account
        deadline = time.monotonic() + WAIT_SECONDS
        pulled = False
        for _ in range(4):
            if not await self._usable(deadline):
                return self.credit(cred)
            got = await self._claim_once(cred, nbytes)
            if got is None:
                continue  # a worker left since the snapshot: read it again, claim again
            if got is False:
                return self.credit(cred)
            if self.credit(cred) >= need and not (trial and _no_trial(acc)):
                acc.paid_elsewhere = 0
                cred.used_elsewhere = 0
                return self.credit(cred)
            if got.holders and not pulled:
                pulled = True
                keys = [f"{self.prefix}cr:a:{acc.id}", f"{self.prefix}tr:a:{acc.id}"]
                if cred.max_bytes is not None:
                    keys.append(f"{self.prefix}cr:c:{cred.id}")
                await self._pull(keys, got.holders)
                continue
            # dry for the gateway: count what the others hold or spent, read again soon
            acc.paid_elsewhere = max(0, got.others - got.others_trial)
            cred.used_elsewhere = got.others_cap
            if got.others > 0 or got.others_cap > 0:
                self.refresh_wanted = True
            return self.credit(cred)
        return self.credit(cred)

    async def _usable(self, deadline: float) -> bool:
        """Wait (until *deadline*) for this worker's fields to be in Redis and for a
        snapshot fit to count with; False at once while Redis is out of reach or this
        worker stops, and after *deadline*."""
        while True:
            if not self.up or self._stopping:
                if not self._stopping:
                    self._wake.set()
                return False
            if not self.synced:
                event = self._synced
            elif not self._snapshot_ok():
                self.snapshot_wanted = True
                self._fresh.clear()
                event = self._fresh
            else:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)

    def _snapshot_ok(self) -> bool:
        t = self._token
        return not self.snapshot_wanted and t is not None and t[0] == self.epoch

    async def _claim_once(
        self, cred: CredentialState, nbytes: int
    ) -> _Grant | Literal[False] | None:
        """One claim: what it granted, None when the snapshot turned out too old (read
        it again), False when nothing was decided (Redis failed, restarted, or a restart
        is being settled)."""
        acc = cred.account
        ha = self._held_for(f"{self.prefix}cr:a:{acc.id}", acc)
        ha.trial_key = f"{self.prefix}tr:a:{acc.id}"
        hc = self._held_for(f"{self.prefix}cr:c:{cred.id}", cred)
        have = self.credit(cred)
        if not (self.up and self.synced) or self._stopping:
            if not self._stopping:
                self._wake.set()
            return False
        want = max(nbytes - have, BLOCK)
        debt_a, debt_c = max(0, -acc.granted), max(0, -cred.granted)
        assert self._token is not None
        args: list[Any] = [self.worker, self.epoch or "", want, debt_a, debt_c, self._token[1]]
        args += [min(acc.ledger_allowance, _MAX_LUA), len(acc.flushed)]
        for w, n in acc.flushed.items():
            args += [w, n]
        if cred.max_bytes is None:
            args += [0, 0, 0]
        else:
            args += [1, max(min(cred.ledger_room, _MAX_LUA), -_MAX_LUA), len(cred.flushed)]
            for w, n in cred.flushed.items():
                args += [w, n]
        # the paid credit held may turn into trial credit (trial is spent first)
        paid_held = max(0, max(acc.granted, 0) - max(acc.trial, 0))
        args += [max(min(acc.ledger_trial, _MAX_LUA), -_MAX_LUA), paid_held]
        args.append(len(acc.flushed_trial))
        for w, n in acc.flushed_trial.items():
            args += [w, n]
        keys = [ha.key, hc.key, self.k_wk, self.k_epoch, self.k_hb, self.k_settle, ha.trial_key]
        self._begin()
        try:
            res = await self._call(self._claim_script, keys, args)
        except _ERRORS as e:
            self._failed(e)
            return False
        finally:
            self._end()
        g = int(res[0])
        self._settling = g == -4
        if self._settling:
            return False  # a restart is being settled: nothing granted yet
        if g == -3:
            self.snapshot_wanted = True  # a worker left since the snapshot: read it again
            return None
        if g < 0:
            self._stale("Redis restarted" if g == -1 else "this worker's heartbeat lapsed")
            return False
        gt = int(res[1])
        ha.claimed += g + debt_a
        acc.granted += g + debt_a
        hc.claimed += g + debt_c
        cred.granted += g + debt_c
        ha.trial_claimed += gt
        _add_trial(acc, gt)
        return _Grant(
            g, gt, int(res[5]), int(res[6]), int(res[7]), tuple(_text(w) for w in res[8:])
        )

    async def _pull(self, keys: list[str], holders: tuple[str, ...]) -> None:
        """Ask the other workers to give back at once what they hold idle of *keys*
        (their flows' reservations stay theirs), and wait up to :data:`PULL_SECONDS` for
        every one of *holders* to say it did (:meth:`_answer`).

        Credit given back only when idle would otherwise strand: a flow on this worker
        would be cut while another worker holds the account's last bytes, unused."""
        self._pull_seq += 1
        pid = f"{self.worker}#{self._pull_seq}"
        done = asyncio.Event()
        self._pulls[pid] = (set(holders), done)
        try:
            body = json.dumps({"want": keys, "id": pid, "w": self.worker})
            await self._command("PUBLISH", self.k_news, body)
            await asyncio.wait_for(done.wait(), PULL_SECONDS)
        except _ERRORS as e:
            if not isinstance(e, asyncio.TimeoutError):
                self._failed(e)
        finally:
            del self._pulls[pid]

    def _answer(self, msg: dict[str, Any]) -> None:
        """Another worker pulls: give back what this one holds idle of the keys it
        names, then tell it (in the background: this runs in the news subscriber)."""
        keys = set(msg["want"])
        if not (self.up and self.synced) or self._stopping:
            return
        if not any(k in self._held or k in self._trial_keys() for k in keys):
            return

        async def give() -> None:
            try:
                await self._give_back(force=True, only=keys)
                if self.up:
                    body = json.dumps({"gave": msg["id"], "w": self.worker})
                    await self._command("PUBLISH", self.k_news, body)
            except _ERRORS as e:
                self._failed(e)

        t = asyncio.get_running_loop().create_task(give())
        self._answers.add(t)
        t.add_done_callback(self._answers.discard)

    def _trial_keys(self) -> set[str]:
        return {h.trial_key for h in self._held.values() if h.trial_key is not None}

    async def _give_back(self, force: bool = False, only: set[str] | None = None) -> None:
        """Give back the credit held beyond what flows reserved, of accounts and
        credentials quiet for :data:`IDLE_SECONDS` (all of it with *force*; only the
        hashes named in *only*, if given), and fold in any bytes charged beyond the
        claims (a negative ``granted``). An account's trial credit held beyond its
        bytes goes back with them (a worker never holds more trial than bytes)."""
        now = time.monotonic()
        keys: list[str] = []
        amounts: list[int] = []
        for h in self._held.values():
            if only is not None and h.key not in only and h.trial_key not in only:
                continue
            amount = trial = 0
            for o in h.holders:
                st = o.state
                sig = (st.granted, st.inflight)
                if sig != o.sig:
                    o.sig, o.quiet_since = sig, now
                spare = st.granted - st.inflight
                if st.granted < 0 or (
                    spare > 0 and (force or now - o.quiet_since >= self.idle_seconds)
                ):
                    give = spare if spare > 0 else st.granted
                    st.granted -= give
                    amount += give
                    o.sig = (st.granted, st.inflight)
                if h.trial_key is not None and isinstance(st, AccountState):
                    extra = st.trial - max(st.granted, 0)
                    if extra > 0:
                        _add_trial(st, -extra)
                        trial += extra
            if len(h.holders) > 1:  # forget replaced objects once they hold nothing
                last = h.holders[-1]
                h.holders = [
                    o for o in h.holders if o is last or o.state.granted or o.state.inflight
                ]
            if amount:
                h.claimed -= amount
                keys.append(h.key)
                amounts.append(amount)
            if trial and h.trial_key is not None:
                h.trial_claimed -= trial
                keys.append(h.trial_key)
                amounts.append(trial)
        if not keys:
            return
        self._begin()
        try:
            res = await self._give(
                keys=[self.k_epoch, self.k_hb, *keys],
                args=[self.worker, self.epoch or "", *amounts],
            )
        except _ERRORS as e:
            self._failed(e)  # the re-assert writes the mirror, which already has the give-back
            return
        finally:
            self._end()
        if int(res) < 0:
            self._stale("Redis restarted" if int(res) == -1 else "this worker's heartbeat lapsed")

    # -- the configuration version -------------------------------------------------------

    async def seen_version(self, version: int) -> None:
        """Record that this worker read configuration *version* (call it after reading a
        snapshot, before applying it): :meth:`catch_up` compares with the newest."""
        if not self.up:
            return
        try:
            await self._version(keys=[self.k_version], args=[version, VERSION_MS])
        except _ERRORS as e:
            self._failed(e)

    async def catch_up(self, rt: Runtime) -> None:
        """Before a refusal decided on this worker's view: when another worker has read
        a newer configuration (a top-up, a new credential...), read it too, waiting up
        to :data:`WAIT_SECONDS`. A version no ledger read reaches (Redis kept it from
        another ledger) is waited for once."""
        if not (self.up and self.synced) or self._stopping:
            return
        try:
            raw = await self._command("GET", self.k_version)
        except _ERRORS as e:
            self._failed(e)
            return
        if raw is None:
            return
        newest = int(raw)
        if newest <= max(rt.version, self._caught_up):
            return
        self.refresh_wanted = True
        deadline = time.monotonic() + WAIT_SECONDS
        try:
            while rt.version < newest:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._adopted.wait(), left)
        finally:
            self._caught_up = max(self._caught_up, newest)

    # -- sessions ----------------------------------------------------------------------

    def _session_key(self, account_id: int, session_id: str) -> str:
        return f"{self.prefix}s:{account_id}:{session_id}"

    async def session(
        self, account_id: int, session_id: str, now: float, touch: bool = True
    ) -> int | None:
        """The shared pin (kept alive when *touch*), or the local table's while down."""
        if self.up:
            key = self._session_key(account_id, session_id)
            try:
                if touch:
                    ttl_ms = int(self.sessions.ttl * 1000)
                    raw = await self._command("GETEX", key, "PX", ttl_ms)
                else:
                    raw = await self._command("GET", key)
            except _ERRORS as e:
                self._failed(e)
            else:
                return None if raw is None else int(raw)
        t = self.sessions
        return t.get(account_id, session_id, now) if touch else t.peek(account_id, session_id, now)

    def touch_session(self, account_id: int, session_id: str, now: float) -> None:
        """Keep alive in Redis (with the next batch, nobody waits) a session whose pin
        :meth:`take` read and the route used; in the local table while Redis is down."""
        if self.up and not self._stopping:
            ttl_ms = int(self.sessions.ttl * 1000)
            self._touch_later(self._session_key(account_id, session_id), ttl_ms)
        else:
            self.sessions.get(account_id, session_id, now)

    def pin_session(self, account_id: int, session_id: str, egress_id: int, now: float) -> None:
        """Pin in Redis (in the background) and in the local table."""
        self.sessions.put(account_id, session_id, egress_id, now)
        if self.up:
            key = self._session_key(account_id, session_id)
            self._send_later("SET", key, egress_id, "PX", int(self.sessions.ttl * 1000))

    def sweep(self, now: float) -> None:
        """Drop idle sessions of the local fallback table (Redis expires its own)."""
        self.sessions.sweep(now)

    # -- news --------------------------------------------------------------------------

    def announce_block(self, news: BlockNews) -> None:
        """Publish a block judgement (dropped while Redis is unreachable)."""
        self._publish(
            {
                "block": {
                    "egress_id": news.egress_id,
                    "domain": news.domain,
                    "strikes": news.strikes,
                    "seconds": news.seconds,
                }
            }
        )

    def announce_lease(self, news: LeaseNews) -> None:
        """Publish a lease taken or released (dropped while Redis is unreachable)."""
        lease = news.lease
        self._publish(
            {
                "lease": None
                if lease is None
                else [lease.id, lease.account_id, lease.egress_id, lease.until],
                "ended": news.ended,
            }
        )

    def _publish(self, body: dict[str, Any]) -> None:
        if self.up:
            body["w"] = self.worker
            self._send_later("PUBLISH", self.k_news, json.dumps(body))

    def _deliver(self, data: bytes) -> None:
        """Hand one message of another worker to the listener (or answer a pull)."""
        msg = json.loads(data)
        if msg.get("w") == self.worker:
            return
        if "gave" in msg:
            pull = self._pulls.get(msg["gave"])
            if pull is not None:
                pull[0].discard(msg["w"])
                if not pull[0]:
                    pull[1].set()
            return
        if "want" in msg:
            self._answer(msg)
            return
        if self.listener is None:
            return
        if "block" in msg:
            b = msg["block"]
            self.listener.on_block(
                BlockNews(b["egress_id"], b["domain"], b["strikes"], b["seconds"])
            )
        else:
            lease = msg.get("lease")
            self.listener.on_lease(
                LeaseNews(None if lease is None else Lease(*lease), msg.get("ended"))
            )

    async def _subscribe(self) -> None:
        """Receive the other workers' news, reconnecting after a failure."""
        while True:
            client = aredis.Redis.from_url(
                self.url, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0)
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.k_news)
                while True:
                    m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if m is not None and m.get("type") == "message":
                        try:
                            self._deliver(m["data"])
                        except Exception as e:  # a bad message or listener: log, go on
                            log.warning("datorus: redis news not applied: %s", e)
            except Exception:
                pass  # the supervisor logs Redis going away; subscribe again below
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(PROBE_SECONDS)

    # -- sync: epoch, heartbeat, re-assert -------------------------------------------------

    async def _resync(self) -> None:
        """(Re)join: read or set the epoch, write this worker's fields from its mirror,
        renew its tunnel slots. Raises on a Redis error."""
        await self.redis.ping()
        self.up = True
        # no credit script may be in flight while the fields are overwritten
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_ops.wait(), TIMEOUT * 4)
        e, created = await self._epoch_script(keys=[self.k_epoch], args=[secrets.token_hex(8)])
        epoch = _text(e)
        restarted = self.epoch is not None and epoch != self.epoch
        if restarted:
            log.warning(
                "datorus: redis %s restarted empty: re-asserting this worker's claims;"
                " no byte credit granted for %.0f s",
                self.url,
                self.settle_seconds,
            )
        self.epoch = epoch
        if restarted:
            self.snapshot_wanted = True  # workers that died meanwhile left no trace
        for h in self._held.values():  # bytes charged beyond the claims count as claimed
            for o in h.holders:
                if o.state.granted < 0:
                    h.claimed -= o.state.granted
                    o.state.granted = 0
        keys = [self.k_epoch, self.k_hb, self.k_workers, self.k_wk, self.k_settle]
        args: list[Any] = [self.worker, epoch, self.heartbeat_ms]
        args += [int(self.settle_seconds * 1000) if restarted else 0, 0]
        for h in self._held.values():
            keys.append(h.key)
            args.append(h.claimed)
            if h.trial_key is not None:
                keys.append(h.trial_key)
                args.append(h.trial_claimed)
        if await self._reassert(keys=keys, args=args) != 1:
            raise RedisError("the epoch changed during the re-assert")
        await self._renew_tunnels()
        self.synced = True
        self._synced.set()
        if self.down_since is not None:
            log.warning(
                "datorus: redis %s reachable again after %.1f s",
                self.url,
                time.monotonic() - self.down_since,
            )
        self.down_since = None
        self.last_error = None

    async def _supervise(self) -> None:
        """Probe while Redis is unreachable or this worker is out of sync; refresh the
        heartbeat while all is well."""
        next_beat = time.monotonic() + self.heartbeat_seconds
        while True:
            if not (self.up and self.synced):
                try:
                    await self._resync()
                except _ERRORS as e:
                    self._failed(e)
                    self._wake.clear()
                    await asyncio.sleep(PROBE_SECONDS)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_beat - time.monotonic()))
            if time.monotonic() < next_beat:
                continue  # woken: a failure to handle
            next_beat = time.monotonic() + self.heartbeat_seconds
            try:
                res = await self._heartbeat(
                    keys=[self.k_epoch, self.k_hb, self.k_workers],
                    args=[self.worker, self.epoch or "", self.heartbeat_ms],
                )
            except _ERRORS as e:
                self._failed(e)
                continue
            if int(res) < 0:
                self._stale(
                    "Redis restarted" if int(res) == -1 else "this worker's heartbeat lapsed"
                )

    async def _housekeep(self) -> None:
        """Give back idle credit every second, renew tunnel slots every 20 s, reap dead
        workers every 5 s."""
        now = time.monotonic()
        next_renew, next_reap = now + self.renew_seconds, now + self.reap_seconds
        while True:
            await asyncio.sleep(self.give_back_seconds)
            if not (self.up and self.synced):
                continue
            try:
                await self._give_back()
                now = time.monotonic()
                if now >= next_renew:
                    next_renew = now + self.renew_seconds
                    await self._renew_tunnels()
                if now >= next_reap:
                    next_reap = now + self.reap_seconds
                    await self.reap()
            except _ERRORS as e:
                self._failed(e)
            except Exception as e:  # the ledger's: keep the rows to delete for next time
                log.warning("datorus: reaping dead workers' ledger rows failed: %s", e)

    async def reap(self) -> list[str]:
        """Free the credit of dead workers (heartbeat gone); returns the ones this call
        reaped. Safe with any number of reapers at once: the script removes a worker's
        fields and membership in one step, and only the caller that did so reports it."""
        members = [_text(m) for m in await self.redis.smembers(self.k_workers)]
        reaped: list[str] = []
        for w in members:
            if w == self.worker:
                continue
            p = self.prefix
            keys = [f"{p}hb:{w}", f"{p}wk:{w}", self.k_workers, self.k_reaps]
            if await self._reap(keys=keys, args=[w]):
                reaped.append(w)
        if reaped:
            log.info("datorus: reaped dead workers %s (their held credit is free)", reaped)
            self._forget.update(reaped)
        await self._forget_rows()
        return reaped

    async def _forget_rows(self) -> None:
        """Delete the ledger rows of reaped workers, once they are out of Redis.

        Never before: a worker still in a hash with its rows deleted would count its
        flushed bytes twice (in the balance and in ``t[w]`` with nothing flushed to set
        against them), and if Redis failed in between, that would withhold credit until
        Redis came back. Redis first, rows second only ever leaves harmless rows behind
        (a worker missing from every hash is not counted, whatever its rows say).
        """
        if self._forget and self.ledger is not None:
            gone = sorted(self._forget)
            await self.ledger.forget_workers(gone)
            self._forget.difference_update(gone)


def _no_trial(acc: AccountState) -> bool:
    """Whether *acc* holds no trial credit beyond what its flows reserved (the test of
    ``Runtime.admit``)."""
    return acc.trial - acc.inflight <= 0


def _add_trial(acc: AccountState, n: int) -> None:
    """Move *n* bytes of trial credit into (or, negative, out of) *acc*, and its
    allowance with it (trial plus what the balance buys: ``AccountState.recompute``;
    the trial credit held is never negative)."""
    acc.trial += n
    acc.allowance += n


def _no_credit_yet(state: State) -> None:
    """An account or credential the in-process view gave unlimited credit (and, for an
    account, the ledger's trial) holds none of either here until it claims some."""
    if state.granted >= UNLIMITED // 2:
        state.granted = 0
        if isinstance(state, AccountState):
            _add_trial(state, -max(state.trial, 0))
            state.trial = 0


def _text(value: bytes | str) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else value


if TYPE_CHECKING:  # mypy: it is a HotState
    _: HotState = RedisHotState({}, "redis://")
