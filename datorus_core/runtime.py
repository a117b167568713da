"""The gateway's in-memory view of the ledger, and the metering arithmetic.

Pure state and decisions: no mitmproxy, no database handle. The ledger task loads
snapshots into :class:`Runtime` and writes :class:`UsageBatch` es out; the addons
call :meth:`Runtime.admit`, :meth:`Runtime.reserve` and :meth:`Runtime.settle`.

Money discipline: an account's ``nanocents`` and ``trial`` here always equal the
ledger's cached balance plus the usage not yet flushed (the current batch). Bytes
of flows still in progress are *reserved* (``inflight``) against the account's
*allowance* (trial bytes plus what the balance buys down to minus the overdraft
bound), so parallel flows of one account cannot together overspend the bound.

When workers share the hot state (``Runtime.worker`` is set), ``trial`` is instead the
trial credit this worker holds (claimed from the shared state, less what it charged as
trial): a worker spends as trial only the trial it holds, so two workers can never
both spend the same remaining trial (see ``hotstate.redis_state``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from . import pricing
from .allowlist import AllowList
from .envelope import DatorusError
from .ratelimit import Gcra

UNLIMITED = 1 << 62  # bytes: more than any account or credential will ever move


def state_unavailable(used_bytes: int | None = None) -> DatorusError:
    """The 503 of a ``datorus serve`` worker that needs byte credit while the shared
    state is out of reach: at admission, or (with *used_bytes*, what the request
    moved and is billed) when a request under way ran out of the credit it held."""
    headers = {"Retry-After": "1"}
    if used_bytes is not None:
        headers["X-Datorus-Used-Bytes"] = str(used_bytes)
    return DatorusError(
        "SERVICE_UNAVAILABLE",
        message="The gateway cannot reach its shared state; retry shortly.",
        details={"reason": "state_unavailable"},
        headers=headers,
    )


@dataclass(slots=True, eq=False)
class AccountState:
    """One account as the gateway sees it."""

    id: int
    status: str = "active"
    price: int = 0
    rps: int = 1
    burst: int = 1
    max_tunnels: int = 1
    trial: int = 0  # trial bytes left (the trial credit held, when workers share it)
    nanocents: int = 0
    topped_up: bool = False
    inflight: int = 0
    allowance: int = 0
    tunnels: dict[str, Any] = field(default_factory=dict)  # client id -> its open tunnel
    # bytes this process may reserve in all (inflight included) before it claims more
    # from the shared hot state; unlimited when nothing is shared (see hotstate.base)
    granted: int = UNLIMITED
    # the last snapshot's own view, for shared credit (see hotstate.redis_state): the
    # allowance from the ledger's balance alone (this process's pending usage left out),
    # and the bytes each worker had flushed to the ledger, summed over the credentials
    ledger_allowance: int = 0
    flushed: dict[str, int] = field(default_factory=dict)
    # likewise for the trial: the ledger's trial bytes left, and the trial bytes each
    # worker had flushed
    ledger_trial: int = 0
    flushed_trial: dict[str, int] = field(default_factory=dict)
    # paid bytes other workers held or had charged beyond what this view shows, as the
    # last claim that found the account short counted them (0 otherwise): a refusal's
    # balance is the gateway's, not this worker's
    paid_elsewhere: int = 0

    def recompute(self, floor_nanocents: int) -> None:
        """Recompute the byte allowance after a balance or price change.

        Trial bytes first, then whatever the balance buys down to *floor_nanocents* (the
        overdraft bound). Admission (:meth:`Runtime.admit`) refuses new requests of an
        account whose trial is spent and that never topped up, so for such an account
        the bound only lets a request already under way finish; what it runs past the
        trial is charged at the account's price and settled by the first top-up.
        """
        self.allowance = max(self.trial, 0) + pricing.affordable_bytes(
            self.nanocents, floor_nanocents, self.price
        )


@dataclass(slots=True, eq=False)
class CredentialState:
    """One live (unrevoked) proxy credential."""

    id: int
    account: AccountState
    username: str
    password_hash: str
    max_bytes: int | None = None
    used: int = 0
    inflight: int = 0
    limiter: Gcra | None = None
    granted: int = UNLIMITED  # as AccountState.granted, for the credential's own cap
    # as AccountState's: max_bytes less the ledger's used bytes (unlimited without a cap),
    # and the bytes each worker had flushed for this credential
    ledger_room: int = UNLIMITED
    flushed: dict[str, int] = field(default_factory=dict)
    # as AccountState.paid_elsewhere: bytes of this credential other workers held or had
    # charged beyond this view, as the last claim that found it short counted them
    used_elsewhere: int = 0

    def room(self) -> int:
        """Bytes this credential may still move under its own cap (huge without one)."""
        if self.max_bytes is None:
            return 1 << 62
        return max(0, self.max_bytes - self.used - self.inflight - self.used_elsewhere)


_DAY: list[Any] = [None, ""]  # (days since the epoch, "YYYY-MM-DD") last formatted


def utc_day(now: float | None = None) -> str:
    """``YYYY-MM-DD`` (UTC) for *now*, formatted once per day: tunnels settle per chunk."""
    n = int((time.time() if now is None else now) // 86400)
    if n != _DAY[0]:
        _DAY[0], _DAY[1] = n, time.strftime("%Y-%m-%d", time.gmtime(n * 86400))
    return cast(str, _DAY[1])


def new_batch_id() -> str:
    """A fresh usage batch id (random, 32 hex digits)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Notice:
    """An event noticed on the proxy path, to be written to the ledger in the background.

    *dedupe* makes it happen once among every gateway; with *per_topup* the account's
    newest top-up id is appended to it in the ledger (once per top-up)."""

    type: str
    account_id: int | None
    data: dict[str, Any]
    dedupe: str | None = None
    per_topup: bool = False


