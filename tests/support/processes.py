"""The processes under test: the gateway (``mitmdump -s addons/datorus.py``) and ``datorus api``.

With ``DATORUS_GATEWAY_WORKERS=N`` (N > 1) in the environment, every :class:`Gateway` is
``datorus serve --workers N`` instead, sharing its hot state through a redis-server of
its own: ``scripts/test`` runs the end-to-end tests of limits, billing, sessions,
blocks, leases, suspension and draining that way too (issue 15). A test that can only
hold for one process is marked ``one_process`` and skipped then.

With ``DATORUS_GATEWAY_NODES=N`` (N > 1), every :class:`Gateway` is N nodes instead (issue
16): N ``mitmdump -s addons/datorus.py`` processes, each on a port of its own, sharing
one ledger and one redis-server, behind a real HAProxy (``support/balancer.py``, the
shipped ``deploy/haproxy.cfg`` rendered for the test's ports, ``balance roundrobin``)
on the port the tests use, so consecutive connections alternate nodes. The REST API
(``api_port``) is served by the first node only. ``gw.proc`` is then the nodes as one
process (:class:`NodeGroup`); a test that needs a single node (one process's log, the
client's own address) is marked ``one_node`` and skipped then, and so is every
``one_process`` test.

With ``DATORUS_TEST_LEDGER=postgresql`` every ledger is a PostgreSQL database instead of a
file (``support.ledger``); it combines with either of the above.
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

from .balancer import Balancer, haproxy_available
from .clients import basic, raw_connection, read_response
from .ledger import LedgerTarget, cli, ledger_dir, new_ledger, prepare_ledger
from .paths import DATORUS, MITMDUMP, REPO
from .redis_server import RedisServer
from .serve import forget_rate_state, owner_pid
from .waiting import free_port, wait_http, wait_until


def gateway_workers() -> int:
    """How many workers each test gateway runs (``DATORUS_GATEWAY_WORKERS``, default 1)."""
    return max(1, int(os.environ.get("DATORUS_GATEWAY_WORKERS", "1") or 1))


def gateway_nodes() -> int:
    """How many nodes each test gateway is (``DATORUS_GATEWAY_NODES``, default 1)."""
    return max(1, int(os.environ.get("DATORUS_GATEWAY_NODES", "1") or 1))


class NodeGroup:
    """A gateway's nodes as the one process tests know as ``gw.proc``.

    A signal goes to every node (SIGTERM: they all drain, answering 503 through the
    balancer, which keeps passing connections to them); once every node has exited, the
    balancer stops accepting (a soft stop: connections still open go on), so that a
    client of the stopped gateway is refused at once, as by one stopped process. The exit
    status is the first node's that is not 0, else 0.
    """

    def __init__(self, procs: list[subprocess.Popen], balancer: Balancer) -> None:
        self.procs = procs
        self.balancer = balancer

    @property
    def pid(self) -> int:
        """The first node's process id."""
        return self.procs[0].pid

    @property
    def returncode(self) -> int | None:
        codes = [p.returncode for p in self.procs]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c != 0), 0)

    def poll(self) -> int | None:
        """None while a node runs; else the exit status (the balancer then stops accepting)."""
        if any(p.poll() is None for p in self.procs):
            return None
        self.balancer.soft_stop()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for every node (``subprocess.TimeoutExpired`` past *timeout*)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self.procs:
            p.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        code = self.poll()
        assert code is not None
        return code

    def send_signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        """SIGKILL every node (``kill -9``)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()


class Gateway:
    """A running ``mitmdump -s addons/datorus.py`` on a free loopback port."""

    def __init__(
        self,
        db: LedgerTarget,
        settings: dict[str, Any] | None = None,
        env: dict | None = None,
        set_db: bool = True,
        nodes: int | None = None,
        logdir: Path | None = None,
    ):
        """*db* is a ledger file or URL (``support.ledger``); the logs go to *logdir*
        (default: the ledger's folder, ``support.ledger.ledger_dir``); *set_db* False leaves
        ``datorus_db`` to the settings file and environment; *nodes* overrides
        ``DATORUS_GATEWAY_NODES``."""
        self.db = db
        self.set_db = set_db
        self.port = free_port()
        self.settings = {
            "api_port": 0,
            # a test that reads /metrics gives it a free port; DATORUS_TEST_METRICS=1 gives
            # every test gateway one, so the whole suite runs with the counting on
            "metrics_port": free_port() if os.environ.get("DATORUS_TEST_METRICS") else 0,
            "refresh_ms": 200,
            "auth_fail_limit": 100_000,
            "router_seed": 1,  # a failing run's egress picks repeat when it is run again
            **(settings or {}),
        }
        self.env = env
        self.proc: subprocess.Popen | None = None
        if logdir is None:
            logdir = ledger_dir(db)
            if not logdir.exists():  # a ledger in a folder that is not there (a start-up fault)
                logdir = logdir.parent
        self.log = logdir / f"gateway-{self.port}.log"
        self.workers = gateway_workers()
        self.nodes = gateway_nodes() if nodes is None else nodes
        self.node_procs: list[subprocess.Popen] = []
        self.balancer: Balancer | None = None
        if self.nodes > 1:
            if self.workers > 1:
                raise RuntimeError(
                    "DATORUS_GATEWAY_NODES and DATORUS_GATEWAY_WORKERS: one or the other"
                )
            if not haproxy_available():
                raise RuntimeError(
                    "DATORUS_GATEWAY_NODES needs haproxy: run scripts/test (it installs it)"
                )
            self.node_ports = [free_port() for _ in range(self.nodes)]
            self.balancer = Balancer(logdir, self.port, self.node_ports)
        else:
            self.node_ports = [self.port]
        self.redis: RedisServer | None = None
        if self.workers > 1 or self.nodes > 1:
            self.redis = RedisServer(logdir / f"redis-for-{self.port}").start()
            self.settings.setdefault("redis_url", self.redis.url)

    def start(self, wait: bool = True) -> Gateway:
        if self.redis is not None and (
            self.redis.proc is None or self.redis.proc.poll() is not None
        ):
            self.redis.start()  # started again after a stop
        env = {**os.environ, **(self.env or {})}
        self.logf = open(self.log, "ab")  # noqa: SIM115
        self.log_start = self.logf.tell()  # readiness is read from this start's lines only
        if self.nodes > 1:
            return self._start_nodes(env, wait)
        self.proc = subprocess.Popen(
            self._command(self.port, self.settings),
            cwd=REPO,
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
        if wait:
            self.wait_ready()
        return self

    def _command(self, port: int, settings: Mapping[str, Any]) -> list[str]:
        """The command line of the process (or node) that listens on *port*."""
        if self.workers > 1:
            head = [DATORUS, "serve", "--workers", str(self.workers)]
        else:
            head = [MITMDUMP, "-s", str(REPO / "addons" / "datorus.py")]
        cmd = [*head, "--listen-host", "127.0.0.1", "--listen-port", str(port)]
        if self.set_db:
            cmd += ["--set", f"datorus_db={self.db}"]
        for k, v in settings.items():
            if isinstance(v, list | tuple):
                for item in v:
                    cmd += ["--set", f"datorus_{k}={item}"]
            else:
                cmd += ["--set", f"datorus_{k}={v}"]
        return cmd

    def _start_nodes(self, env: dict[str, str], wait: bool) -> Gateway:
        """Start every node (all logging to ``self.log``), then the balancer in front."""
        assert self.balancer is not None
        self.env_started = env
        self.node_procs = [self._spawn_node(i) for i in range(self.nodes)]
        self.proc = NodeGroup(self.node_procs, self.balancer)
        if wait:
            self.wait_ready()
            return self
        # the gateway's port accepts once its nodes' do (as one process's port accepts
        # while it loads its ledger): the balancer starts then, or when they exited
        for proc, port in zip(self.node_procs, self.node_ports, strict=True):

            def accepts(proc: subprocess.Popen = proc, port: int = port) -> bool:
                if proc.poll() is not None:
                    return True
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True

            wait_until(accepts, 30, 0.01, f"node on {port} accepting")
        self._balance()
        return self

    def _balance(self) -> None:
        """A balancer accepting in front of the nodes (a fresh one after a soft stop)."""
        assert self.balancer is not None
        if not self.balancer.running() or self.balancer.soft_stopped:
            self.balancer.stop()  # a soft-stopped one may still hold connections
            self.balancer.start()

    def _spawn_node(self, i: int) -> subprocess.Popen:
        """Start node *i* (the first serves the REST API on the port it was given)."""
        api_port = self.settings.get("api_port")
        moved = i > 0 and isinstance(api_port, int) and api_port > 0
        settings = {**self.settings, "api_port": 0} if moved else self.settings
        if i > 0 and self.settings.get("socks5_port"):
            settings = {**settings, "socks5_port": 0}  # the SOCKS5 entry is the first node's
        if i > 0 and self.settings.get("metrics_port"):  # each node is its own target
            settings = {**settings, "metrics_port": 0}
        return subprocess.Popen(
            self._command(self.node_ports[i], settings),
            cwd=REPO,
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            env=self.env_started,
        )

    def kill_node(self, i: int) -> None:
        """``kill -9`` node *i* (with several nodes); the others and the balancer go on."""
        self.node_procs[i].kill()
        self.node_procs[i].wait(10)

    def stop_node(self, i: int, sig: int = 15, timeout: float = 30.0) -> int:
        """Send node *i* *sig* (SIGTERM: it drains) and wait for its exit status."""
        self.node_procs[i].send_signal(sig)
        return self.node_procs[i].wait(timeout)

    def start_node(self, i: int, timeout: float = 30.0) -> None:
        """Start node *i* again; wait until it answers and the balancer has it up."""
        assert self.node_procs[i].poll() is not None, f"node {i} is running"
        self.node_procs[i] = self._spawn_node(i)
        self._wait_nodes_ready(timeout)

    def worker_pids(self) -> set[int]:
        """The processes that serve the proxy port: the gateway, or ``serve``'s workers."""
        assert self.proc is not None
        if self.nodes > 1:
            return {p.pid for p in self.node_procs}
        if self.workers == 1:
            return {self.proc.pid}
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return {int(p) for p in path.read_text().split()}

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Ready when a request without credentials gets the 407 envelope (not 503),
        from every worker (every node, and then through the balancer with every node up)."""
        if self.nodes > 1:
            self._wait_nodes_ready(timeout)
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

    def _wait_nodes_ready(self, timeout: float) -> None:
        """Every node answers 407 on its own port; then the balancer has them all up."""
        assert self.balancer is not None
        for proc, port in zip(self.node_procs, self.node_ports, strict=True):

            def node_ready(proc: subprocess.Popen = proc, port: int = port) -> bool:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"node on {port} exited {proc.returncode}: {self.log.read_text()[-2000:]}"
                    )
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
                    return s.recv(64).startswith(b"HTTP/1.1 407")

            wait_until(node_ready, timeout, 0.05, f"node on {port} ready")
        if not self.balancer.running() or self.balancer.soft_stopped:
            self._balance()
        else:
            # a balancer that saw these nodes down brings them back after `rise` checks
            # (seconds); each node has just answered the same request its check sends
            for i in range(len(self.node_procs)):
                self.balancer.command(f"set server datorus_nodes/node{i} health up")
        self.balancer.wait_all_up(timeout)

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
        if self.balancer is not None:
            self.balancer.stop()
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
    def socks_port(self) -> int:
        """The SOCKS5 entry's port (started with ``settings={"socks5_port": free_port()}``)."""
        port = self.settings.get("socks5_port")
        if not port:
            raise AssertionError("this gateway runs without its SOCKS5 entry (socks5_port=0)")
        return int(port)

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
        if self.nodes > 1:
            self._wait_nodes_know(user, password, timeout)
            return
        # port 1: parsed and authenticated, then refused at once by loopback
        probe = (
            f"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, password)}\r\n\r\n"
        ).encode()
        limit = max(timeout, 15.0 * (self.workers > 1))
        self.each_worker(probe, lambda answer: answer[0] != 407, limit)
        if self.workers > 1:
            self._forget_rate_state(user)
            with raw_connection(self.port) as s:
                s.sendall(probe)
                assert read_response(s)[0] != 407

    def each_worker(
        self,
        request: bytes,
        until: Callable[[tuple[int, dict[str, str], bytes]], bool] = lambda _: True,
        timeout: float = 15.0,
        source: str | None = None,
    ) -> dict[int, tuple[int, dict[str, str], bytes]]:
        """Send *request* (one raw request) on new connections until every process that
        serves the proxy port has answered it as *until* wants: process -> that answer.
        *source* is the client address the connections come from (default 127.0.0.1).

        One gateway is one process; ``datorus serve``'s workers each keep their own view
        of what they learn by themselves (the pool's health: README), so a test that
        needs every worker to have learnt something asks each of them (and each node, on
        its own port, with several nodes).
        """
        assert self.proc is not None
        every = self.worker_pids()
        pending = set(every)
        answers: dict[int, tuple[int, dict[str, str], bytes]] = {}
        if self.nodes > 1:  # each node asked on its own port, not through the balancer
            for pid, port in zip([p.pid for p in self.node_procs], self.node_ports, strict=True):

                def answered(port: int = port, pid: int = pid) -> bool:
                    with raw_connection(port, source=source) as s:
                        s.sendall(request)
                        answers[pid] = read_response(s)
                    return until(answers[pid])

                wait_until(answered, timeout, 0.02, f"an answer from the node on {port}")
            return answers

        def all_answered() -> bool:
            with raw_connection(self.port, source=source) as s:
                # which worker accepted it, before the answer can close it
                worker = (
                    wait_until(lambda: owner_pid(s, every), 5, 0.005, "the connection accepted")
                    if self.workers > 1
                    else self.proc.pid
                )
                s.sendall(request)
                answer = read_response(s)
            if worker in pending and until(answer):
                pending.discard(worker)
                answers[worker] = answer
            return not pending

        wait_until(all_answered, timeout, 0.02, "an answer from every worker")
        return answers

    def _wait_nodes_know(self, user: str, password: str, timeout: float) -> None:
        """Every node knows the credential (asked on its own port); then, as with several
        workers, the rate state of those probes is cleared and one probe taken through
        the balancer."""

        def status(port: int) -> int:
            with raw_connection(port) as s:
                s.sendall(
                    f"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n"
                    f"Proxy-Authorization: {basic(user, password)}\r\n\r\n".encode()
                )
                return read_response(s)[0]

        for port in self.node_ports:
            wait_until(
                lambda port=port: status(port) != 407,
                max(timeout, 15.0),
                0.02,
                f"credential {user} live on the node on {port}",
            )
        self._forget_rate_state(user)
        assert status(self.port) != 407

    def _forget_rate_state(self, user: str) -> None:
        """Clear the shared rate state of *user*'s credential (several workers' probes)."""
        assert self.redis is not None
        forget_rate_state(self.db, self.redis.port, user)


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
