"""The Redis hot state (issue 15) against a real redis-server: limits, credit and news hold
for several workers together, and Redis failing or restarting loses nothing.

Each test runs two (or more) ``RedisHotState`` instances on one Redis, each with its own
``Runtime``, as two workers of ``datorus serve`` would; the ones that need a worker to die
run it as a process of its own and ``kill -9`` it.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from hypothesis import given, settings
from hypothesis import strategies as st
from support.redis_server import RedisServer

from datorus_core import pricing
from datorus_core.hotstate.base import BlockNews, LeaseNews
from datorus_core.hotstate.redis_state import BLOCK, RedisHotState, room
from datorus_core.ledger import accounts, money, open_ledger
from datorus_core.ledger.gateway import LedgerLink
from datorus_core.live import Lease
from datorus_core.ratelimit import Gcra
from datorus_core.runtime import Runtime

SETTINGS: dict[str, Any] = {
    "price_cents_per_gb": 300,
    "rps": 1000,
    "burst": 1000,
    "max_tunnels": 10,
    "max_overdraft_cents": 0,
    "min_balance_cents": 0,
    "session_ttl": 600,
    "max_sessions": 1000,
    "auth_fail_limit": 3,
    "auth_block_seconds": 30,
}
MiB = 1 << 20
WORKER_SCRIPT = Path(__file__).resolve().parent.parent / "support" / "redis_worker.py"


def restart_empty(server: RedisServer) -> None:
    """kill -9 the redis-server and start another on the same port: nothing it held is left."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(10)
    server.logf.close()
    server.start()


class Recorder:
    """The listener side of news: what this worker was told."""

    def __init__(self) -> None:
        self.blocks: list[BlockNews] = []
        self.leases: list[LeaseNews] = []

    def on_block(self, news: BlockNews) -> None:
        self.blocks.append(news)

    def on_lease(self, news: LeaseNews) -> None:
        self.leases.append(news)


def account_row(
    trial: int = 0,
    nanocents: int = 0,
    rps: int = 1000,
    burst: int = 1000,
    max_tunnels: int = 10,
    price: int = 300,
) -> tuple[Any, ...]:
    return (1, "active", price, rps, burst, max_tunnels, trial, nanocents, 1)


