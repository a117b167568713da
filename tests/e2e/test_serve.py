"""``datorus serve`` (CONTRACT section 7): N workers on one port, restarts with no request
refused. Real launcher, real mitmdump workers, real redis-server, real clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from checks import assert_envelope
from support.clients import basic, read_response
from support.counting import RawOrigin
from support.ledger import LedgerTarget, missing_ledger, new_ledger, prepare_ledger
from support.paths import REPO
from support.serve import (
    Serve,
    forget_rate_state,
    health_of_each_worker,
    owner_pid,
    serve_cmd,
    usage,
)
from support.waiting import free_port, wait_until


def _ledger(tmp_path: Path) -> LedgerTarget:
    db = new_ledger(tmp_path)
    prepare_ledger(db)
    return db


def _get(port: int, user: str, pw: str, url: str, source: str = "127.0.0.1") -> tuple:
    """One request on a new connection (from *source*): (status, headers, server pid socket)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(
        f"GET {url} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
    )
    return s, read_response(s)


def test_two_workers_share_the_proxy_and_api_ports(tmp_path, origin, redis_server):
    db = _ledger(tmp_path)
    api_port = socket.socket()
    api_port.bind(("127.0.0.1", 0))
    port = api_port.getsockname()[1]
    api_port.close()
    sv = Serve(
        db, 2, {"redis_url": redis_server.url, "api_port": port, "auth_fail_limit": 3}
    ).start()
    try:
        _, user, pw = sv.customer()
        pids = sv.worker_pids()
        assert len(pids) == 2
        # the kernel spreads new connections over both workers
        seen: Counter[int] = Counter()
        for i in range(200):
            s, (status, headers, body) = _get(sv.port, user, pw, origin.url(f"/w{i}"))
            with s:
                assert status == 200 and body == b"hello from origin"
                seen[owner_pid(s, pids)] += 1
            if len(seen) == 2 and min(seen.values()) >= 3:
                break
        assert set(seen) == pids, seen
        # so does the REST API: every worker serves it on the shared port
        api_seen: Counter[int] = Counter()
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                status, _, body = read_response(s)
                assert status == 200 and b'"gateway":true' in body
                hot = json.loads(body)["hotState"]  # each worker's state is the shared one
                assert hot["state"] == "redis" and hot["redis"] == "connected", hot
                assert hot["workers"] == 2
                api_seen[owner_pid(s, pids)] += 1
            if len(api_seen) == 2:
                break
        assert set(api_seen) == pids, api_seen

        # client addresses reach the workers unchanged: wrong passwords from 127.0.0.3
        # get that very address throttled (in a worker's log)
        def throttled() -> bool:
            s, (status, _, _) = _get(sv.port, user, "wrong", origin.url("/"), "127.0.0.3")
            s.close()
            assert status in (407, 429)
            return "throttling 127.0.0.3 after" in sv.out.read_text(errors="replace")

        wait_until(throttled, 30, 0, "127.0.0.3 throttled by a worker")
    finally:
        assert sv.stop() == 0, sv.log()[-3000:]


def test_more_than_one_worker_refuses_to_start_without_redis(tmp_path):
    db = _ledger(tmp_path)
    p = serve_cmd("--workers", "2", "--listen-host", "127.0.0.1", "--set", f"datorus_db={db}")
    assert p.returncode == 2
    assert "2 workers need a Redis URL" in p.stderr
    assert "--set datorus_redis_url=redis://127.0.0.1:6379/0" in p.stderr
    p = serve_cmd("--workers", "2", "--set", "datorus_redis_url=http://127.0.0.1:6379/0")
    assert p.returncode == 2
    assert "datorus_redis_url: must be redis://host:port/db" in p.stderr


def test_one_worker_needs_no_redis(tmp_path, origin):
    db = _ledger(tmp_path)
    sv = Serve(db, 1).start()
    try:
        acc, user, pw = sv.customer()
        r = requests.get(origin.url("/one"), proxies={"http": sv.proxy(user, pw)}, timeout=10)
        assert r.status_code == 200 and r.text == "hello from origin"
        wait_until(lambda: usage(db, acc)["requests"] == 1, 10, 0.1, "the request billed")
    finally:
        assert sv.stop() == 0, sv.log()[-3000:]


