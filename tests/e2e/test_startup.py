"""Start-up and restarts (CONTRACT section 2): never an open proxy, no request refused
while the gateway loads, and a briefly unreachable ledger does not refuse traffic."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from checks import assert_envelope, raw_request
from support.clients import basic
from support.ledger import (
    LedgerTarget,
    ledger_value,
    missing_ledger,
    new_ledger,
    prepare_ledger,
)
from support.paths import MITMDUMP, REPO
from support.processes import Gateway
from support.waiting import free_port, wait_until

FAULTS = {
    "wrong type": ({"rps": "abc"}, None, "datorus_rps: 'abc' is not a whole number"),
    "wrong type (timeout)": (
        {"upstream_timeout": "soon"},
        None,
        "datorus_upstream_timeout: 'soon' is not a whole number",
    ),
    "given twice": ({"api_port": ["0", "0"]}, None, "datorus_api_port: given 2 times"),
    "unknown name": ({"bogus": "1"}, None, "unknown setting datorus_bogus"),
    "bad value": ({"allow": "not-a-cidr"}, None, "datorus_allow: 'not-a-cidr' is not a CIDR"),
    "bad found-proxy range": (
        {"source_proxy_allow": "10.0.0.0/33"},
        None,
        "datorus_source_proxy_allow: '10.0.0.0/33' is not a CIDR[:PORT]",
    ),
    "bad found-proxy range (environment)": (
        {},
        {"DATORUS_SOURCE_PROXY_ALLOW": "example.com"},
        "datorus_source_proxy_allow: 'example.com' is not a CIDR[:PORT]",
    ),
    "bad environment": ({}, {"DATORUS_RPS": "many"}, "datorus_rps: 'many' is not a whole number"),
    "bad mitm.conf": ({}, "conf", "not valid YAML"),
    "ledger cannot be opened": ({"db": "missing"}, None, "datorus_db: cannot open the ledger"),
    "API port taken": ({"api_port": "taken"}, None, "REST API cannot listen"),
    "bad metrics port": (
        {"metrics_port": "70000"},
        None,
        "datorus_metrics_port: must be a port number 0-65535",
    ),
    "metrics port not a number": (
        {"metrics_port": "many"},
        None,
        "datorus_metrics_port: 'many' is not a whole number",
    ),
    "bad metrics host": (
        {"metrics_host": "localhost"},
        None,
        "datorus_metrics_host: 'localhost' is not an IP address",
    ),
    "bad metrics port in the environment": (
        {},
        {"DATORUS_METRICS_PORT": "-1"},
        "datorus_metrics_port: must be a port number 0-65535",
    ),
    "negative SOCKS5 port": (
        {"socks5_port": "-1"},
        None,
        "datorus_socks5_port: must be a port number 0-65535",
    ),
    "SOCKS5 port too large": (
        {"socks5_port": "70000"},
        None,
        "datorus_socks5_port: must be a port number 0-65535",
    ),
    "SOCKS5 port not a number": (
        {"socks5_port": "abc"},
        None,
        "datorus_socks5_port: 'abc' is not a whole number",
    ),
    "SOCKS5 port taken": ({"socks5_port": "taken"}, None, "datorus_socks5_port: cannot listen"),
    "no event days": ({"event_days": "0"}, None, "datorus_event_days: must be > 0"),
    "event days not a number": (
        {},
        {"DATORUS_EVENT_DAYS": "a month"},
        "datorus_event_days: 'a month' is not a whole number",
    ),
    "negative pool-low threshold": (
        {"event_pool_low": "-1"},
        None,
        "datorus_event_pool_low: must be >= 0",
    ),
    "no event keep-alive": (
        {"event_keepalive_seconds": "0"},
        None,
        "datorus_event_keepalive_seconds: must be > 0",
    ),
    "event retry not a number": (
        {"event_retry_seconds": "1d"},
        None,
        "datorus_event_retry_seconds: '1d' is not a whole number",
    ),
    "negative first event retry": (
        {"event_retry_first_ms": "-5000"},
        None,
        "datorus_event_retry_first_ms: must be > 0",
    ),
    "no webhook timeout": ({"webhook_timeout": "0"}, None, "datorus_webhook_timeout: must be > 0"),
    "negative webhook timeout": (
        {"webhook_timeout": "-10"},
        None,
        "datorus_webhook_timeout: must be > 0",
    ),
    "webhook timeout not a number": (
        {"webhook_timeout": "2.5"},
        None,
        "datorus_webhook_timeout: '2.5' is not a whole number",
    ),
    "webhook timeout not a number (environment)": (
        {},
        {"DATORUS_WEBHOOK_TIMEOUT": "slow"},
        "datorus_webhook_timeout: 'slow' is not a whole number",
    ),
}


def _probe_until_exit(proc: subprocess.Popen, port: int, origin, path: str) -> None:
    """Send unauthenticated requests until the process ends: none may be relayed."""
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            status, _, _ = raw_request(
                port, f"GET {origin.url(path)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
        except OSError:
            time.sleep(0.02)  # not listening yet: try again until it exits
            continue
        assert status != 200, "an unauthenticated request was relayed"
    assert proc.poll() is not None, "a faulty gateway kept running"


# with several nodes only the first serves the API: a taken API port stops that node alone
# faults in a setting the two-node harness sets per node (a second node gets its own API
# port, no metrics port and no SOCKS5 entry): only the first node would see them
ONE_NODE_FAULTS = {
    "API port taken",
    "bad metrics port",
    "metrics port not a number",
    "negative SOCKS5 port",
    "SOCKS5 port too large",
    "SOCKS5 port not a number",
    "SOCKS5 port taken",
}


@pytest.mark.parametrize(
    "fault",
    [pytest.param(f, marks=[pytest.mark.one_node] if f in ONE_NODE_FAULTS else []) for f in FAULTS],
    ids=list(FAULTS),
)
def test_faulty_start_up_stops_with_a_message_and_relays_nothing(tmp_path, origin, fault):
    settings, env, message = FAULTS[fault]
    settings = dict(settings)
    db = new_ledger(tmp_path)
    prepare_ledger(db)
    held = None
    if settings.get("db") == "missing":
        db = missing_ledger(tmp_path)
        del settings["db"]
    taken = [name for name in ("api_port", "socks5_port") if settings.get(name) == "taken"]
    if taken:  # another program listens on the port the setting names
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        settings[taken[0]] = held.getsockname()[1]
    if env == "conf":
        conf = tmp_path / "broken.conf"
        conf.write_text("rps: [unclosed\n")
        env = {"DATORUS_CONF": str(conf)}
    gw = Gateway(db, settings, env)
    gw.log = tmp_path / "gateway.log"
    path = f"/fault-{uuid.uuid4().hex}"
    try:
        gw.start(wait=False)
        assert gw.proc is not None
        _probe_until_exit(gw.proc, gw.port, origin, path)
        assert gw.proc.returncode == 2
        out = gw.log.read_text()
        fatal = [line for line in out.splitlines() if line.startswith("datorus: fatal: ")]
        assert fatal and message in fatal[0], out[-2000:]
    finally:
        gw.stop()
        if held is not None:
            held.close()
    assert not [s for s in origin.seen if s["path"] == path]


def test_an_exception_in_any_guarded_hook_stops_the_process(tmp_path, origin):
    port = free_port()
    path = f"/boom-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [
            MITMDUMP,
            "-s",
            str(Path(__file__).parent / "data" / "faulty_addon.py"),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _probe_until_exit(proc, port, origin, path)
        out = proc.communicate(timeout=10)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2
    assert "datorus: fatal: boom.running failed: RuntimeError: boom in running" in out
    assert not [s for s in origin.seen if s["path"] == path]


def _customer(db: LedgerTarget) -> tuple[str, str]:
    from support.ledger import cli

    email = f"s{uuid.uuid4().hex[:8]}@example.com"
    acc = cli(db, "account", "create", email, "--rps", "1000", "--burst", "2000")
    cred = cli(db, "credential", "create", str(acc["id"]))
    return cred["username"], cred["password"]


@contextlib.contextmanager
def _serving(
    tmp_path: Path, **settings: object
) -> Iterator[tuple[Gateway, LedgerTarget, str, str]]:
    """A running gateway with one customer it already knows: (gateway, db, user, password)."""
    db = new_ledger(tmp_path)
    prepare_ledger(db)
    gw = Gateway(db, settings).start()
    try:
        user, pw = _customer(db)
        gw.wait_for_credential(user, pw)
        yield gw, db, user, pw
    finally:
        gw.stop()


def _hold_shm_lock(db: Path) -> subprocess.Popen:
    """Another process holds every WAL read-mark lock: reads of the ledger fail
    ("locking protocol") until it lets go, as with a stuck backup or checker."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sqlite3, sys\n"
            # an open connection keeps the WAL index file (-shm) in place
            f"c = sqlite3.connect({str(db)!r})\n"
            "c.execute('SELECT 1 FROM sqlite_master').fetchall()\n"
            f"fd = os.open({str(db) + '-shm'!r}, os.O_RDWR)\n"
            # the gateway holds these locks for an instant at each read: try until free
            "import time\n"
            "deadline = time.monotonic() + 10\n"
            "while True:\n"
            "    try:\n"
            "        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 123, os.SEEK_SET)\n"
            "        break\n"
            "    except BlockingIOError:\n"
            "        if time.monotonic() > deadline: raise\n"
            "        time.sleep(0.005)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _release(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


