"""The processes under test: the gateway (``mitmdump -s addons/datorus.py``) and ``datorus api``.

With ``DATORUS_GATEWAY_WORKERS=N`` (N > 1) in the environment, every :class:`Gateway` is
``datorus serve --workers N`` instead, sharing its hot state through a redis-server of
its own: ``scripts/test`` runs the end-to-end tests of limits, billing, sessions,
blocks, leases, suspension and draining that way too (issue 15). A test that can only
hold for one process is marked ``one_process`` and skipped then. With
``DATORUS_TEST_LEDGER=postgresql`` every ledger is a PostgreSQL database instead of a
file (``support.ledger``); the two combine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .clients import basic, raw_connection, read_response
from .ledger import LedgerTarget, cli, ledger_dir, ledger_value, new_ledger, prepare_ledger
from .paths import DATORUS, MITMDUMP, REPO
from .redis_server import RedisServer
from .serve import owner_pid
from .waiting import free_port, wait_http, wait_until


def gateway_workers() -> int:
    """How many workers each test gateway runs (``DATORUS_GATEWAY_WORKERS``, default 1)."""
    return max(1, int(os.environ.get("DATORUS_GATEWAY_WORKERS", "1") or 1))


class Gateway:
    """A running ``mitmdump -s addons/datorus.py`` on a free loopback port."""

    def __init__(
        self,
        db: LedgerTarget,
        settings: dict[str, Any] | None = None,
        env: dict | None = None,
        set_db: bool = True,
    ):
        """*db* is a ledger file or URL (``support.ledger``); *set_db* False leaves
        ``datorus_db`` to the settings file and environment."""
        self.db = db
        self.set_db = set_db
        self.port = free_port()
        self.settings = {
            "api_port": 0,
            "refresh_ms": 200,
            "auth_fail_limit": 100_000,
            "router_seed": 1,  # a failing run's egress picks repeat when it is run again
            **(settings or {}),
        }
        self.env = env
        self.proc: subprocess.Popen | None = None
        logdir = ledger_dir(db)
        if not logdir.exists():  # a ledger in a folder that is not there (a start-up fault)
            logdir = logdir.parent
        self.log = logdir / f"gateway-{self.port}.log"
        self.workers = gateway_workers()
        self.redis: RedisServer | None = None
        if self.workers > 1:
            self.redis = RedisServer(logdir / f"redis-for-{self.port}").start()
            self.settings.setdefault("redis_url", self.redis.url)

    def start(self, wait: bool = True) -> Gateway:
        if self.redis is not None and (
            self.redis.proc is None or self.redis.proc.poll() is not None
        ):
            self.redis.start()  # started again after a stop
        if self.workers > 1:
            head = [DATORUS, "serve", "--workers", str(self.workers)]
        else:
            head = [MITMDUMP, "-s", str(REPO / "addons" / "datorus.py")]
        cmd = [
            *head,
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
        ]
        if self.set_db:
            cmd += ["--set", f"datorus_db={self.db}"]
        for k, v in self.settings.items():
            if isinstance(v, list | tuple):
                for item in v:
                    cmd += ["--set", f"datorus_{k}={item}"]
            else:
                cmd += ["--set", f"datorus_{k}={v}"]
        env = {**os.environ, **(self.env or {})}
        self.logf = open(self.log, "ab")  # noqa: SIM115
        self.log_start = self.logf.tell()  # readiness is read from this start's lines only
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=self.logf, stderr=subprocess.STDOUT, env=env
        )
        if wait:
            self.wait_ready()
        return self

    def worker_pids(self) -> set[int]:
        """The processes that serve the proxy port: the gateway, or ``serve``'s workers."""
        assert self.proc is not None
        if self.workers == 1:
            return {self.proc.pid}
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return {int(p) for p in path.read_text().split()}

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Ready when a request without credentials gets the 407 envelope (not 503),
        from every worker."""
        if self.workers > 1:
            timeout = max(timeout, 90.0)
            wait_until(
                lambda: f"{self.workers} workers ready" in self._log_text(self.log_start),
                timeout,
                0.05,
                "every worker ready",
            )

        def probe() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"gateway exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.1 407")

        wait_until(probe, timeout, 0.05, "gateway ready")

    def stop(self, sig: int | None = None, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.logf.close()
        if self.redis is not None:
            self.redis.stop()
        return self.proc.returncode

    def _log_text(self, start: int = 0) -> str:
        """The log from byte *start* (a restarted gateway appends to the same file)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"gateway exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
            )
        with open(self.log, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """The REST API the gateway serves (started with ``settings={"api_port": free_port()}``)."""
        port = self.settings.get("api_port")
        if not port:
            raise AssertionError("this gateway runs without its REST API (api_port=0)")
        return f"http://127.0.0.1:{port}"

    def proxy(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def cli(self, *args: str, check: bool = True) -> dict[str, Any]:
        return cli(self.db, *args, check=check)

    def customer(self, **opts: Any) -> tuple[int, str, str]:
        """A new account (with options as CLI flags) and a credential: (id, user, password)."""
        email = f"c{time.monotonic_ns()}@example.com"
        args = ["account", "create", email]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        acc = self.cli(*args)
        cred = self.cli("credential", "create", str(acc["id"]))
        self.wait_for_credential(cred["username"], cred["password"])
        return acc["id"], cred["username"], cred["password"]

    def wait_for_credential(self, user: str, password: str, timeout: float = 5.0) -> None:
        """Wait until the running gateway knows a credential (operator changes are polled).

        The probe that passes counts as one request against the credential's rate limit,
        as it does in one process. With several workers every worker must know the
        credential, so probes go on until each has answered one; the rate state those
        probes left in Redis is then cleared and one probe taken again, which leaves the
        credential exactly where one process's single probe leaves it.
        """
        assert self.proc is not None
        pending = self.worker_pids()

        def probe() -> tuple[int, int | None]:
            with raw_connection(self.port) as s:
                # port 1: parsed and authenticated, then refused at once by loopback
                s.sendall(
                    f"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n"
                    f"Proxy-Authorization: {basic(user, password)}\r\n\r\n".encode()
                )
                worker = owner_pid(s, pending) if self.workers > 1 else None
                return read_response(s)[0], worker

        def known() -> bool:
            status, worker = probe()
            if status == 407:
                return False
            pending.discard(worker if worker is not None else self.proc.pid)
            return not pending  # ask until every worker knows it

        wait_until(known, max(timeout, 15.0 * (self.workers > 1)), 0.02, f"credential {user} live")
        if self.workers > 1:
            self._forget_rate_state(user)
            assert probe()[0] != 407

    def _forget_rate_state(self, user: str) -> None:
        """Clear the shared rate state of *user*'s credential (several workers' probes)."""
        import redis

        cid = ledger_value(self.db, "SELECT id FROM credentials WHERE username = ?", (user,))
        assert self.redis is not None
        r = redis.Redis(port=self.redis.port, socket_timeout=5)
        try:
            r.delete(f"datorus:rl:{cid}")
        finally:
            r.close()


@dataclass(frozen=True)
class GatewaySetup:
    """How a test module's shared gateway (conftest's ``gw``) is set up.

    The default is a plain gateway on a fresh ledger that allows loopback. A module that
    needs its own overrides the ``gw_setup`` fixture (it may use other fixtures)::

        @pytest.fixture(scope="module")
        def gw_setup() -> GatewaySetup:
            return GatewaySetup({"header_timeout": 2})
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    # serve the REST API on a free loopback port, and wait until GET /health answers
    api: bool = False
    # prepares the fresh ledger (a file or a URL: ``support.ledger``) before the gateway starts
    ledger: Callable[[LedgerTarget], None] = prepare_ledger
    # runs once the gateway is up: the accounts and keys the tests use, waits on its state
    ready: Callable[[Gateway], None] | None = None


def start_gateway(directory: Path, setup: GatewaySetup | None = None) -> Gateway:
    """A running gateway on a fresh ledger (``support.ledger.new_ledger``), its log in
    *directory*, set up as *setup* says."""
    setup = setup or GatewaySetup()
    db = new_ledger(directory)
    setup.ledger(db)
    settings = dict(setup.settings)
    if setup.api:
        settings["api_port"] = free_port()
    g = Gateway(db, settings).start()
    try:
        if setup.api:
            wait_http(g.api_url + "/health", proc=g.proc)
        if setup.ready is not None:
            setup.ready(g)
    except BaseException:
        g.stop()
        raise
    return g


class ApiProcess:
    """A standalone ``datorus api`` on a free loopback port (settings as DATORUS_* env)."""

    def __init__(self, db: LedgerTarget, settings: dict[str, Any] | None = None) -> None:
        self.db = db
        self.port = free_port()
        self.env = {
            **os.environ,
            **{f"DATORUS_{k.upper()}": str(v) for k, v in (settings or {}).items()},
        }
        self.log = ledger_dir(db) / f"api-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        self.logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [DATORUS, "--db", str(self.db), "api", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO,
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        wait_http(self.url + "/health", proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self.logf.close()