class Load:
    """*n* clients, each making requests through the proxy in a loop until stopped: half
    on a kept-alive connection, half on a new connection per request, for at most
    *limit* seconds. Every answer is kept as (sent, received, status), monotonic
    seconds; those that are not 200 whole."""

    def __init__(self, proxy: str, url: str, n: int = 10, limit: float = 300) -> None:
        self.proxy, self.url = proxy, url
        self.deadline = time.monotonic() + limit
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.answers: list[tuple[float, float, int]] = []
        self.others: list[requests.Response] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(n)]

    def client(self, i: int) -> None:
        session = requests.Session() if i % 2 == 0 else None
        proxies = {"http": self.proxy}
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            sent = time.monotonic()
            try:
                if session is not None:
                    r = session.get(self.url, proxies=proxies, timeout=30)
                else:
                    r = requests.get(
                        self.url, proxies=proxies, timeout=30, headers={"Connection": "close"}
                    )
                status = r.status_code
            except requests.RequestException as e:
                with self.lock:
                    self.errors.append(repr(e))
                continue
            with self.lock:
                self.statuses[status] += 1
                self.answers.append((sent, time.monotonic(), status))
                if status != 200:
                    self.others.append(r)

    def count(self, status: int) -> int:
        """Answers with *status* so far."""
        with self.lock:
            return self.statuses[status]

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.statuses.values()) + len(self.errors)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)


def test_sighup_under_load_refuses_nothing_and_bills_every_request(
    tmp_path,
    origin,
    redis_server,
):
    db = _ledger(tmp_path)
    sv = Serve(db, 2, {"redis_url": redis_server.url, "api_port": 0}).start()
    try:
        acc, user, pw = sv.customer(rps=100_000, burst=100_000)
        before = sv.worker_pids()
        with Load(sv.proxy(user, pw), origin.url("/load")) as load:
            wait_until(lambda: load.total >= 50, 30, 0.05, "the load running")
            t0 = time.monotonic()
            sv.signal(signal.SIGHUP)
            sv.wait_log("reload done", 120)
            took = time.monotonic() - t0
            at_reload = load.total
            # the clients go on against the new workers alone
            wait_until(lambda: load.total >= at_reload + 100, 60, 0.05, "load after the reload")
        after = sv.worker_pids()
        print(
            f"\nSIGHUP rolling restart of 2 workers: {took:.2f} s; requests {load.total},"
            f" statuses {dict(load.statuses)}, errors {len(load.errors)}"
        )
        # a refusal says why (draining, ledger, ...) and the launcher's log says when
        refused = [f"{r.status_code} {r.text[:300]}" for r in load.others]
        said = sv.log() + "".join(  # the launcher's log, then the workers' own lines
            ln for ln in sv.out.read_text(errors="replace").splitlines(True) if "datorus:" in ln
        )
        assert not load.errors, (load.errors[:5], said[-4000:])
        assert set(load.statuses) == {200}, (load.statuses, refused[:5], said[-4000:])
        assert not before & after and len(after) == 2
        assert "reload: 2 workers ready" in sv.log()
        # every request made is billed: the CLI's usage counts them all
        n = load.statuses[200]
        wait_until(lambda: usage(db, acc)["requests"] == n, 15, 0.1, f"usage = {n} requests")
    finally:
        assert sv.stop() == 0, sv.log()[-3000:]


