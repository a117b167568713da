"""A real ``datorus serve`` for tests, and which worker process holds a connection.

``Serve`` runs ``datorus serve --workers N --listen-host 127.0.0.1 --listen-port P
--set datorus_db=... [--set ...]`` in a subprocess: the launcher's own lines (stderr)
go to ``.err``, the workers' mitmdump logs (stdout) to ``.out``. ``owner_pid`` finds,
through ``/proc``, the process that accepted a connection: how a test sees the kernel
spread connections over the workers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from .clients import basic, raw_connection, read_response
from .ledger import LedgerTarget, cli, ledger_dir, ledger_value
from .paths import DATORUS, REPO
from .waiting import free_port, wait_until


class Serve:
    """A running ``datorus serve`` on free loopback ports."""

    def __init__(
        self,
        db: LedgerTarget,
        workers: int,
        settings: dict[str, Any] | None = None,
        extra: list[str] | None = None,
        logdir: Path | None = None,
    ) -> None:
        self.db = db
        self.workers = workers
        self.port = free_port()
        self.settings = {
            "refresh_ms": 200,
            "auth_fail_limit": 100_000,
            "router_seed": 1,
            "api_port": 0,
            "metrics_port": 0,  # a test that reads /metrics gives it a free port
            **(settings or {}),
        }
        self.extra = extra or []
        self.dir = logdir or ledger_dir(db)
        self.out = self.dir / f"serve-{self.port}.out"
        self.err = self.dir / f"serve-{self.port}.err"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The command line this test runs."""
        cmd = [
            DATORUS,
            "serve",
            "--workers",
            str(self.workers),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
            "--set",
            f"datorus_db={self.db}",
        ]
        for k, v in self.settings.items():
            cmd += ["--set", f"datorus_{k}={v}"]
        return cmd + self.extra

    def start(self, wait: bool = True) -> Serve:
        """Start it; with *wait*, until every worker is ready and the proxy answers."""
        self.outf = open(self.out, "ab")  # noqa: SIM115
        self.errf = open(self.err, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(), cwd=REPO, stdout=self.outf, stderr=self.errf, env=dict(os.environ)
        )
        if wait:
            self.wait_log(f"{self.workers} workers ready", 90)
        return self

    def log(self) -> str:
        """What the launcher said so far (its stderr, with the workers' stderr lines)."""
        return self.err.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 60, count: int = 1) -> None:
        """Wait until the launcher's log holds *text* (*count* times); fail if it exits."""

        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"datorus serve exited {self.proc.returncode}: {self.log()[-3000:]}"
                )
            return self.log().count(text) >= count

        wait_until(seen, timeout, 0.05, f"{text!r} in the serve log")

    def worker_pids(self) -> set[int]:
        """The launcher's child processes (its workers) right now."""
        assert self.proc is not None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return {int(p) for p in path.read_text().split()}

    def signal(self, sig: int) -> None:
        """Send *sig* to the launcher."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        """Wait for the launcher to exit; its exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL past 60 s)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.outf.close()
        self.errf.close()
        return self.proc.returncode

    def proxy(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def customer(self, top_up_cents: int = 0, **opts: Any) -> tuple[int, str, str]:
        """A new account (topped up by *top_up_cents* before its credential exists, so
        no worker sees it without the balance) and credential, known to every worker:
        (id, user, password)."""
        email = f"s{free_port()}-{os.getpid()}@example.com"
        args = ["account", "create", email]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        acc = cli(self.db, *args)
        if top_up_cents:
            cli(self.db, "balance", "add", str(acc["id"]), str(top_up_cents))
        cred = cli(self.db, "credential", "create", str(acc["id"]))
        user, pw = cred["username"], cred["password"]

        def known_by_all() -> bool:
            # every worker: one new connection each lands on some worker; ask enough times
            for _ in range(4 * self.workers):
                with raw_connection(self.port) as s:
                    s.sendall(
                        f"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n"
                        f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
                    )
                    if read_response(s)[0] == 407:
                        return False
            return True

        wait_until(known_by_all, 15, 0.1, f"credential {user} live on every worker")
        return acc["id"], user, pw


def usage(db: LedgerTarget, account_id: int) -> dict[str, Any]:
    """``datorus usage ACCOUNT_ID --json`` (the CLI, as an operator runs it)."""
    return cli(db, "usage", str(account_id))


_TCP_LINE = re.compile(r"^\s*\d+: ([0-9A-F]{8}):([0-9A-F]{4}) ([0-9A-F]{8}):([0-9A-F]{4}) (\w\w)")


def owner_pid(sock: socket.socket, candidates: set[int]) -> int | None:
    """Which of *candidates* holds the server side of *sock* (an IPv4 loopback connection)."""
    local_port = sock.getsockname()[1]
    server_port = sock.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        m = _TCP_LINE.match(line)
        if m and int(m.group(2), 16) == server_port and int(m.group(4), 16) == local_port:
            inode = line.split()[9]
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in candidates:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def health_of_each_worker(api_port: int, pids: set[int], timeout: float = 10) -> dict[int, dict]:
    """``GET /health`` on the shared API port, on new connections until each of the
    worker processes *pids* has answered once: worker pid -> its ``hotState``."""
    seen: dict[int, dict] = {}

    def all_answered() -> bool:
        with socket.create_connection(("127.0.0.1", api_port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            pid = owner_pid(s, pids)
            status, _, body = read_response(s)
        assert status == 200, body
        if pid is not None:
            seen[pid] = json.loads(body)["hotState"]
        return set(seen) == pids

    wait_until(all_answered, timeout, 0, "/health from every worker")
    return seen


def forget_rate_state(db: LedgerTarget, redis_port: int, username: str) -> None:
    """Clear the rate state Redis holds for *username*'s credential (what readiness
    probes took from it), so that its bucket is full, as a fresh credential's is."""
    import redis

    cid = ledger_value(db, "SELECT id FROM credentials WHERE username = ?", (username,))
    r = redis.Redis(port=redis_port, socket_timeout=5)
    try:
        r.delete(f"datorus:rl:{cid}")
    finally:
        r.close()


def serve_cmd(*args: str) -> subprocess.CompletedProcess:
    """``datorus serve ARGS`` run to its end (for refusals at start)."""
    return subprocess.run(
        [DATORUS, "serve", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
