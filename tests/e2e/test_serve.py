"""``datorus serve`` (CONTRACT section 7): N workers on one port, restarts with no request
refused. Real launcher, real mitmdump workers, real redis-server, real clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from support.clients import basic, read_response
from support.ledger import LedgerTarget, missing_ledger, new_ledger, prepare_ledger
from support.paths import REPO
from support.serve import Serve, owner_pid, serve_cmd, usage
from support.waiting import wait_until


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
    on a kept-alive connection, half on a new connection per request."""

    def __init__(self, proxy: str, url: str, n: int = 10) -> None:
        self.proxy, self.url = proxy, url
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(n)]

    def client(self, i: int) -> None:
        session = requests.Session() if i % 2 == 0 else None
        proxies = {"http": self.proxy}
        while not self.stopping.is_set():
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
        assert not load.errors, load.errors[:5]
        assert set(load.statuses) == {200}, load.statuses
        assert not before & after and len(after) == 2
        assert "reload: 2 workers ready" in sv.log()
        # every request made is billed: the CLI's usage counts them all
        n = load.statuses[200]
        wait_until(lambda: usage(db, acc)["requests"] == n, 15, 0.1, f"usage = {n} requests")
    finally:
        assert sv.stop() == 0, sv.log()[-3000:]


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