def test_a_flood_from_many_connections_is_limited_exactly_as_one_process_limits_it(
    tmp_path, origin, redis_server
):
    """20 kept-alive connections, spread by the kernel over both workers, flood one
    credential (10 rps, burst 20) for 3 s. What passes is GCRA's count for the whole
    gateway, as one process counts it: from a full bucket, the burst, then one per
    1/rate s. With takes from the first at *a* to the last at *b* (Redis's clock), at
    most ``burst + rate * (b - a)`` pass, and with demand never pausing for burst/rate s
    (the bucket never refills to idle) more than ``burst + rate * (b' - a) - 1``, *b'*
    the last refused take. The client's clock brackets *a* and *b*: the bounds below
    are those, each widened by one for the window's edges. Everything else is 429."""
    rate, burst, seconds, clients = 10, 20, 3.0, 20
    db = _ledger(tmp_path)
    sv = Serve(db, 2, {"redis_url": redis_server.url}).start()
    try:
        _, user, pw = sv.customer(trial_bytes=10**12, rps=rate, burst=burst)
        pids = sv.worker_pids()
        # the readiness probes took from the bucket: full again, as a fresh credential's
        forget_rate_state(db, redis_server.port, user)
        req = (
            f"GET {origin.url('/flood')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n"
        ).encode()
        lock = threading.Lock()
        answers: list[tuple[float, float, int, dict[str, str], bytes, int | None]] = []
        problems: list[str] = []
        start = threading.Barrier(clients)

        def flood() -> None:
            try:
                with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as s:
                    worker = None
                    start.wait(30)
                    until = time.monotonic() + seconds
                    while time.monotonic() < until:
                        sent = time.monotonic()
                        s.sendall(req)
                        status, headers, body = read_response(s)
                        got = time.monotonic()
                        if worker is None:  # accepted by now: which worker holds it
                            worker = owner_pid(s, pids)
                        with lock:
                            answers.append((sent, got, status, headers, body, worker))
            except Exception as e:  # surfaced below
                problems.append(repr(e))

        threads = [threading.Thread(target=flood) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not problems, problems[:3]
        passed = [a for a in answers if a[2] == 200]
        refused = [a for a in answers if a[2] == 429]
        assert len(passed) + len(refused) == len(answers), Counter(a[2] for a in answers)
        n = len(passed)
        first_sent = min(a[0] for a in answers)
        first_got = min(a[1] for a in answers)
        last_got = max(a[1] for a in answers)
        last_refused_sent = max(a[0] for a in refused)
        most = burst + rate * (last_got - first_sent)
        least = burst + rate * (last_refused_sent - first_got) - 1
        sends = sorted(a[0] for a in answers)
        pause = max(b - a for a, b in zip(sends, sends[1:], strict=False))
        by_worker = Counter(a[5] for a in passed)
        print(
            f"\nflood of {clients} connections at {rate} rps, burst {burst}: {n} passed"
            f" (bounds {least:.2f}..{most:.2f}), {len(refused)} refused in"
            f" {last_got - first_sent:.2f} s; 200s by worker {dict(by_worker)};"
            f" longest pause between requests {pause:.3f} s"
        )
        assert pause < burst / rate  # demand never let the bucket refill to idle
        # a Redis answer later than 0.25 s (a loaded box) sends a worker to its local 1/N
        # share until Redis answers again (README, "When Redis fails"): the shares
        # together admit at most one more burst than the gateway's own bucket, no more
        hiccup = f"redis {redis_server.url} unreachable" in sv.out.read_text(errors="replace")
        assert least <= n <= most + 1 + (burst if hiccup else 0), f"redis hiccup: {hiccup}"
        # both workers let requests through: one limit for the gateway, not one each
        assert set(by_worker) == pids, by_worker
        assert all(body == b"hello from origin" for *_, body, _ in passed)
        for _, _, status, h, body, _ in refused:
            err = assert_envelope(status, h, body, "RATE_LIMITED", 429)
            assert err["details"] == {
                "limit": "requests_per_second",
                "rps": rate,
                "burst": burst,
                "retryAfterSeconds": 1,  # at 10 rps a slot is back within 0.1 s
            }
            assert h["retry-after"] == "1"
            assert h["x-datorus-ratelimit-limit"] == str(rate)
            assert h["x-datorus-ratelimit-remaining"] == "0"
    finally:
        assert sv.stop() == 0, sv.log()[-3000:]


def _ledger_totals(db: Path, acc: int) -> dict[str, Any]:
    """The account's receipts, usage transactions and cached balance, summed."""
    with sqlite3.connect(db) as c:
        receipts, moved, trial, charged = c.execute(
            "SELECT COUNT(*), SUM(bytes_up + bytes_down), SUM(trial_bytes), SUM(nanocents)"
            " FROM receipts WHERE account_id = ?",
            (acc,),
        ).fetchone()
        billed, nc, tb = c.execute(
            "SELECT SUM(requests), SUM(nanocents), SUM(trial_bytes) FROM transactions"
            " WHERE account_id = ?",
            (acc,),
        ).fetchone()
        cached_nc, cached_tb = c.execute(
            "SELECT nanocents, trial_bytes FROM balances WHERE account_id = ?", (acc,)
        ).fetchone()
        by_status = dict(
            c.execute(
                "SELECT status, COUNT(*) FROM receipts WHERE account_id = ? GROUP BY status",
                (acc,),
            ).fetchall()
        )
        (bytes_503,) = c.execute(
            "SELECT COALESCE(SUM(bytes_up + bytes_down), 0) FROM receipts"
            " WHERE account_id = ? AND status = 503",
            (acc,),
        ).fetchone()
    return {
        "receipts": receipts,
        "receipt_bytes": moved,
        "receipt_trial": trial,
        "receipt_nanocents": charged,
        "billed_requests": billed,
        "nanocents": nc,
        "trial_bytes": tb,
        "cached_nanocents": cached_nc,
        "cached_trial_bytes": cached_tb,
        "by_status": by_status,
        "bytes_503": bytes_503,
    }


OUTAGE = 5.0  # seconds Redis is gone (the "Done when")


@pytest.mark.parametrize("outage", ["sigstop", "restart"])
def test_redis_gone_for_5s_under_load_refuses_only_with_503_and_bills_every_200_once(
    tmp_path, redis_server, outage
):
    """README, "When Redis fails": Redis stopped (SIGSTOP: it hangs, connections stay
    open) or killed and started again empty on its port, for 5 s under 10 clients.

    The clients get 200, or the 503 the README promises once a worker's byte credit is
    spent (nothing else, nothing hangs for the outage); the workers recover by themselves;
    and the ledger bills exactly the 200s and the 503s that were cut on the way (they
    say what they moved in X-Datorus-Used-Bytes): every byte that crossed, trial first,
    then 300 nanocents a byte, with the balance the sum of the transactions.
    """
    trial, cents = 1_000_000, 100_000
    db = _ledger(tmp_path)
    api_port = free_port()
    sv = Serve(db, 2, {"redis_url": redis_server.url, "api_port": api_port}).start()
    origin = RawOrigin()
    try:
        acc, user, pw = sv.customer(
            top_up_cents=cents,
            trial_bytes=trial,
            price_cents_per_gb=300,
            rps=10**6,
            burst=10**6,
        )
        pids = sv.worker_pids()
        # 16 KiB answers: a worker's credit (at least 1 MiB) runs out within the outage
        with Load(sv.proxy(user, pw), origin.url("/bytes/16384")) as load:
            wait_until(lambda: load.count(200) >= 300, 60, 0.05, "the load running")
            down = time.monotonic()
            if outage == "sigstop":
                os.kill(redis_server.proc.pid, signal.SIGSTOP)
            else:
                redis_server.proc.kill()
                redis_server.proc.wait(10)
            try:
                # each worker notices at its next command (0.25 s at most; a busy box
                # may take longer to show it, and the outage is then that much longer)
                wait_until(
                    lambda: all(
                        h["redis"] == "unreachable"
                        for h in health_of_each_worker(api_port, pids).values()
                    ),
                    15,
                    0.05,
                    "every worker on local state",
                )
                time.sleep(max(0.0, down + OUTAGE - time.monotonic()))  # the outage itself
            finally:
                if outage == "sigstop":
                    os.kill(redis_server.proc.pid, signal.SIGCONT)
                else:
                    redis_server.start()  # on the same port, empty
            back = time.monotonic()
            print(f"\nRedis gone for {back - down:.2f} s")

            def recovered() -> bool:
                hot = health_of_each_worker(api_port, pids)
                return all(h["redis"] == "connected" and h["synced"] for h in hot.values())

            # by itself: nothing restarted, no operator step
            wait_until(recovered, 30, 0.1, "every worker on Redis again")
            healed = time.monotonic()
            # and the 200s go on after it
            after = load.count(200)
            wait_until(lambda: load.count(200) >= after + 300, 60, 0.05, "200s after it")
        assert sv.worker_pids() == pids  # no worker died or was restarted
        with load.lock:
            answers, others = list(load.answers), list(load.others)
        n = load.statuses[200]
        refused = load.statuses[503]
        slowest = max(got - sent for sent, got, _ in answers)
        # refused at admission (nothing moved, not billed), or cut on the way when the
        # credit held ran out (billed what it moved, as X-Datorus-Used-Bytes says)
        cut_bytes = [
            int(r.headers["X-Datorus-Used-Bytes"])
            for r in others
            if "X-Datorus-Used-Bytes" in r.headers
        ]
        print(
            f"\nRedis {outage} {OUTAGE:.0f} s under 10 clients: {dict(load.statuses)},"
            f" errors {len(load.errors)}; recovered {healed - back:.2f} s after it returned;"
            f" slowest answer {slowest:.2f} s; 503s cut on the way {len(cut_bytes)}"
        )
        assert not load.errors, load.errors[:5]
        assert set(load.statuses) <= {200, 503}, load.statuses
        # money fails closed: the workers' credit ran out during the outage, and the
        # requests that needed more got the promised 503
        assert refused > 0, "no 503: the outage never ran a worker's credit dry"
        for r in others:
            err = assert_envelope(r.status_code, r.headers, r.content, "SERVICE_UNAVAILABLE", 503)
            assert err["details"] == {"reason": "state_unavailable"}, err
            assert r.headers["Retry-After"] == "1"
            assert r.headers["X-Datorus-RateLimit-Limit"] == str(10**6)
        # only while Redis was gone (or, after a restart, while the workers settle:
        # SETTLE_SECONDS, 4 s)
        settle = 0.0 if outage == "sigstop" else 4.0 + 2.0
        assert all(down <= got and sent <= healed + settle for sent, got, s in answers if s == 503)
        # no request waited for Redis to come back
        assert slowest < OUTAGE / 2, slowest
        log = sv.out.read_text(errors="replace")
        assert log.count(f"redis {redis_server.url} unreachable") == 2, log[-3000:]
        assert log.count(f"redis {redis_server.url} reachable again after") == 2
        restarted = log.count(f"redis {redis_server.url} restarted empty")
        assert restarted == (2 if outage == "restart" else 0)
        # every 200 billed once (and every 503 cut on the way): by the CLI's usage
        billed = n + len(cut_bytes)
        wait_until(
            lambda: usage(db, acc)["requests"] == billed, 15, 0.1, f"usage = {billed} requests"
        )
    finally:
        assert sv.stop() == 0, sv.log()[-3000:]
        origin.close()
    u = usage(db, acc)
    moved = origin.total_in + origin.total_out
    served = sum(c["requests"] for c in origin.conns)
    t = _ledger_totals(db, acc)
    assert u["requests"] == billed == t["receipts"] == t["billed_requests"]
    assert t["by_status"] == ({200: n, 503: len(cut_bytes)} if cut_bytes else {200: n}), t
    assert t["bytes_503"] == sum(cut_bytes)
    assert n <= served <= billed  # a cut request may have reached the origin whole
    # every byte that crossed is billed: what the origin moved, less what it sent of a
    # cut response that the gateway never read (at most the rest of a 16 KiB body each)
    used = u["bytes"]
    assert used == t["receipt_bytes"]
    assert used <= moved <= used + len(cut_bytes) * 16384
    # trial first, then 300 cents per 10^9 bytes: exactly 300 nanocents a byte
    assert u["trialRemainingBytes"] == 0 and t["receipt_trial"] == trial
    assert u["chargedNanocents"] == t["receipt_nanocents"] == 300 * (used - trial)
    # the balance is the sum of the transactions (the top-up less the usage)
    assert t["cached_nanocents"] == t["nanocents"] == cents * 10**9 - 300 * (used - trial)
    assert u["balanceNanocents"] == t["nanocents"]
    assert t["cached_trial_bytes"] == t["trial_bytes"] == 0


def test_sigterm_drains_every_worker_and_exits_0(tmp_path, origin, redis_server):
    db = _ledger(tmp_path)
    sv = Serve(db, 2, {"redis_url": redis_server.url, "drain_seconds": 10}).start()
    acc, user, pw = sv.customer()
    pids = sv.worker_pids()
    results: list[int] = []

    def slow() -> None:
        r = requests.get(origin.url("/slow?s=2"), proxies={"http": sv.proxy(user, pw)}, timeout=30)
        results.append(r.status_code)

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: any(s["path"] == "/slow?s=2" for s in origin.seen), 10, 0.01, "under way")
    sv.signal(signal.SIGTERM)
    assert sv.wait(60) == 0, sv.log()[-3000:]
    t.join(30)
    assert results == [200]
    assert all(not Path(f"/proc/{p}").exists() for p in pids)
    log = sv.log()
    assert "SIGTERM: draining 2 workers" in log and "datorus serve: stopped" in log
    assert log.count("stopped (exit status 0)") == 2
    assert usage(db, acc)["requests"] == 1  # the drained request was billed before exit
    sv.stop()