MAX_NOTICES = 10_000


@dataclass(slots=True)
class UsageBatch:
    """Usage waiting to be written in one ledger transaction.

    Its *id* is cut with it and kept through failed writes: the ledger writes a batch
    id once, so a batch written again after its answer was lost is not billed twice.
    """

    accounts: dict[int, list[int]] = field(default_factory=dict)  # nanocents, trial, bytes, reqs
    daily: dict[tuple[int, int, str], list[int]] = field(default_factory=dict)
    credentials: dict[int, int] = field(default_factory=dict)
    receipts: list[tuple[Any, ...]] = field(default_factory=list)
    events: int = 0
    started: float = 0.0
    # the worker that charged this usage, when workers share the hot state: the ledger
    # then also adds the credentials' bytes to that worker's worker_usage rows
    worker: str | None = None
    id: str = field(default_factory=new_batch_id)

    def merge(self, other: UsageBatch) -> None:
        """Fold *other*'s usage into this one (this one's id stays).

        Only for batches neither of which may be in the ledger already: a batch whose
        write failed may have been committed (see :meth:`Runtime.restore_batch`)."""
        for k, v in other.accounts.items():
            cur = self.accounts.setdefault(k, [0, 0, 0, 0])
            for i in range(4):
                cur[i] += v[i]
        for dk, dv in other.daily.items():
            day = self.daily.setdefault(dk, [0, 0, 0, 0, 0])
            for i in range(5):
                day[i] += dv[i]
        for k, n in other.credentials.items():
            self.credentials[k] = self.credentials.get(k, 0) + n
        self.receipts[:0] = other.receipts
        self.events += other.events
        self.started = min(self.started or other.started, other.started or self.started)