@pytest.mark.sqlite_only  # the ledger is held unreadable through SQLite's WAL index locks
def test_requests_that_come_while_the_ledger_loads_wait_and_are_served(tmp_path, origin):
    db = new_ledger(tmp_path)
    prepare_ledger(db)
    user, pw = _customer(db)
    # a ledger that cannot be read for a moment keeps the gateway loading after its
    # port accepts: 20 requests sent then must wait for it, not get 503
    lock = _hold_shm_lock(db)
    gw = Gateway(db, {"startup_wait": 30})
    gw.log = tmp_path / "gateway.log"
    try:
        gw.start(wait=False)

        def accepts() -> bool:
            assert gw.proc is not None and gw.proc.poll() is None, gw.log.read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(accepts, 30, 0.01, "port accepts")

        def fetch(i: int) -> int:
            return requests.get(
                origin.url(f"/startup-{i}"),
                proxies={"http": gw.proxy(user, pw)},
                timeout=60,
            ).status_code

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(fetch, i) for i in range(20)]
            wait_until(
                lambda: "ledger" in gw.log.read_text() and "busy at start" in gw.log.read_text(),
                30,
                0.05,
                "the gateway retrying its busy ledger",
            )
            _release(lock)
            statuses = [f.result(timeout=60) for f in futures]
        assert statuses == [200] * 20
    finally:
        if lock.poll() is None:
            _release(lock)
        gw.stop()