def test_a_killed_worker_is_restarted(tmp_path, origin, redis_server):
    db = _ledger(tmp_path)
    sv = Serve(db, 2, {"redis_url": redis_server.url}).start()
    try:
        _, user, pw = sv.customer()
        pids = sv.worker_pids()
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        sv.wait_log(f"(pid {victim}) died (killed by SIGKILL); restarting it", 30)
        wait_until(lambda: len(sv.worker_pids() - pids) == 1, 30, 0.05, "a new worker")
        new = (sv.worker_pids() - pids).pop()
        sv.wait_log(f"pid {new}", 5)
        proxies = {"http": sv.proxy(user, pw)}
        wait_until(
            lambda: all(
                requests.get(origin.url(f"/k{i}"), proxies=proxies, timeout=10).status_code == 200
                for i in range(10)
            ),
            60,
            0.1,
            "serving on both workers",
        )
        assert len(sv.worker_pids()) == 2
    finally:
        assert sv.stop() == 0, sv.log()[-3000:]


def test_a_worker_refusing_its_configuration_stops_serve_at_once_with_exit_2(tmp_path):
    # a ledger that cannot be opened: the worker stops at start with exit status 2, and a
    # restart would refuse it again: serve says why, as one gateway would, and exits 2
    sv = Serve(missing_ledger(tmp_path), 1, logdir=tmp_path).start(wait=False)
    rc = sv.wait(120)
    log = sv.log()
    assert rc == 2, log[-3000:]
    assert "restarting" not in log
    fatal = [line for line in log.splitlines() if line.startswith("datorus: fatal: ")]
    assert fatal and fatal[-1].startswith("datorus: fatal: datorus_db: cannot open the ledger")
    sv.stop()