class Runtime:
    """Accounts, credentials and pending usage held by one gateway process."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.accounts: dict[int, AccountState] = {}
        self.by_username: dict[str, CredentialState] = {}
        self.verified: dict[bytes, CredentialState] = {}
        self.policy_rules: list[tuple[str, str, int | None]] = []
        # allow-listed client addresses and the live credentials they run as
        self.allowlist = AllowList()
        self.allowed_creds: dict[int, CredentialState] = {}
        self.batch = UsageBatch()
        # a batch whose write failed, kept whole with its id until a write of it succeeds
        # (the ledger then either takes it or knows it already)
        self.unwritten: UsageBatch | None = None
        self.loaded = False
        self.fresh_at = 0.0  # monotonic time of the last good read of the ledger
        self.draining = False  # a clean stop is under way: no new request starts
        self.version = -1
        self.worker: str | None = None  # stamped on every batch (set by a shared hot state)
        # events the proxy path noticed, written by the ledger task (never on a request)
        self.notices: list[Notice] = []
        # accounts whose credits.exhausted this process noticed since the last change
        self.exhausted: set[int] = set()

    # -- settings -----------------------------------------------------------------------

    @property
    def floor_nanocents(self) -> int:
        """The lowest an account's balance may be driven to (minus the overdraft bound)."""
        return -pricing.cents_to_nanocents(self.settings["max_overdraft_cents"])

    # -- snapshots ----------------------------------------------------------------------

    def apply_snapshot(
        self,
        accounts: list[tuple[Any, ...]],
        credentials: list[tuple[Any, ...]],
        policy_rules: list[tuple[str, str, int | None]],
        version: int,
        worker_usage: Sequence[tuple[str, int, int, int, int]] = (),
    ) -> None:
        """Replace the view with a fresh ledger read, keeping unflushed usage and limiter state.

        *accounts* rows: (id, status, price, rps, burst, max_tunnels, trial, nanocents,
        topped_up); *credentials* rows: (id, account_id, username, hash, max_bytes, used);
        *worker_usage* rows (read in the same transaction, when workers share the hot
        state): (worker, credential_id, account_id, bytes and trial bytes flushed by that
        worker).

        With a shared hot state (:attr:`worker` set) an account's ``trial`` is the trial
        credit this worker holds, which the snapshot leaves alone (an account new to the
        view starts with none); the ledger's trial goes to ``ledger_trial``.
        """
        s = self.settings
        floor = self.floor_nanocents
        pending, pending_cred = self._pending()
        shared = self.worker is not None
        by_account: dict[int, dict[str, int]] = {}
        trial_by_account: dict[int, dict[str, int]] = {}
        by_cred: dict[int, dict[str, int]] = {}
        for worker, wcid, waid, wbytes, wtrial in worker_usage:
            per = by_account.setdefault(waid, {})
            per[worker] = per.get(worker, 0) + wbytes
            per = trial_by_account.setdefault(waid, {})
            per[worker] = per.get(worker, 0) + wtrial
            by_cred.setdefault(wcid, {})[worker] = wbytes
        fresh: dict[int, AccountState] = {}
        for aid, status, price, rps, burst, max_tunnels, trial, nc, topped in accounts:
            acc = self.accounts.get(aid)
            if acc is None:
                acc = AccountState(aid)
                if shared:
                    acc.granted = 0  # holds no credit yet: it claims some first
            acc.status = status
            acc.price = s["price_cents_per_gb"] if price is None else price
            acc.rps = rps or s["rps"]
            acc.burst = burst or s["burst"]
            acc.max_tunnels = max_tunnels or s["max_tunnels"]
            p = pending.get(aid)
            acc.nanocents = nc + (p[0] if p else 0)
            if not shared:
                acc.trial = trial + (p[1] if p else 0)
            acc.topped_up = bool(topped)
            acc.recompute(floor)
            acc.ledger_allowance = max(trial, 0) + pricing.affordable_bytes(nc, floor, acc.price)
            acc.flushed = by_account.get(aid, {})
            acc.ledger_trial = trial
            acc.flushed_trial = trial_by_account.get(aid, {})
            acc.paid_elsewhere = 0  # counted against the previous snapshot's flushed bytes
            fresh[aid] = acc
        creds: dict[str, CredentialState] = {}
        for cid, aid, username, pw_hash, max_bytes, used in credentials:
            owner = fresh.get(aid)
            if owner is None:
                continue
            old = self.by_username.get(username)
            if old is not None and old.id == cid and old.password_hash == pw_hash:
                cred = old
                cred.account = owner
            else:
                cred = CredentialState(cid, owner, username, pw_hash)
            cred.max_bytes = max_bytes
            cred.used = used + pending_cred.get(cid, 0)
            cred.ledger_room = UNLIMITED if max_bytes is None else max_bytes - used
            cred.flushed = by_cred.get(cid, {})
            cred.used_elsewhere = 0
            if cred.limiter is None:
                cred.limiter = Gcra(owner.rps, owner.burst)
            elif (
                cred.limiter.burst != owner.burst
                or abs(cred.limiter.interval * owner.rps - 1) > 1e-9
            ):
                cred.limiter.reconfigure(owner.rps, owner.burst)
            creds[username] = cred
        if version != self.version:
            self.exhausted.clear()  # a top-up (or any change): the next refusal is news
        live_ids = {id(c) for c in creds.values()}
        self.verified = {k: c for k, c in self.verified.items() if id(c) in live_ids}
        self.accounts = fresh
        self.by_username = creds
        self.policy_rules = policy_rules
        self.version = version
        self.loaded = True

    def apply_allowed_ips(self, rows: Sequence[tuple[int, str]]) -> None:
        """Take the ledger's allow-listed client addresses ``(credential_id, cidr)``.

        Called after :meth:`apply_snapshot`: an entry of a revoked credential (or one not
        in the view) lets nobody in.
        """
        by_id = {c.id: c for c in self.by_username.values()}
        live = [(cid, cidr) for cid, cidr in rows if cid in by_id]
        self.allowlist = AllowList(live)
        self.allowed_creds = {cid: by_id[cid] for cid, _ in live}

    def allowed_credential(self, address: str | None) -> CredentialState | None:
        """The credential a request without credentials from client *address* runs as,
        or None when the address is not allow-listed (the most specific CIDR wins)."""
        cid = self.allowlist.match(address)
        return None if cid is None else self.allowed_creds.get(cid)

    # -- admission ----------------------------------------------------------------------

    def ledger_error(self, now: float) -> DatorusError | None:
        """The 503 new requests get while the ledger is out of reach for too long, or None.

        A transient ledger error (locked, busy) does not refuse traffic: the state in
        memory stays valid while it is younger than ``ledger_grace`` seconds and the
        usage not yet written stays within its bound (50 x ``flush_events``).
        """
        s = self.settings
        if now - self.fresh_at > s["ledger_grace"]:
            reason = "ledger_stale"
        elif self.pending_events >= 50 * s["flush_events"]:
            reason = "ledger_backlog"
        else:
            return None
        return DatorusError(
            "SERVICE_UNAVAILABLE",
            message="The gateway cannot reach its ledger; retry shortly.",
            details={"reason": reason},
            headers={"Retry-After": "1"},
        )

    def drain_error(self) -> DatorusError | None:
        """The 503 every new request gets while a clean stop is under way, else None."""
        if not self.draining:
            return None
        return DatorusError(
            "SERVICE_UNAVAILABLE",
            message="The gateway is restarting; retry shortly.",
            details={"reason": "draining"},
            headers={"Retry-After": "1", "Connection": "close"},
        )

    def admit(self, cred: CredentialState) -> None:
        """Raise the 402/403 (or the 503 of a stopping gateway) a request of *cred* gets
        before it starts, if any."""
        acc = cred.account
        if (stopping := self.drain_error()) is not None:
            raise stopping
        if acc.status != "active":
            raise DatorusError("ACCOUNT_SUSPENDED", details={"accountId": acc.id})
        if cred.max_bytes is not None and cred.room() <= 0:
            raise self.dry_error(cred, 0)
        if acc.trial - acc.inflight > 0:
            return
        if not acc.topped_up:
            raise self.dry_error(cred, 0)
        need = pricing.cents_to_nanocents(self.settings["min_balance_cents"])
        paid = max(0, acc.inflight - max(acc.trial, 0)) + acc.paid_elsewhere
        available = acc.nanocents - paid * acc.price
        if available < need or (need == 0 and acc.allowance - acc.inflight <= 0):
            raise self.dry_error(cred, 0)

    def dry_error(self, cred: CredentialState, used_bytes: int) -> DatorusError:
        """The 402 for a credential whose cap, trial or balance is spent.

        *used_bytes* is what the refused request itself consumed (0 when refused
        before it started; the bytes that reached the target when it ran dry on the
        way). A credential cap is ``INSUFFICIENT_BALANCE`` with ``details.cap``: the
        customer's remedy is the same (more money or another credential), and
        ``TRIAL_EXHAUSTED`` would be wrong for a paying account.

        With workers sharing the hot state, the balance and the bytes used count what
        the last short claim found other workers had charged or held
        (``paid_elsewhere``, ``used_elsewhere``; 0 in one process).
        """
        acc = cred.account
        headers = {"X-Datorus-Used-Bytes": str(used_bytes)}
        nanocents = acc.nanocents - acc.paid_elsewhere * acc.price
        balance = {
            "currentBalanceCents": pricing.whole_cents(nanocents),
            "currentBalanceNanocents": nanocents,
            "requiredCents": self.settings["min_balance_cents"],
        }
        if cred.max_bytes is not None and cred.room() <= 0:
            return DatorusError(
                "INSUFFICIENT_BALANCE",
                message="This credential's byte cap is used up.",
                details={
                    "cap": "credential",
                    "username": cred.username,
                    "maxBytes": cred.max_bytes,
                    "usedBytes": cred.used + cred.used_elsewhere,
                    **balance,
                },
                headers=headers,
            )
        code = "INSUFFICIENT_BALANCE" if acc.topped_up else "TRIAL_EXHAUSTED"
        if acc.id not in self.exhausted:
            self.note_exhausted(acc.id, code, balance["currentBalanceCents"])
        if not acc.topped_up:
            return DatorusError("TRIAL_EXHAUSTED", headers=headers)
        return DatorusError("INSUFFICIENT_BALANCE", details=balance, headers=headers)

    def note_exhausted(self, account_id: int, code: str, balance_cents: int) -> None:
        """Queue ``credits.exhausted`` for the account's first refusal for money: once per
        process until the ledger changes, once in the ledger per top-up (its dedupe key
        names the account's newest top-up)."""
        self.exhausted.add(account_id)
        if len(self.notices) < MAX_NOTICES:
            self.notices.append(
                Notice(
                    "credits.exhausted",
                    account_id,
                    {"account_id": account_id, "code": code, "balance_cents": balance_cents},
                    f"credits.exhausted:{account_id}:",
                    per_topup=True,
                )
            )

    def notice(self, notice: Notice) -> None:
        """Queue an event the gateway noticed for the ledger task to write (bounded: past
        :data:`MAX_NOTICES` unwritten, new ones are dropped)."""
        if len(self.notices) < MAX_NOTICES:
            self.notices.append(notice)

    # -- metering -----------------------------------------------------------------------

    @staticmethod
    def reserve(cred: CredentialState, nbytes: int) -> int:
        """Reserve up to *nbytes* of a flow in progress; returns how many fit.

        What fits is bounded by the account's allowance and the credential's cap,
        both net of what other flows in progress have reserved, and by the credit
        this process holds of the shared hot state (unlimited in one process).
        """
        acc = cred.account
        fit = min(
            nbytes,
            max(0, acc.allowance - acc.inflight),
            cred.room(),
            max(0, acc.granted - acc.inflight),
            max(0, cred.granted - cred.inflight),
        )
        acc.inflight += fit
        cred.inflight += fit
        return fit

    @staticmethod
    def release(cred: CredentialState, nbytes: int) -> None:
        """Drop a reservation without charging (a flow the gateway failed)."""
        cred.account.inflight -= nbytes
        cred.inflight -= nbytes

    def settle(
        self,
        cred: CredentialState,
        up: int,
        down: int,
        reserved: int,
        requests: int = 1,
        receipt: tuple[Any, ...] | None = None,
        now: float | None = None,
    ) -> pricing.Charge:
        """Charge *up*+*down* bytes to the credential's account, releasing *reserved*.

        Adds the usage to the pending batch; returns the charge (for the receipt).
        """
        acc = cred.account
        nbytes = up + down
        acc.inflight -= reserved
        cred.inflight -= reserved
        acc.granted -= nbytes  # charged bytes leave the credit (they stay claimed)
        cred.granted -= nbytes
        c = pricing.charge(nbytes, acc.trial, acc.price)
        acc.trial -= c.trial_bytes
        acc.nanocents -= c.nanocents
        acc.recompute(self.floor_nanocents)
        cred.used += nbytes
        b = self.batch
        if not b.events:
            b.started = time.monotonic()
        row = b.accounts.get(acc.id)
        if row is None:
            row = b.accounts[acc.id] = [0, 0, 0, 0]
        row[0] -= c.nanocents
        row[1] -= c.trial_bytes
        row[2] += nbytes
        row[3] += requests
        day = utc_day(now)
        key = (acc.id, cred.id, day)
        d = b.daily.get(key)
        if d is None:
            d = b.daily[key] = [0, 0, 0, 0, 0]
        d[0] += requests
        d[1] += up
        d[2] += down
        d[3] += c.trial_bytes
        d[4] += c.nanocents
        b.credentials[cred.id] = b.credentials.get(cred.id, 0) + nbytes
        if receipt is not None:
            b.receipts.append(receipt)
        b.events += 1
        return c

    def record_receipt(self, receipt: tuple[Any, ...]) -> None:
        """Add the receipt of a request that moved nothing (a refused SOCKS5 request, with
        its Datorus code) to the pending batch: no usage, no charge."""
        b = self.batch
        if not b.events:
            b.started = time.monotonic()
        b.receipts.append(receipt)
        b.events += 1

    @property
    def pending_events(self) -> int:
        """Usage events not yet written: the batch under way and an unwritten one."""
        held = self.unwritten.events if self.unwritten is not None else 0
        return self.batch.events + held

    def _pending(self) -> tuple[dict[int, list[int]], dict[int, int]]:
        """Per account and per credential, the usage not in the ledger yet."""
        if self.unwritten is None:
            return self.batch.accounts, self.batch.credentials
        both = UsageBatch()
        both.merge(self.unwritten)
        both.merge(self.batch)
        return both.accounts, both.credentials

    def take_batch(self) -> UsageBatch:
        """Hand pending usage to the writer: the unwritten batch first if there is one,
        else the batch under way (a new one starts). A write that fails hands it back
        (:meth:`restore_batch`)."""
        if self.unwritten is not None:
            batch, self.unwritten = self.unwritten, None
            return batch
        batch, self.batch = self.batch, UsageBatch(worker=self.worker)
        return batch

    def restore_batch(self, batch: UsageBatch) -> None:
        """Keep a batch whose write failed, whole and with its id, to be written first.

        It is not merged into the batch under way: the write may have committed with
        only its answer lost, and its id is how the ledger knows when it is written again.
        """
        assert self.unwritten is None, "one unwritten batch at a time"
        self.unwritten = batch
