"""Several gateways ("nodes") on one ledger and one Redis behind a balancer (CONTRACT
section 7, issue 16): the shipped HAProxy configuration, and faults.

Each test here runs a gateway of two nodes of its own, whatever
``DATORUS_GATEWAY_NODES`` says: two ``mitmdump`` processes on ports of their own sharing
one PostgreSQL ledger (a database of the tests' cluster, or a cluster of the test's own
when it restarts it) and one redis-server, behind a real HAProxy rendered from
``deploy/haproxy.cfg`` (``support/balancer.py``). Clients open a new connection for each
request, so the balancer spreads them over the nodes; which node answered a request is
read from the balancer's log, one line per connection naming the client's port and the
node.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from checks import assert_envelope
from support.balancer import DEPLOY_CONFIG, HAPROXY, Balancer, haproxy_available, render_config
from support.clients import basic, read_response
from support.counting import RawOrigin
from support.ledger import prepare_ledger
from support.postgres import PostgresCluster, postgres_available
from support.processes import Gateway
from support.waiting import wait_until

# -- the shipped configuration ------------------------------------------------------------


def _haproxy_check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60
    )


def test_the_shipped_haproxy_config_passes_haproxys_own_check(tmp_path):
    text = DEPLOY_CONFIG.read_text()
    # TCP mode on the proxy port, checked on the proxy port itself, tunnels kept an hour
    assert "mode tcp" in text and "http-check expect status 407" in text
    assert "timeout tunnel 1h" in text and "option redispatch" in text
    if not haproxy_available():
        pytest.skip("haproxy is not installed (scripts/test installs it: apt-get install haproxy)")
    p = _haproxy_check(DEPLOY_CONFIG)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Configuration file is valid" in p.stdout + p.stderr
    # and what the tests run in front of their nodes, rendered from it
    rendered = tmp_path / "test.cfg"
    rendered.write_text(render_config(8001, [9001, 9002], tmp_path / "admin.sock"))
    p = _haproxy_check(rendered)
    assert p.returncode == 0 and "WARNING" not in p.stdout + p.stderr, p.stdout + p.stderr


# -- two nodes under load -----------------------------------------------------------------


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator:
    """Start a gateway of two nodes behind HAProxy on a fresh database of *cluster* (the
    test process's cluster by default), with settings, for one test."""
    if not haproxy_available():
        pytest.fail("haproxy is not installed: run scripts/test (it installs it)")
    if not postgres_available():
        pytest.fail("PostgreSQL is not installed: run scripts/test (it installs it)")
    started: list[Gateway] = []

    def make(cluster: PostgresCluster | None = None, **settings) -> Gateway:
        from support.postgres import shared_cluster

        d = tmp_path / f"g{len(started)}"
        d.mkdir()
        url = (cluster or shared_cluster()).create_database("nodes")
        prepare_ledger(url)
        gw = Gateway(url, settings, nodes=2, logdir=d)
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.stop()


@dataclass
class Answer:
    """One request's answer as its client read it."""

    client_port: int  # the client's own port: the balancer's log names the node by it
    opened: float  # time.time() when it connected (ports are reused: this tells them apart)
    status: int
    request_id: str
    at: float  # time.monotonic() when it was read
    headers: dict[str, str] = field(repr=False, default_factory=dict)
    body: bytes = field(repr=False, default=b"")


@dataclass
class Lost:
    """A connection that ended without an answer."""

    client_port: int
    opened: float  # time.time()
    at: float  # time.monotonic()
    error: str


@dataclass
class Load:
    """Client threads sending one request per connection until stopped (or a deadline)."""

    port: int
    url: str
    answers: list[Answer] = field(default_factory=list)
    lost: list[Lost] = field(default_factory=list)  # connections that ended without an answer
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, credentials: list[tuple[str, str]], per_credential: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for user, pw in credentials:
            for _ in range(per_credential):
                t = threading.Thread(target=self._client, args=(user, pw, deadline), daemon=True)
                t.start()
                self.threads.append(t)

    def _client(self, user: str, pw: str, deadline: float) -> None:
        request = (
            f"GET {self.url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n"
        ).encode()
        while not self.stop.is_set() and time.monotonic() < deadline:
            port, opened = 0, time.time()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    port = s.getsockname()[1]
                    s.sendall(request)
                    status, headers, body = read_response(s)
            except OSError as e:
                self.lost.append(Lost(port, opened, time.monotonic(), repr(e)))
                continue
            rid = headers.get("x-datorus-request-id", "")
            self.answers.append(Answer(port, opened, status, rid, time.monotonic(), headers, body))

    def count_since(self, t: float) -> int:
        return sum(1 for a in self.answers if a.at > t and a.status == 200)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"


NODES = ("node0", "node1")
_LOG_LINE = re.compile(r"^127\.0\.0\.1:(\d+) \[([^\]]+)\] datorus_proxy datorus_nodes/(\S+) ")


class NodeLog:
    """Which node the balancer gave each client connection, from its log (a line per
    connection: the client's port, when it was accepted, the node)."""

    def __init__(self, balancer: Balancer) -> None:
        self.by_port: dict[int, list[tuple[float, str]]] = {}
        for line in balancer.log.read_text().splitlines():
            m = _LOG_LINE.match(line)
            if m:
                accepted = datetime.strptime(m.group(2), "%d/%b/%Y:%H:%M:%S.%f").timestamp()
                node = m.group(3).removesuffix("-fallback")
                self.by_port.setdefault(int(m.group(1)), []).append((accepted, node))

    def node(self, conn: Answer | Lost) -> str | None:
        """``node0`` or ``node1``: the line of the client's port accepted nearest to when
        the client connected (a port is reused within seconds); None if it has none."""
        lines = self.by_port.get(conn.client_port)
        if not lines:
            return None
        return min(lines, key=lambda line: abs(line[0] - conn.opened))[1]


def _rows(db: str, sql: str, *params: object) -> list[tuple]:
    """Rows of *sql* (``?`` placeholders) on the PostgreSQL ledger *db*."""
    with psycopg.connect(db) as c:
        return c.execute(sql.replace("?", "%s"), params).fetchall()


def assert_ledger_consistent(db: str, accounts: list[int]) -> None:
    """Balances equal the sum of their transactions; receipts unique; usage transactions
    count every receipt that has a price once."""
    for acc in accounts:
        ((nc, tb),) = _rows(
            db, "SELECT nanocents, trial_bytes FROM balances WHERE account_id = ?", acc
        )
        ((snc, stb),) = _rows(
            db,
            "SELECT SUM(nanocents), SUM(trial_bytes) FROM transactions WHERE account_id = ?",
            acc,
        )
        assert (nc, tb) == (snc, stb), f"account {acc}: balance is not its transactions' sum"
    ((n, distinct),) = _rows(db, "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM receipts")
    assert n == distinct
    marks = ",".join("?" * len(accounts))
    ((requests, used),) = _rows(
        db,
        "SELECT SUM(requests), SUM(bytes) FROM transactions"
        f" WHERE kind = 'usage' AND account_id IN ({marks})",
        *accounts,
    )
    ((billed, moved),) = _rows(
        db,
        "SELECT COUNT(*), SUM(bytes_up + bytes_down) FROM receipts"
        f" WHERE status = 200 AND account_id IN ({marks})",
        *accounts,
    )
    assert (requests, used) == (billed, moved), "usage transactions and receipts disagree"


def billed_ids(db: str, accounts: list[int]) -> list[str]:
    marks = ",".join("?" * len(accounts))
    return [
        r[0]
        for r in _rows(
            db,
            f"SELECT request_id FROM receipts WHERE status = 200 AND account_id IN ({marks})",
            *accounts,
        )
    ]


def test_kill_9_of_one_node_under_load_loses_at_most_its_last_batch(two_nodes):
    """CONTRACT section 7: a ``kill -9`` of one node loses at most its own unflushed
    batch; nothing is corrupted or charged twice, and the other node serves on."""
    origin = RawOrigin()
    try:
        gw = two_nodes()
        customers = [gw.customer(trial_bytes=10**9, rps=10000, burst=10000) for _ in range(3)]
        accounts = [c[0] for c in customers]
        load = Load(gw.port, origin.url("/bytes/2000"))
        load.run([(u, p) for _, u, p in customers], per_credential=2, seconds=120)
        wait_until(lambda: load.count_since(0) > 300, 60, 0.05, "load on both nodes")
        killed_at = time.monotonic()
        gw.kill_node(1)
        wait_until(lambda: load.count_since(killed_at) > 300, 60, 0.05, "load on the survivor")
        load.finish()
        # the killed node comes back and bills on
        gw.start_node(1)
        assert gw.stop(signal.SIGTERM) == 0
        assert gw.node_procs[0].returncode == 0 and gw.node_procs[1].returncode == 0
        assert gw.balancer is not None
        nodes = NodeLog(gw.balancer)
    finally:
        origin.close()

    # only connections to the killed node at the moment it died went unanswered: one in
    # flight per client, and one a client opened as it died (the kernel took its
    # handshake, no process was left to answer); after that the balancer sent every
    # connection to the other node
    assert len(load.lost) <= 2 * len(load.threads), load.lost[:5]
    assert all(killed_at - 0.5 < x.at < killed_at + 1.0 for x in load.lost), load.lost[:5]
    assert all(nodes.node(x) in (None, "node1") for x in load.lost), load.lost[:5]
    assert {a.status for a in load.answers} == {200}
    served = {a.request_id: a for a in load.answers}
    assert len(served) == len(load.answers)
    by_node = {n: [a for a in load.answers if nodes.node(a) == n] for n in NODES}
    assert by_node["node0"] and by_node["node1"], "the balancer used one node only"
    assert not [a for a in by_node["node1"] if a.at > killed_at + 0.5], "the dead node answered"

    assert_ledger_consistent(gw.db, accounts)
    billed = billed_ids(gw.db, accounts)
    assert len(billed) == len(set(billed))
    # billed: at most what the clients got answered; at least what the survivor served,
    # and what the killed node answered up to its last flush (flush_ms is 250)
    assert set(billed) <= set(served)
    assert {a.request_id for a in by_node["node0"]} <= set(billed)
    flushed_before = killed_at - 1.0
    unbilled = [a for a in by_node["node1"] if a.request_id not in set(billed)]
    assert all(a.at > flushed_before for a in unbilled), "a flushed batch was lost"
    print(
        f"kill -9 of one node: {len(unbilled)} of {len(by_node['node1'])} of its answers"
        f" lost, {len(by_node['node0'])} on the survivor all billed, {len(load.lost)} lost"
        " in flight"
    )


def test_one_node_draining_behind_the_balancer_loses_nothing(two_nodes):
    """SIGTERM to one node while clients keep coming: each gets an answer (200, or the
    draining node's 503 with Retry-After until the balancer's health check takes it
    out), never a lost connection; then the other node serves all; every 200 is billed
    exactly once."""
    origin = RawOrigin()
    try:
        # drain_listen_seconds as the README says for deploy/haproxy.cfg: the port stays
        # open until the balancer's health check has taken the node out
        gw = two_nodes(drain_seconds=10, drain_listen_seconds=3)
        customers = [gw.customer(trial_bytes=10**9, rps=10000, burst=10000) for _ in range(2)]
        accounts = [c[0] for c in customers]
        load = Load(gw.port, origin.url("/bytes/2000"))
        load.run([(u, p) for _, u, p in customers], per_credential=2, seconds=120)
        wait_until(lambda: load.count_since(0) > 200, 60, 0.05, "load on both nodes")
        assert gw.stop_node(1, signal.SIGTERM) == 0
        exited_at = time.monotonic()
        wait_until(lambda: load.count_since(exited_at) > 200, 60, 0.05, "load on the other")
        load.finish()
        assert gw.stop(signal.SIGTERM) == 0
        assert gw.balancer is not None
        nodes = NodeLog(gw.balancer)
    finally:
        origin.close()

    assert not load.lost, load.lost[:5]
    # the balancer's health check took the node out while its port was still open
    took_out = "Server datorus_nodes/node1 is DOWN, reason: Layer7 wrong status"
    assert took_out in gw.balancer.log.read_text()
    refused = [a for a in load.answers if a.status != 200]
    for a in refused:
        err = assert_envelope(a.status, a.headers, a.body, "SERVICE_UNAVAILABLE", 503)
        assert err["details"] == {"reason": "draining"} and a.headers["retry-after"] == "1"
        assert nodes.node(a) == "node1", a
    after = [a for a in load.answers if a.at > exited_at + 0.1]
    assert after and {a.status for a in after} == {200}
    assert {nodes.node(a) for a in after} == {"node0"}
    assert_ledger_consistent(gw.db, accounts)
    billed = billed_ids(gw.db, accounts)
    served = [a.request_id for a in load.answers if a.status == 200]
    assert sorted(billed) == sorted(served)
    print(f"one node drained: {len(served)} served, {len(refused)} answered 503 while draining")


@pytest.mark.parametrize("crash", [False, True], ids=["restart", "crash"])
def test_postgresql_restarting_under_load_loses_and_doubles_nothing(two_nodes, crash):
    """CONTRACT section 2's ledger grace on two nodes: PostgreSQL stopped (a fast
    shutdown, or SIGKILL as in a crash) and started again under load. Both nodes keep
    answering from memory meanwhile, then flush what they kept: every 200 the clients
    saw is billed exactly once (a batch whose commit was lost with the connection is
    written again under its batch id, never twice)."""
    cluster = PostgresCluster().start()
    origin = RawOrigin()
    try:
        gw = two_nodes(cluster)
        customers = [gw.customer(trial_bytes=10**9, rps=10000, burst=10000) for _ in range(2)]
        accounts = [c[0] for c in customers]
        load = Load(gw.port, origin.url("/bytes/2000"))
        load.run([(u, p) for _, u, p in customers], per_credential=2, seconds=120)
        wait_until(lambda: load.count_since(0) > 200, 60, 0.05, "load on both nodes")
        # restart(), with a wait in the middle: 200 requests served with the ledger gone
        down_at = time.monotonic()
        cluster.stop(kill=crash)
        wait_until(lambda: load.count_since(down_at) > 200, 20, 0.05, "served meanwhile")
        wait_until(lambda: "usage write failed" in gw.log.read_text(), 10, 0.05, "a failed write")
        cluster.start()
        up_at = time.monotonic()
        wait_until(lambda: load.count_since(up_at) > 200, 60, 0.05, "load after the restart")
        load.finish()
        served = sorted(a.request_id for a in load.answers if a.status == 200)
        # what the nodes kept in memory reaches the ledger once it is back
        wait_until(
            lambda: sorted(billed_ids(gw.db, accounts)) == served, 30, 0.2, "every 200 billed"
        )
        assert gw.stop(signal.SIGTERM) == 0
        assert gw.balancer is not None
        nodes = NodeLog(gw.balancer)
        log = gw.log.read_text()
        billed = billed_ids(gw.db, accounts)
        assert_ledger_consistent(gw.db, accounts)
    finally:
        origin.close()
        cluster.destroy()

    assert not load.lost, load.lost[:5]
    assert {a.status for a in load.answers} == {200}  # within the grace: nothing refused
    during = [a for a in load.answers if down_at < a.at < up_at]
    assert {nodes.node(a) for a in during} == {"node0", "node1"}, "both served during it"
    assert sorted(billed) == served  # and nothing more at the clean stop
    assert "usage write failed" in log and "usage write recovered" in log
    print(
        f"PostgreSQL {'crash' if crash else 'restart'} ({up_at - down_at:.1f} s):"
        f" {len(during)} answered meanwhile, {len(served)} in all, each billed once"
    )
