"""The pool worker (issue 17): egress checks in a process of their own, one per ledger.

Each test has its own ledger, its own judge (a list server answering what a judge
answers, counting its hits) and real upstream proxies on loopback aliases. A judge
that answers 3600 s apart per egress is fetched once per egress by each process that
checks, plus once by that process to learn the gateway's own address: the judge's
count says how many processes checked.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_helpers import bearer
from support.ledger import cli, prepare_ledger
from support.lists import ListServer
from support.processes import Gateway
from support.serve import Serve
from support.upstream import UpstreamProxy
from support.waiting import free_port, wait_until

JUDGE = '{"ip": "192.0.2.44", "headers": {"host": "judge"}}'
ONCE = {"egress_check_seconds": 3600, "egress_check_timeout": 3}


@pytest.fixture
def judge() -> Iterator[ListServer]:
    s = ListServer()
    s.serve("/judge", JUDGE, "application/json")
    yield s
    s.close()


@pytest.fixture
def upstreams() -> Iterator[list[UpstreamProxy]]:
    ups = [UpstreamProxy(f"127.0.0.{20 + i}") for i in range(3)]
    yield ups
    for u in ups:
        u.stop()


def _rows(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql, args).fetchall()


def _statuses(db: Path) -> dict[int, str]:
    return dict(_rows(db, "SELECT id, status FROM egress"))


def _runs(db: Path, checker: str) -> int:
    rows = _rows(db, "SELECT runs FROM checker_runs WHERE name = ?", (checker,))
    return int(rows[0][0]) if rows else 0


def _add_all(db: Path, ups: list[UpstreamProxy]) -> list[int]:
    return [int(cli(db, "egress", "add", u.url)["id"]) for u in ups]


def _checked_once_each(db: Path, judge: ListServer, ids: list[int]) -> None:
    """Every egress active after one check, and the judge fetched once per egress plus
    once to learn the gateway's address: one process checked, once."""
    wait_until(lambda: all(_statuses(db).get(i) == "active" for i in ids), 30, 0.1, "all active")
    wait_until(lambda: judge.hits("/judge") >= len(ids) + 1, 10, 0.05, "the judge's hits")


def test_with_two_workers_each_egress_is_checked_once(tmp_path, judge, upstreams, redis_server):
    db = tmp_path / "ledger.db"
    prepare_ledger(db)
    settings = {**ONCE, "redis_url": redis_server.url, "egress_check_url": judge.url("/judge")}
    sv = Serve(db, 2, settings).start()
    try:
        assert len(sv.worker_pids()) == 2
        ids = _add_all(db, upstreams)
        _checked_once_each(db, judge, ids)
        owners = _rows(db, "SELECT owner FROM service_claims WHERE name = 'pool'")
        assert len(owners) == 1
    finally:
        sv.stop()
    assert _runs(db, "http_anonymity") == len(ids)  # not once per worker
    assert judge.hits("/judge") == len(ids) + 1
    assert _rows(db, "SELECT COUNT(*) FROM service_claims") == [(0,)]  # given back at stop


def test_two_gateways_on_one_ledger_check_once_and_take_over(tmp_path, judge, upstreams):
    """Two gateways on one ledger (each starts a pool worker): one claims the pool and
    checks; when its gateway is killed, the other's worker takes the claim and checks
    what is added next."""
    db = tmp_path / "ledger.db"
    prepare_ledger(db)
    settings = {**ONCE, "egress_check_url": judge.url("/judge")}
    a = Gateway(db, settings, nodes=1).start()
    b = Gateway(db, settings, nodes=1).start()
    late = UpstreamProxy("127.0.0.29")
    try:
        ids = _add_all(db, upstreams)
        _checked_once_each(db, judge, ids)
        assert _runs(db, "http_anonymity") == len(ids)
        assert judge.hits("/judge") == len(ids) + 1
        logs = a.log.read_text() + b.log.read_text()
        assert logs.count("checks the pool of this ledger") == 1

        holder = a if "checks the pool of this ledger" in a.log.read_text() else b
        other = b if holder is a else a
        holder.proc.kill()  # its worker sees the pipe close and gives the claim back
        holder.proc.wait(10)
        (eid,) = _add_all(db, [late])
        wait_until(lambda: _statuses(db).get(eid) == "active", 30, 0.1, "checked by the other")
        wait_until(
            lambda: "checks the pool of this ledger" in other.log.read_text(),
            10,
            0.05,
            "the other worker's claim",
        )
    finally:
        late.stop()
        a.stop()
        b.stop()


def test_a_checker_that_raises_fails_the_check(tmp_path, upstreams):
    """A judge whose answer makes the stage-2 checker raise (JSON nested deeper than the
    decoder goes): the proxy passed TCP, but what was not verified never passes, so it
    goes from unchecked to dead, never active, and the error shows as a failed run and
    in the checker's health."""
    bad = ListServer()
    bad.serve("/judge", "[" * 50_000, "application/json")
    db = tmp_path / "ledger.db"
    prepare_ledger(db)
    settings = {
        "egress_check_seconds": 1,
        "egress_check_timeout": 3,
        "egress_dead_after": 2,
        "egress_check_url": bad.url("/judge"),
        "api_port": free_port(),
    }
    g = Gateway(db, settings).start()
    try:
        (eid,) = _add_all(db, upstreams[:1])
        seen: set[str] = set()

        def dead() -> bool:
            status = _statuses(db)[eid]
            seen.add(status)
            return status == "dead"

        wait_until(dead, 30, 0.02, "dead after two failed checks")
        assert seen <= {"unchecked", "dead"}  # never active on TCP alone
        runs = _rows(
            db,
            "SELECT checker_name, passed, detail FROM egress_checks WHERE egress_id = ?"
            " ORDER BY id",
            (eid,),
        )
        assert ("tcp_connect", 1) in {(n, p) for n, p, _ in runs}
        errored = [d for n, p, d in runs if n == "http_anonymity"]
        assert errored and all("RecursionError" in d for d in errored)
        assert all(p == 0 for n, p, _ in runs if n == "http_anonymity")
        key = g.cli("key", "create", "--operator")["key"]
        r = httpx.get(g.api_url + "/stats/plugins", headers=bearer(key), timeout=10)
        http = {c["name"]: c for c in r.json()["checkers"]}["http_anonymity"]
        assert http["errors"] >= 2 and "RecursionError" in http["last_error"]
    finally:
        g.stop()
        bad.close()