def _usage_requests(db: LedgerTarget, account_user: str) -> int:
    return int(
        ledger_value(
            db,
            "SELECT COUNT(*) FROM receipts r JOIN credentials c ON c.id = r.credential_id"
            " WHERE c.username = ?",
            (account_user,),
        )
    )


@pytest.mark.sqlite_only  # SQLite's own exclusive lock
def test_traffic_flows_on_while_an_operator_holds_the_ledger_exclusively(tmp_path, origin):
    with _serving(tmp_path) as (gw, db, user, pw):
        proxies = {"http": gw.proxy(user, pw)}
        lock = sqlite3.connect(db, isolation_level=None, timeout=10)
        lock.execute("BEGIN EXCLUSIVE")  # as `sqlite3 datorus.db 'BEGIN EXCLUSIVE; ...'`
        started = time.monotonic()
        statuses = []
        try:
            while time.monotonic() - started < 3 and len(statuses) < 500:  # a 3-second lock
                statuses.append(requests.get(origin.url("/x"), proxies=proxies, timeout=10))
            # nothing could be written while the lock held
            assert lock.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 0
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert [r.status_code for r in statuses] == [200] * len(statuses)
        wait_until(lambda: _usage_requests(db, user) == len(statuses), 15, 0.1, "usage written")