def test_workers_that_keep_dying_at_start_stop_serve_with_their_message(tmp_path):
    # an extra addon that kills its process as it loads: every worker dies before ready
    crash = tmp_path / "crash.py"
    crash.write_text("import os, sys\nprint('crash addon loading', file=sys.stderr)\nos._exit(3)\n")
    db = new_ledger(tmp_path)
    prepare_ledger(db)
    sv = Serve(db, 1, logdir=tmp_path, extra=["-s", str(crash)]).start(wait=False)
    rc = sv.wait(120)
    log = sv.log()
    assert rc == 1, log[-3000:]
    assert log.count("died (exit status 3) before it was ready") == 3
    fatal = log[log.index("datorus: fatal: ") :]
    assert fatal.startswith("datorus: fatal: workers keep dying before they are ready (3 in")
    assert "Its stderr ended with:" in fatal and "crash addon loading" in fatal
    sv.stop()


def test_the_systemd_unit_verifies(tmp_path):
    unit = REPO / "deploy" / "datorus.service"
    text = unit.read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "KillSignal=SIGTERM" in text and "Restart=on-failure" in text
    assert "/.venv/bin/datorus serve --workers" in text
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    # verify also checks that ExecStart's program exists: point the unit at this checkout
    local = tmp_path / "datorus.service"
    local.write_text(text.replace("/opt/datorus", str(REPO)))
    p = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (p.stdout + p.stderr).splitlines() if "datorus.service" in line]
    assert p.returncode == 0 and not problems, p.stdout + p.stderr