class Worker:
    """One worker's runtime and shared hot state; its snapshot is given or read from a ledger."""

    def __init__(
        self,
        url: str,
        prefix: str,
        name: str,
        acc: tuple[Any, ...] | None = None,
        max_bytes: int | None = None,
        link: LedgerLink | None = None,
        workers: int = 2,
    ) -> None:
        self.rt = Runtime(dict(SETTINGS))
        self.hot = RedisHotState(self.rt.settings, url, prefix, worker=name, workers=workers)
        self.hot.heartbeat_ms, self.hot.heartbeat_seconds = 1500, 0.2
        self.hot.settle_seconds, self.hot.reap_seconds = 0.5, 0.3
        self.hot.idle_seconds, self.hot.give_back_seconds = 0.3, 0.1
        self.link = link
        self.hot.ledger = link
        self.acc_row = acc or account_row()
        self.max_bytes = max_bytes
        self.version = 1  # the configuration version a given snapshot carries
        self.news = Recorder()

    async def start(self) -> Worker:
        await self.hot.start(self.news)
        await self.reload()
        return self

    async def reload(self) -> None:
        """What the gateway's ledger task does: token, snapshot, apply, adopt."""
        token = await self.hot.before_snapshot()
        if self.link is not None:
            *snap, rows = await self.link.snapshot_shared()
            self.rt.apply_snapshot(*snap, worker_usage=rows)
        else:
            creds = [(7, 1, "dtuser", "hash", self.max_bytes, 0)]
            self.rt.apply_snapshot([self.acc_row], creds, [], self.version)
        self.hot.adopt(self.rt, token)

    @property
    def cred(self):
        return next(iter(self.rt.by_username.values()))

    async def claim_all(self) -> int:
        """Claim until nothing more is granted; the bytes granted in all."""
        total = 0
        while True:
            before = self.hot.credit(self.cred)
            after = await self.hot.claim(self.cred, BLOCK)
            if after == before:
                return total
            total += after - before

    async def spend(self, nbytes: int) -> int:
        """Reserve and charge up to *nbytes* of the credit held (a finished flow)."""
        got = self.rt.reserve(self.cred, nbytes)
        self.rt.settle(self.cred, got, 0, got)
        return got

    async def flush(self) -> None:
        assert self.link is not None
        await self.link.write(self.rt.take_batch())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def eventually(pred: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """Await until *pred()* (sync or async) is truthy, within *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def prefix_of(request: pytest.FixtureRequest) -> str:
    return f"t{abs(hash(request.node.name)) % 10**8}:"


# -- rate limits and tunnels --------------------------------------------------------------


def test_gcra_lets_exactly_burst_through_a_burst_on_two_workers(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        acc = account_row(rps=1, burst=10)
        a = await Worker(redis_server.url, p, "a", acc).start()
        b = await Worker(redis_server.url, p, "b", acc).start()
        takes = [w.hot.take(w.cred, None, 0.0) for _ in range(20) for w in (a, b)]
        verdicts = [t.verdict for t in await asyncio.gather(*takes)]
        assert sum(v.allowed for v in verdicts) == 10
        refused = [v for v in verdicts if not v.allowed]
        assert all(v.limit == 10 and v.remaining == 0 and v.retry_after > 0 for v in refused)
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_gcra_verdicts_are_those_of_ratelimit_gcra_on_redis_clock(redis_server, request):
    """The same arithmetic: a local Gcra fed the same instants gives the same verdicts."""

    async def main() -> None:
        p = prefix_of(request)
        acc = account_row(rps=1000, burst=4)
        a = await Worker(redis_server.url, p, "a", acc).start()
        b = await Worker(redis_server.url, p, "b", acc).start()
        local = Gcra(1000, 4)
        seen = []
        for i in range(400):  # alternating workers, one at a time: Redis's order is known
            w = (a, b)[i % 2]
            t = await w.hot.take(w.cred, None, 0.0)
            seen.append((t.verdict, local.take(w.hot.clock)))
        assert all(got == want for got, want in seen)
        assert {v.allowed for v, _ in seen} == {True, False}  # both sides were exercised
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_open_tunnels_are_capped_across_workers_and_a_closed_one_frees_its_slot(
    redis_server, request
):
    async def main() -> None:
        p = prefix_of(request)
        acc = account_row(max_tunnels=3)
        a = await Worker(redis_server.url, p, "a", acc).start()
        b = await Worker(redis_server.url, p, "b", acc).start()
        got = [await a.hot.take(a.cred, "c1", 0.0), await a.hot.take(a.cred, "c2", 0.0)]
        got.append(await b.hot.take(b.cred, "c3", 0.0))
        assert [(t.tunnel, t.open_tunnels) for t in got] == [(True, 0), (True, 1), (True, 2)]
        refused = await b.hot.take(b.cred, "c4", 0.0)
        assert (refused.tunnel, refused.open_tunnels, refused.verdict.allowed) == (False, 3, True)
        a.hot.tunnel_closed(a.cred.account, "c1")
        assert "c1" not in a.cred.account.tunnels
        t = await eventually(
            lambda: _take_tunnel(b, "c4"), what="the closed tunnel's slot to come free"
        )
        assert t.open_tunnels == 2
        await a.hot.stop()
        await b.hot.stop()

    run(main())


async def _take_tunnel(w: Worker, key: str):
    t = await w.hot.take(w.cred, key, 0.0)
    return t if t.tunnel else None


def test_a_refused_rate_takes_no_tunnel_slot(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        a = await Worker(redis_server.url, p, "a", account_row(rps=1, burst=1)).start()
        assert (await a.hot.take(a.cred, None, 0.0)).verdict.allowed
        t = await a.hot.take(a.cred, "c1", 0.0)
        assert (t.verdict.allowed, t.tunnel, t.open_tunnels) == (False, False, 0)
        r = redis_sync.Redis.from_url(redis_server.url)
        assert r.zcard(f"{p}tun:1") == 0
        await a.hot.stop()

    run(main())


def test_scripts_lost_by_redis_are_loaded_again(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        a = await Worker(redis_server.url, p, "a", account_row(trial=10 * MiB)).start()
        assert (await a.hot.take(a.cred, None, 0.0)).verdict.allowed
        redis_sync.Redis.from_url(redis_server.url).script_flush()
        takes = await asyncio.gather(*(a.hot.take(a.cred, None, 0.0) for _ in range(5)))
        assert all(t.verdict.allowed for t in takes) and a.hot.up
        assert await a.hot.claim(a.cred, 1) == MiB
        await a.hot.stop()

    run(main())


# -- failed logins, sessions, news ------------------------------------------------------


def test_failed_logins_block_past_the_limit_counted_across_workers(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        a = await Worker(redis_server.url, p, "a").start()
        b = await Worker(redis_server.url, p, "b").start()
        assert await a.hot.login_failed("10.0.0.9", 0.0) == 0
        assert await b.hot.login_failed("10.0.0.9", 0.0) == 0
        assert await a.hot.login_failed("10.0.0.9", 0.0) == 0
        blocked = await b.hot.login_failed("10.0.0.9", 0.0)  # the 4th: past the limit of 3
        assert 29 < blocked <= 30
        assert 29 < await a.hot.login_failed("10.0.0.9", 0.0) <= 30
        assert await a.hot.login_failed("10.0.0.10", 0.0) == 0  # another address
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_sticky_sessions_are_shared_and_expire_after_the_ttl(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        a = await Worker(redis_server.url, p, "a").start()
        b = await Worker(redis_server.url, p, "b").start()
        assert await b.hot.session(1, "s1", 0.0) is None
        a.hot.pin_session(1, "s1", 42, 0.0)
        assert await eventually(lambda: b.hot.session(1, "s1", 0.0), what="the pin") == 42
        r = redis_sync.Redis.from_url(redis_server.url)
        key = f"{p}s:1:s1"
        assert 599_000 < r.pttl(key) <= 600_000
        r.pexpire(key, 100_000)
        assert await b.hot.session(1, "s1", 0.0, touch=False) == 42
        assert r.pttl(key) <= 100_000  # a peek keeps the expiry
        assert await b.hot.session(1, "s1", 0.0) == 42
        assert r.pttl(key) > 599_000  # a touch renews it
        b.hot.pin_session(1, "s1", 43, 0.0)  # re-pin
        assert await eventually(lambda: _is(a.hot.session(1, "s1", 0.0), 43), what="re-pin")
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_the_rate_limit_round_trip_reads_the_session_and_a_used_pin_is_kept_alive(
    redis_server, request
):
    async def main() -> None:
        p = prefix_of(request)
        a = await Worker(redis_server.url, p, "a", account_row(rps=1, burst=1)).start()
        t = await a.hot.take(a.cred, None, 0.0, "s1")
        assert t.verdict.allowed and t.session_read and t.session is None  # not pinned yet
        a.hot.pin_session(1, "s1", 42, 0.0)
        r = redis_sync.Redis.from_url(redis_server.url)
        key = f"{p}s:1:s1"
        await eventually(lambda: r.get(key) == b"42", what="the pin")
        r.pexpire(key, 100_000)
        a.rt.accounts[1].rps = a.rt.accounts[1].burst = 1000
        t = await a.hot.take(a.cred, "c1", 0.0, "s1")  # a tunnel's take reads it too
        assert (t.tunnel, t.session_read, t.session) == (True, True, 42)
        assert r.pttl(key) <= 100_000  # read, not kept alive: the request may be refused yet
        a.hot.touch_session(1, "s1", 0.0)  # the route used the pin
        await eventually(lambda: r.pttl(key) > 599_000, what="the touch, with a batch or alone")
        a.rt.accounts[1].rps, a.rt.accounts[1].burst = 1, 1
        t = await a.hot.take(a.cred, None, 0.0, "s1")
        assert not t.verdict.allowed and not t.session_read  # refused: routing never asks
        await a.hot.stop()

    run(main())


def test_commands_in_flight_fail_fast_when_redis_goes_and_come_back_with_it(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        a = await Worker(redis_server.url, p, "a").start()
        assert (await a.hot.take(a.cred, None, 0.0, "s1")).session_read
        redis_server.stop()
        t0 = time.monotonic()
        takes = await asyncio.gather(*(a.hot.take(a.cred, None, 0.0, "s1") for _ in range(5)))
        assert time.monotonic() - t0 < 0.6 and not a.hot.up
        assert all(t.verdict.allowed and not t.session_read for t in takes)  # local shares
        redis_server.start()
        await eventually(lambda: a.hot.synced, what="recovery")
        assert (await a.hot.take(a.cred, None, 0.0, "s1")).session_read  # a new connection
        await a.hot.stop()

    run(main())


async def _is(coro: Any, want: Any) -> bool:
    return await coro == want


def test_news_reaches_the_other_workers_and_not_the_sender(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        a = await Worker(redis_server.url, p, "a").start()
        b = await Worker(redis_server.url, p, "b").start()
        c = await Worker(redis_server.url, p, "c").start()
        await eventually(lambda: _subscribed(redis_server, p, 3), what="every subscriber")
        a.hot.announce_block(BlockNews(5, "example.com", 2, 30.0))
        lease = Lease("ls" + "0" * 24, 1, 5, 1_800_000_000)
        a.hot.announce_lease(LeaseNews(lease=lease))
        a.hot.announce_lease(LeaseNews(ended=lease.id))
        for w in (b, c):
            await eventually(lambda w=w: len(w.news.leases) == 2, what="news to arrive")
            assert w.news.blocks == [BlockNews(5, "example.com", 2, 30.0)]
            assert w.news.leases == [LeaseNews(lease=lease), LeaseNews(ended=lease.id)]
        b.hot.announce_block(BlockNews(6, "example.org", 1, 0.0))  # after a's own news
        await eventually(lambda: a.news.blocks, what="b's news at a")
        assert a.news.blocks == [BlockNews(6, "example.org", 1, 0.0)] and a.news.leases == []
        for w in (a, b, c):
            await w.hot.stop()

    run(main())


def _subscribed(server: RedisServer, p: str, n: int) -> bool:
    r = redis_sync.Redis.from_url(server.url)
    return r.pubsub_numsub(f"{p}news")[0][1] == n


# -- byte credit ----------------------------------------------------------------------


def test_room_of_a_snapshot_example():
    assert room(100, {"w1": 30}, {"w1": 50, "w2": 10}) == 70
    assert room(100, {}, {}) == 100


@settings(max_examples=400, deadline=None)
@given(
    trial=st.integers(0, 5_000_000),
    cents=st.integers(0, 3),
    overdraft=st.integers(0, 2),
    price=st.integers(1, 10**5),
    script=st.lists(
        st.tuples(
            st.sampled_from(["claim", "spend", "flush", "snapshot", "give"]),
            st.integers(0, 2),  # worker
            st.integers(0, 3_000_000),
        ),
        max_size=80,
    ),
)
def test_room_is_exact_whatever_the_age_of_the_snapshot(trial, cents, overdraft, price, script):
    """A model of three workers and the ledger, claiming as the CLAIM script does: bytes
    within the byte room, trial first out of the bytes held within the trial room, and
    charges split from the trial credit each worker holds (never its view of the
    ledger's trial). Every snapshot ever taken gives the rooms the newest one gives (the
    balance, the trial and the flushed bytes move together); the trial charged never
    passes the trial, the balance never goes below the overdraft floor, and the bytes
    charged never pass the first allowance."""
    floor = -overdraft * pricing.NANOCENTS_PER_CENT
    ledger = {"trial": trial, "nc": cents * pricing.NANOCENTS_PER_CENT}
    flushed: dict[str, int] = {}  # bytes each worker flushed (worker_usage.bytes)
    flushed_t: dict[str, int] = {}  # of which trial (worker_usage.trial_bytes)
    claimed: dict[str, int] = {}  # the byte hash
    claimed_t: dict[str, int] = {}  # the trial hash
    held = [0, 0, 0]  # bytes credit a worker holds (AccountState.granted)
    held_t = [0, 0, 0]  # of which trial credit (AccountState.trial, shared)
    pending = [[0, 0, 0] for _ in range(3)]  # charged, unflushed: bytes, trial, nanocents

    def snap() -> tuple[int, dict[str, int], int, dict[str, int]]:
        allowance = max(ledger["trial"], 0) + pricing.affordable_bytes(ledger["nc"], floor, price)
        return allowance, dict(flushed), ledger["trial"], dict(flushed_t)

    first = snap()
    snapshots = [first]
    charged = charged_trial = charged_nc = 0
    newest, newest_t = first[0], trial
    for op, i, n in script:
        w = f"w{i}"
        if op == "claim":
            a, f, t, ft = snapshots[-1] if n % 2 else snapshots[0]  # any snapshot will do
            g = max(0, min(n, room(a, f, claimed)))
            gt = max(0, min(room(t, ft, claimed_t), g + held[i] - held_t[i]))
            claimed[w] = claimed.get(w, 0) + g
            claimed_t[w] = claimed_t.get(w, 0) + gt
            held[i] += g
            held_t[i] += gt
        elif op == "spend":  # Runtime.reserve then settle: within the credit held
            k = min(n, held[i])
            c = pricing.charge(k, held_t[i], price)
            held[i] -= k
            held_t[i] -= c.trial_bytes
            for j, v in enumerate((k, c.trial_bytes, c.nanocents)):
                pending[i][j] += v
            charged += k
            charged_trial += c.trial_bytes
            charged_nc += c.nanocents
        elif op == "flush":  # one transaction: balance, trial and worker_usage
            b, bt, nc = pending[i]
            ledger["trial"] -= bt
            ledger["nc"] -= nc
            flushed[w] = flushed.get(w, 0) + b
            flushed_t[w] = flushed_t.get(w, 0) + bt
            pending[i] = [0, 0, 0]
        elif op == "give":  # give back n bytes of the credit held; trial beyond it follows
            k = min(n, held[i])
            held[i] -= k
            kt = max(0, held_t[i] - held[i])
            held_t[i] -= kt
            claimed[w] = claimed.get(w, 0) - k
            claimed_t[w] = claimed_t.get(w, 0) - kt
        else:
            snapshots.append(snap())
        assert all(0 <= held_t[j] <= held[j] for j in range(3))
        a, f, t, ft = snap()
        newest, newest_t = room(a, f, claimed), room(t, ft, claimed_t)
        assert all(room(sa, sf, claimed) == newest for sa, sf, _, _ in snapshots)
        assert all(room(st_, sft, claimed_t) == newest_t for _, _, st_, sft in snapshots)
        assert charged + sum(held) <= first[0]
        assert charged_trial + sum(held_t) <= trial
        assert cents * pricing.NANOCENTS_PER_CENT - charged_nc >= floor
    assert newest == first[0] - charged - sum(held)
    assert newest_t == trial - charged_trial - sum(held_t)


def test_trial_is_claimed_apart_and_no_two_workers_spend_the_same_trial(redis_server, request):
    """Issue 15's trial over-use: each worker charged trial from its own view of the
    ledger's trial. Now trial credit is claimed first out of the bytes claimed, and a
    worker charges as trial only the trial credit it holds."""

    async def main() -> None:
        p = prefix_of(request)
        # 5,000 trial bytes and a cent, which buys 100,000 bytes at 10,000 cents/GB
        acc = account_row(trial=5000, nanocents=pricing.NANOCENTS_PER_CENT, price=10**4)
        a = Worker(redis_server.url, p, "a", acc)
        a.hot.idle_seconds = 60.0  # a keeps what it claims unless pulled
        await a.start()
        b = Worker(redis_server.url, p, "b", acc)
        b.hot.idle_seconds = 60.0
        await b.start()
        paid = 100_000
        assert a.cred.account.trial == 0 and a.cred.account.granted == 0  # none held yet
        assert await a.hot.claim(a.cred, 1000) == 5000 + paid
        assert a.cred.account.trial == 5000  # the whole trial, first
        assert await b.hot.claim(b.cred, 1000) == 0  # a holds all the bytes
        assert await a.spend(3000) == 3000
        assert a.rt.batch.accounts[1][1] == -3000  # trial bytes charged
        # a gives back what it does not hold for flows; b claims it: 2,000 trial bytes
        await a.hot._give_back(force=True)
        assert a.cred.account.trial == 0 and a.cred.account.granted == 0
        assert await b.hot.claim(b.cred, 1000) == 2000 + paid
        assert b.cred.account.trial == 2000
        assert await b.spend(2500) == 2500
        trial_b, nc_b = b.rt.batch.accounts[1][1], b.rt.batch.accounts[1][0]
        assert (trial_b, nc_b) == (-2000, -500 * 10**4)  # trial first, then paid
        r = redis_sync.Redis.from_url(redis_server.url)
        assert r.hgetall(f"{p}tr:a:1") == {b"a": b"3000", b"b": b"2000"}
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_a_short_claim_pulls_what_another_worker_holds_idle(redis_server, request):
    """Credit one worker holds idle is asked back at once by a claim that needs it (a
    flow would otherwise be cut with the account's last bytes unused elsewhere)."""

    async def main() -> None:
        p = prefix_of(request)
        acc = account_row(trial=3 * MiB)
        a = Worker(redis_server.url, p, "a", acc)
        a.hot.idle_seconds = 60.0  # it would keep its credit for a minute
        await a.start()
        b = await Worker(redis_server.url, p, "b", acc).start()
        await eventually(lambda: _subscribed(redis_server, p, 2), what="both subscribed")
        assert await a.claim_all() == 3 * MiB
        assert await a.spend(MiB) == MiB  # charged: stays a's
        assert a.rt.reserve(a.cred, 1000) == 1000  # reserved by a flow: stays a's too
        t0 = time.monotonic()
        assert await b.hot.claim(b.cred, BLOCK, need=1) == MiB  # out of what a held idle
        assert time.monotonic() - t0 < 0.4  # asked for, not waited out
        assert a.cred.account.granted == 1000 and a.cred.account.trial == 1000
        assert b.cred.account.trial == MiB  # trial came back with the bytes
        assert await b.hot.claim(b.cred, 2 * BLOCK, need=1) == 2 * MiB - 1000  # the rest
        # nothing left to pull (a's flow holds its 1,000 bytes): what b holds, at once
        t0 = time.monotonic()
        assert await b.hot.claim(b.cred, 3 * BLOCK, need=3 * MiB) == 2 * MiB - 1000
        assert time.monotonic() - t0 < 0.4
        assert b.cred.account.paid_elsewhere == 0  # a's 2 MiB were trial
        assert b.cred.used_elsewhere == 0  # no cap
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_a_dry_claim_counts_what_the_other_workers_spent(redis_server, request, tmp_path):
    """When a claim finds the account or the credential dry, the refusal tells the
    gateway's balance and bytes used, not only this worker's view."""

    async def main() -> None:
        p = prefix_of(request)
        path = _ledger(tmp_path, cents=1, max_bytes=2_000_000, price=10**4)
        links = [LedgerLink(path), LedgerLink(path)]
        for link in links:
            await link.open()
        a = await Worker(redis_server.url, p, "a", link=links[0]).start()
        b = await Worker(redis_server.url, p, "b", link=links[1]).start()
        await eventually(lambda: _subscribed(redis_server, p, 2), what="both subscribed")
        paid = 100_000  # what the cent buys at 10,000 cents/GB
        assert await a.hot.claim(a.cred, 1, need=1) == paid
        assert await a.spend(paid) == paid  # all of it, not flushed
        assert await b.hot.claim(b.cred, 1, need=1) == 0
        acc_b = b.cred.account
        assert acc_b.paid_elsewhere == paid and b.cred.used_elsewhere == paid
        assert b.hot.refresh_wanted  # its view misses a's usage: read the ledger soon
        err = b.rt.dry_error(b.cred, 0)
        assert err.code == "INSUFFICIENT_BALANCE"
        assert err.details["currentBalanceNanocents"] == 0  # what a spent, seen from b
        assert err.details["currentBalanceCents"] == 0
        await a.flush()
        await b.reload()  # the ledger now holds a's usage: the view alone says it
        assert acc_b.paid_elsewhere == 0 and b.cred.used_elsewhere == 0
        assert b.rt.dry_error(b.cred, 0).details == err.details
        await a.hot.stop()
        await b.hot.stop()
        for link in links:
            await link.close()

    run(main())


def test_a_refusal_waits_for_a_newer_configuration_another_worker_read(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        a = await Worker(redis_server.url, p, "a").start()
        b = await Worker(redis_server.url, p, "b").start()
        await a.hot.seen_version(7)  # a read version 7 (a top-up, say); b still has 1
        catching = asyncio.ensure_future(b.hot.catch_up(b.rt))
        await eventually(lambda: b.hot.refresh_wanted, what="b asked to read the ledger")
        assert not catching.done()
        b.version = 7
        await b.reload()
        await asyncio.wait_for(catching, 1.0)
        await a.hot.seen_version(6)  # never lowers it
        r = redis_sync.Redis.from_url(redis_server.url)
        assert r.get(f"{p}version") == b"7"
        # a version no ledger read reaches (Redis kept it from another ledger) costs one
        # wait, not one per refusal
        r.set(f"{p}version", 9)
        t0 = time.monotonic()
        await b.hot.catch_up(b.rt)
        assert 0.9 < time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        await b.hot.catch_up(b.rt)
        assert time.monotonic() - t0 < 0.2
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_two_workers_claiming_at_once_never_exceed_the_allowance(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        acc = account_row(trial=5_000_000)
        a = await Worker(redis_server.url, p, "a", acc).start()
        b = await Worker(redis_server.url, p, "b", acc).start()
        await asyncio.gather(*(w.claim_all() for w in (a, b, a, b, a, b)))  # all at once
        # exactly the allowance, nothing past it
        assert a.cred.account.granted + b.cred.account.granted == 5_000_000
        assert await a.hot.claim(a.cred, 1) == a.hot.credit(a.cred)  # nothing more
        assert a.hot.reachable()  # the account is dry: a 402, not a 503
        # what the flows reserve is bounded by the credit
        assert a.rt.reserve(a.cred, 10**9) == a.cred.account.granted
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_claims_of_one_worker_at_once_make_one_round_trip(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        a = await Worker(redis_server.url, p, "a", account_row(trial=100 * MiB)).start()
        got = await asyncio.gather(*(a.hot.claim(a.cred, 1000) for _ in range(50)))
        assert got == [MiB] * 50  # one claim of a block; the other 49 waited for it
        assert a.cred.account.granted == MiB
        got = await asyncio.gather(*(a.hot.claim(a.cred, 2 * MiB) for _ in range(3)))
        assert got == [2 * MiB] * 3  # one claim of what was missing made room for all three
        await a.hot.stop()

    run(main())


def test_a_credential_cap_holds_across_workers(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        acc = account_row(trial=50_000_000)
        a = await Worker(redis_server.url, p, "a", acc, max_bytes=3_000_000).start()
        b = await Worker(redis_server.url, p, "b", acc, max_bytes=3_000_000).start()
        got = await asyncio.gather(a.claim_all(), b.claim_all())
        assert sum(got) == 3_000_000
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_idle_credit_goes_back_and_the_other_worker_can_claim_it(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        acc = account_row(trial=3 * MiB)
        a = Worker(redis_server.url, p, "a", acc)
        a.hot.idle_seconds = 2.0  # a keeps its credit while b claims
        await a.start()
        b = await Worker(redis_server.url, p, "b", acc).start()
        assert await a.claim_all() == 3 * MiB
        assert await b.claim_all() == 0
        await a.spend(MiB // 2)
        # a reserved nothing more for idle_seconds: what it holds beyond inflight goes back
        await eventually(lambda: a.cred.account.granted == 0, what="the give-back")
        # a lowers its own count first, then tells Redis: b can claim once Redis has it
        r = redis_sync.Redis.from_url(redis_server.url)
        given = str(MiB // 2).encode()
        await eventually(lambda: r.hget(f"{p}cr:a:1", "a") == given, what="the give-back in Redis")
        assert await b.claim_all() == 3 * MiB - MiB // 2
        assert r.hgetall(f"{p}cr:a:1") == {b"a": str(MiB // 2).encode(), b"b": b"2621440"}
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def _ledger(
    tmp: Path, trial: int = 0, cents: int = 0, max_bytes: int | None = None, price: int = 300
) -> str:
    path = str(tmp / "ledger.db")
    db = open_ledger(path)
    aid = accounts.create_account(db, "a@example.com", trial, price)["id"]
    if cents:
        money.add_balance(db, aid, cents)
    accounts.create_credential(db, aid, max_bytes)
    db.close()
    return path


def test_flushes_and_snapshots_of_any_age_keep_the_credit_exact(redis_server, request, tmp_path):
    async def main() -> None:
        p = prefix_of(request)
        path = _ledger(tmp_path, trial=10_000_000)
        links = [LedgerLink(path), LedgerLink(path)]
        for link in links:
            await link.open()
        a = Worker(redis_server.url, p, "a", link=links[0])
        a.hot.idle_seconds = 2.0  # a keeps its credit while b claims
        await a.start()
        b = await Worker(redis_server.url, p, "b", link=links[1]).start()
        assert await a.hot.claim(a.cred, 1) == MiB
        assert await a.spend(600_000) == 600_000
        await a.flush()  # the ledger now holds a's 600,000 bytes; b's snapshot predates it
        assert await b.claim_all() == 10_000_000 - MiB
        await b.reload()  # a newer snapshot: lower balance, a's flushed bytes: same room
        assert b.cred.account.flushed == {"a": 600_000}
        assert b.cred.account.ledger_allowance == 10_000_000 - 600_000
        assert await b.claim_all() == 0
        await eventually(lambda: a.cred.account.granted == 0, what="a's idle credit back")
        await b.claim_all()  # b may have given back its own idle credit meanwhile too
        assert b.cred.account.granted == 10_000_000 - 600_000  # all that is left, no more
        assert a.rt.batch.worker == "a"
        await a.hot.stop()
        await b.hot.stop()
        for link in links:
            await link.close()

    run(main())


def test_a_killed_worker_is_reaped_its_credit_tunnels_and_rows_freed(
    redis_server, request, tmp_path
):
    async def main() -> None:
        p = prefix_of(request)
        path = _ledger(tmp_path, trial=10_000_000)
        link = LedgerLink(path)
        await link.open()
        proc = subprocess.Popen(
            [
                sys.executable,
                str(WORKER_SCRIPT),
                redis_server.url,
                p,
                path,
                str(3 * MiB),
                "1000",
                "2",
            ],
            stdout=subprocess.PIPE,
        )
        try:
            line = await asyncio.to_thread(proc.stdout.readline)
            dead = json.loads(line)
            b = Worker(redis_server.url, p, "b", link=link)
            b.hot.reap_seconds = 0.2
            b.hot.idle_seconds = 60.0  # b holds what it claims
            await b.start()
            r = redis_sync.Redis.from_url(redis_server.url)
            assert r.zcard(f"{p}tun:1") == 2  # the doomed worker's two tunnel slots
            assert await b.claim_all() == 10_000_000 - 3 * MiB
        finally:
            proc.kill()
            proc.wait()
        # its heartbeat lapses (2 s), b's reaper frees its fields, then its ledger rows
        await eventually(lambda: r.hget(f"{p}cr:a:1", dead["worker"]) is None, what="the reap")
        await eventually(lambda: _rows(path) == [], what="its ledger rows deleted")
        # b's snapshot is older than the dead worker's flush: b reads the ledger again
        # (claim waits for it), and the room is the allowance less the 1,000 bytes charged
        claiming = asyncio.ensure_future(b.claim_all())
        await eventually(lambda: b.hot.snapshot_wanted, what="a snapshot asked for")
        await b.reload()
        assert await claiming == 3 * MiB - 1000
        assert b.cred.account.granted == 10_000_000 - 1000
        await eventually(lambda: r.zcard(f"{p}tun:1") == 0, what="its tunnel slots to lapse")
        await b.hot.stop()
        await link.close()

    run(main())


def _rows(path: str) -> list[tuple[str, int]]:
    db = open_ledger(path)
    try:
        return [
            (r["worker"], r["bytes"]) for r in db.query("SELECT worker, bytes FROM worker_usage")
        ]
    finally:
        db.close()


def test_a_stopping_worker_gives_back_its_credit_and_removes_its_traces(
    redis_server, request, tmp_path
):
    async def main() -> None:
        p = prefix_of(request)
        path = _ledger(tmp_path, trial=5_000_000)
        links = [LedgerLink(path), LedgerLink(path)]
        for link in links:
            await link.open()
        a = await Worker(redis_server.url, p, "a", link=links[0]).start()
        b = await Worker(redis_server.url, p, "b", link=links[1]).start()
        await a.hot.take(a.cred, "c1", 0.0)
        assert await a.hot.claim(a.cred, 2 * MiB) == 2 * MiB
        await a.spend(123)
        await a.flush()
        assert _rows(path) == [("a", 123)]
        await a.hot.stop()  # after the final flush, before the ledger closes
        r = redis_sync.Redis.from_url(redis_server.url)
        assert r.hgetall(f"{p}cr:a:1") == {b"~r": b"1"}
        assert r.zcard(f"{p}tun:1") == 0 and not r.sismember(f"{p}workers", "a")
        assert _rows(path) == []
        claiming = asyncio.ensure_future(b.claim_all())
        await eventually(lambda: b.hot.snapshot_wanted, what="a snapshot asked for")
        await b.reload()
        assert await claiming == 5_000_000 - 123
        await b.hot.stop()
        for link in links:
            await link.close()

    run(main())


def test_a_redis_restart_is_detected_and_every_worker_reasserts_its_claims(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        acc = account_row(trial=10 * MiB)
        a, b = Worker(redis_server.url, p, "a", acc), Worker(redis_server.url, p, "b", acc)
        for w in (a, b):
            w.hot.settle_seconds = 2.0
            w.hot.idle_seconds = 60.0  # what they hold stays held
            await w.start()
        assert await a.hot.claim(a.cred, 3 * MiB) == 3 * MiB
        assert await b.hot.claim(b.cred, 2 * MiB) == 2 * MiB
        await a.spend(MiB)  # charged, not flushed: still claimed
        restart_empty(redis_server)  # same port, empty
        r = redis_sync.Redis.from_url(redis_server.url)
        await eventually(
            lambda: (
                r.hgetall(f"{p}cr:a:1")
                == {b"a": str(3 * MiB).encode(), b"b": str(2 * MiB).encode()}
            ),
            what="both workers' claims written again",
        )
        assert r.hgetall(f"{p}cr:c:7") == {b"a": str(3 * MiB).encode(), b"b": str(2 * MiB).encode()}
        for w in (a, b):  # the snapshot is read again after a restart
            await eventually(lambda w=w: w.hot.synced and w.hot.snapshot_wanted, what="resync")
            await w.reload()
        # every worker: the held credit still usable; together, exactly the rest (once
        # the settle window, for workers to write their claims again, is over)
        assert a.rt.reserve(a.cred, 10**9) == 2 * MiB
        assert r.exists(f"{p}settle")  # no grants until every worker had time to re-assert
        assert await a.hot.claim(a.cred, MiB) == 0
        assert not a.hot.reachable()  # that 0 is "retry shortly" (503), not "dry" (402)
        await eventually(lambda: not r.exists(f"{p}settle"), what="the settle window to end")
        got = await asyncio.gather(a.claim_all(), b.claim_all())
        assert sum(got) == 10 * MiB - 5 * MiB
        assert a.hot.reachable()  # and now a 0 means the account is dry
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_redis_gone_falls_back_to_local_shares_and_recovers_on_its_own(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        acc = account_row(trial=10 * MiB, rps=1, burst=10, max_tunnels=5)
        a = await Worker(redis_server.url, p, "a", acc).start()
        b = await Worker(redis_server.url, p, "b", acc).start()
        assert await a.hot.claim(a.cred, MiB) == MiB
        a.hot.pin_session(1, "s1", 42, 0.0)
        await eventually(lambda: _is(b.hot.session(1, "s1", 0.0), 42), what="pin")
        assert redis_server.proc is not None
        redis_server.proc.kill()
        redis_server.proc.wait(10)

        # rate: the first request notices, then this worker's half of the burst
        verdicts = [(await a.hot.take(a.cred, None, 100.0)).verdict for _ in range(7)]
        assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 2
        assert verdicts[-1].limit == 5
        assert a.hot.status()["redis"] == "unreachable"
        assert "Error" in a.hot.status()["lastError"]
        # tunnels: at most max_tunnels // 2 opened by this worker
        tunnels = [await b.hot.take(b.cred, f"c{i}", 200.0 + i) for i in range(3)]
        assert [t.tunnel for t in tunnels] == [True, True, False]
        # credit: nothing new, what is held stays usable
        assert await a.hot.claim(a.cred, 5 * MiB) == MiB
        assert await b.hot.claim(b.cred, MiB) == 0
        assert not b.hot.reachable()
        assert a.rt.reserve(a.cred, 10 * MiB) == MiB
        # logins and sessions: local
        assert [await a.hot.login_failed("10.1.1.1", 0.0) for _ in range(4)] == [0, 0, 0, 30]
        assert await a.hot.session(1, "s1", 0.0) == 42  # pinned here: in the local table
        assert await b.hot.session(1, "s1", 0.0) is None
        a.hot.announce_block(BlockNews(1, "x.example", 1, 1.0))  # dropped, no error

        redis_server.logf.close()
        redis_server.start()  # a new, empty Redis on the same port
        for w in (a, b):
            await eventually(lambda w=w: w.hot.status()["redis"] == "connected", what="back")
            await eventually(lambda w=w: w.hot.synced and w.hot.snapshot_wanted, what="resync")
            await w.reload()
        assert a.hot.status()["lastError"] is None
        r = redis_sync.Redis.from_url(redis_server.url)
        assert r.hget(f"{p}cr:a:1", "a") == str(MiB).encode()
        assert r.zcard(f"{p}tun:1") == 2  # b's tunnels opened meanwhile are counted again
        await eventually(lambda: not r.exists(f"{p}settle"), what="the settle window to end")
        got = await asyncio.gather(a.claim_all(), b.claim_all())
        assert sum(got) == 9 * MiB
        assert (await b.hot.take(b.cred, "c9", 0.0)).verdict.allowed
        await a.hot.stop()
        await b.hot.stop()

    run(main())


def test_a_hung_redis_costs_a_request_at_most_its_timeout(redis_server, request):
    async def main() -> None:
        p = prefix_of(request)
        a = await Worker(redis_server.url, p, "a", account_row(trial=10 * MiB)).start()
        assert await a.hot.claim(a.cred, MiB) == MiB
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)  # a hung Redis: connected, silent
        try:
            t0 = time.monotonic()
            v = (await a.hot.take(a.cred, None, 0.0)).verdict
            assert v.allowed and time.monotonic() - t0 < 0.6
            t0 = time.monotonic()
            assert await a.hot.claim(a.cred, 2 * MiB) == MiB
            assert time.monotonic() - t0 < 0.1  # already known to be down: no round trip
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: a.hot.synced, what="recovery without a restart")
        assert not a.hot.snapshot_wanted  # same Redis, same epoch: the snapshot still holds
        assert await a.hot.claim(a.cred, 2 * MiB) == 2 * MiB
        await a.hot.stop()

    run(main())


# -- the ledger's side ----------------------------------------------------------------


def test_the_ledger_records_what_each_worker_flushed_with_its_usage(tmp_path):
    async def main() -> None:
        path = _ledger(tmp_path, trial=2200, cents=2, max_bytes=5_000_000)
        link = LedgerLink(path)
        await link.open()
        rt = Runtime(dict(SETTINGS))
        *snap, rows = await link.snapshot_shared()
        assert rows == []
        rt.apply_snapshot(*snap, worker_usage=rows)
        cred = next(iter(rt.by_username.values()))
        acc = cred.account
        assert acc.ledger_allowance == 2200 + 2 * pricing.NANOCENTS_PER_CENT // 300
        assert cred.ledger_room == 5_000_000 and acc.flushed == {} and cred.flushed == {}
        rt.settle(cred, 300, 700, 0)
        await link.write(rt.take_batch())  # one process: no worker, no worker_usage row
        assert _rows(path) == []
        rt.worker = "w1"
        rt.settle(cred, 1000, 1000, 0)
        assert rt.batch.worker is None  # the batch under way predates the stamp
        rt.batch.worker = "w1"
        await link.write(rt.take_batch())
        rt.settle(cred, 0, 500, 0)
        failed = rt.take_batch()
        assert failed.worker == "w1"
        rt.restore_batch(failed)  # a failed write keeps its stamp
        assert rt.batch.worker == "w1"
        await link.write(rt.take_batch())
        assert _rows(path) == [("w1", 2500)]
        rt.settle(cred, 0, 1, 0)  # pending: not in the ledger's own allowance
        *snap, rows = await link.snapshot_shared()
        # of w1's 2,500 bytes, the 1,200 trial bytes the first 1,000 had left
        assert rows == [("w1", cred.id, acc.id, 2500, 1200)]
        rt.apply_snapshot(*snap, worker_usage=rows)
        assert acc.flushed == {"w1": 2500} and cred.flushed == {"w1": 2500}
        assert acc.flushed_trial == {"w1": 1200} and acc.ledger_trial == 0
        assert cred.ledger_room == 5_000_000 - 3500
        paid = 3500 - 2200
        assert acc.ledger_allowance == (2 * pricing.NANOCENTS_PER_CENT - paid * 300) // 300
        assert acc.allowance == acc.ledger_allowance - 1  # the runtime's own counts pending
        await link.forget_workers(["w1"])
        assert _rows(path) == []
        await link.close()

    run(main())


def test_clock_constant_keeps_redis_time_fine_grained():
    # seconds since ORIGIN as a double: sub-microsecond resolution for a century
    assert math.ulp(100 * 365 * 86400.0) < 1e-6