@pytest.mark.one_process  # it counts one process's log lines (each worker logs its own)
@pytest.mark.sqlite_only  # the ledger is held unreadable through SQLite's WAL index locks
def test_a_ledger_that_cannot_be_read_does_not_refuse_traffic(tmp_path, origin):
    with _serving(tmp_path) as (gw, db, user, pw):
        proxies = {"http": gw.proxy(user, pw)}
        lock = _hold_shm_lock(db)
        try:
            wait_until(
                lambda: "ledger refresh failed" in gw.log.read_text(), 30, 0.1, "a failed refresh"
            )
            statuses = [
                requests.get(origin.url("/y"), proxies=proxies, timeout=10).status_code
                for _ in range(5)
            ]
        finally:
            _release(lock)
        assert statuses == [200] * 5
        wait_until(lambda: _usage_requests(db, user) == 5, 30, 0.1, "usage written")
        # one warning for the episode, one when it ended
        wait_until(lambda: "ledger refresh recovered" in gw.log.read_text(), 30, 0.1, "recovery")
        assert gw.log.read_text().count("ledger refresh failed") == 1


@pytest.mark.sqlite_only  # the ledger is held unreadable through SQLite's WAL index locks
def test_past_ledger_grace_new_requests_get_503(tmp_path, origin):
    with _serving(tmp_path, ledger_grace=1) as (gw, db, user, pw):
        req = (
            f"GET {origin.url('/z')} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n"
        ).encode()
        lock = _hold_shm_lock(db)
        try:
            status, headers, body = wait_until(
                lambda: (r := raw_request(gw.port, req))[0] == 503 and r,
                30,
                0.1,
                "a 503 past the grace",
            )
        finally:
            _release(lock)
        err = assert_envelope(status, headers, body, "SERVICE_UNAVAILABLE", 503)
        assert err["details"] == {"reason": "ledger_stale"}
        assert headers["retry-after"] == "1"
        wait_until(lambda: raw_request(gw.port, req)[0] == 200, 30, 0.1, "served again")


# Through a TCP balancer, a connection that comes after the last node stopped listening is
# accepted by the balancer and closed: a whole gateway of nodes stops with its balancer
# first (README, "Two boxes"). One node's drain behind a running balancer, where nothing
# is lost, is tests/e2e/test_nodes.py's.
@pytest.mark.one_node
def test_a_stopping_gateway_answers_or_refuses_never_accepts_and_resets(tmp_path, origin):
    """From SIGTERM to exit every new connection gets the 503 draining envelope or is
    refused at once (the listening socket closes when the drain ends), so a client that
    honours Retry-After and retries connection errors never loses a request."""
    with _serving(tmp_path) as (gw, _, user, pw):
        req = (
            f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n"
        ).encode()
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        outcomes: list[str] = []
        deadline = time.monotonic() + 30
        while gw.proc.poll() is None and time.monotonic() < deadline:
            try:
                status, _, _ = raw_request(gw.port, req)
                outcomes.append(str(status))
            except ConnectionRefusedError:
                outcomes.append("refused")
            except OSError as e:  # reset, or closed without an answer
                outcomes.append(f"lost: {e!r}")
        assert gw.proc.wait(30) == 0
        assert outcomes and not [o for o in outcomes if o.startswith("lost")], outcomes[-5:]
        assert set(outcomes) <= {"503", "200", "refused"}


@pytest.mark.one_node  # through a balancer, its own health check decides who answers
def test_drain_listen_seconds_keeps_an_idle_stopping_port_answering_503(tmp_path, origin):
    """With nothing under way, a stopping gateway closes its port at once; with
    drain_listen_seconds it answers 503 that long first (a balancer's health check takes
    the node out meanwhile), then closes it and exits 0."""
    with _serving(tmp_path, drain_listen_seconds=2) as (gw, _, user, pw):
        req = (
            f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n"
        ).encode()
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        statuses = []
        while time.monotonic() - stopped < 1.5:  # well inside the 2 s: never refused
            status, headers, body = raw_request(gw.port, req)
            statuses.append(status)
            if status == 503:
                err = assert_envelope(status, headers, body, "SERVICE_UNAVAILABLE", 503)
                assert err["details"] == {"reason": "draining"}
        # served until the signal landed, then 503 only
        served = statuses.count(200)
        assert statuses == [200] * served + [503] * (len(statuses) - served)
        assert statuses[-1] == 503
        assert gw.proc.wait(30) == 0
        assert time.monotonic() - stopped >= 2
