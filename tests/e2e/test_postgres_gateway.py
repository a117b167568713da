"""The gateway on a PostgreSQL ledger (issue 16): ``--set datorus_db=postgresql://...``.

A real mitmdump on a database of the tests' own PostgreSQL cluster serves a credential
made with the real CLI on the same URL and bills it exactly as the origin counted the
bytes; a database that does not exist stops it at start with ``datorus: fatal:`` and
the URL's password masked. (The whole end-to-end suite against PostgreSQL is run
elsewhere; this is the gateway's own proof that it runs on one.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from support.counting import RawOrigin
from support.ledger import cli, prepare_ledger
from support.postgres import PostgresCluster
from support.processes import Gateway
from support.waiting import wait_until

NANO = 10**9


@pytest.fixture(scope="module")
def raw_origin() -> Iterator[RawOrigin]:
    o = RawOrigin()
    yield o
    o.close()


def with_password(url: str, password: str) -> str:
    """*url* (``postgresql://postgres@...``) with a password (trust auth ignores it)."""
    return url.replace("postgres@", f"postgres:{password}@", 1)


def test_a_gateway_on_postgresql_serves_and_bills_exactly(
    postgres_cluster: PostgresCluster, raw_origin: RawOrigin, tmp_path: Path
) -> None:
    url = with_password(postgres_cluster.create_database("gw"), "s3cret")
    prepare_ledger(url)  # datorus init, and the loopback origins allowed
    acc = cli(url, "account", "create", "pg@example.com", "--trial-bytes", "10000")
    cli(url, "balance", "add", str(acc["id"]), "100")
    cred = cli(url, "credential", "create", str(acc["id"]))
    user, pw = cred["username"], cred["password"]
    gw = Gateway(tmp_path / "unused.db", {"db": url}, set_db=False)
    gw.start()
    try:
        gw.wait_for_credential(user, pw)
        before = len(raw_origin.conns)
        with requests.Session() as s:
            r = s.get(
                raw_origin.url("/bytes/50000"),
                proxies={"http": gw.proxy(user, pw)},
                timeout=30,
            )
        assert r.status_code == 200 and len(r.content) == 50000
        rid = r.headers["X-Datorus-Request-Id"]

        def receipt() -> dict | None:
            got = cli(url, "receipt", rid, check=False)
            return got if "requestId" in got else None

        rec = wait_until(receipt, 10, 0.05, f"receipt {rid}")
        conn = raw_origin.conns[before]
        moved = conn["in"] + conn["out"]
        # the probe that found the credential live moved nothing: one request, billed exactly
        assert (rec["bytesUp"], rec["bytesDown"]) == (conn["in"], conn["out"])
        paid = moved - 10000  # the trial first, then 300 cents per GB: 300 nanocents a byte
        assert rec["trialBytes"] == 10000 and rec["nanocents"] == paid * 300
        used = cli(url, "usage", str(acc["id"]))
        assert used["bytes"] == moved and used["requests"] == 1
        assert used["chargedNanocents"] == paid * 300
        assert used["balanceNanocents"] == 100 * NANO - paid * 300
        assert used["trialRemainingBytes"] == 0
        log = gw.log.read_text()
        assert "s3cret" not in log and "postgres:********@127.0.0.1" in log
    finally:
        assert gw.stop() == 0


def test_a_gateway_on_a_missing_postgresql_database_stops_at_start(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = with_password(postgres_cluster.url(f"missing_{uuid.uuid4().hex[:8]}"), "s3cret")
    gw = Gateway(tmp_path / "unused.db", {"db": url}, set_db=False)
    gw.start(wait=False)
    try:
        assert gw.proc is not None
        assert gw.proc.wait(30) == 2
        out = gw.log.read_text()
        fatal = [line for line in out.splitlines() if line.startswith("datorus: fatal: ")]
        assert fatal, out[-2000:]
        assert "datorus_db: cannot open the ledger postgresql://postgres:********@" in fatal[0]
        assert "does not exist" in fatal[0] and "createdb" in fatal[0]
        assert "s3cret" not in out
    finally:
        gw.stop()


def test_postgresql_restarting_under_a_gateway_loses_and_doubles_nothing(
    raw_origin: RawOrigin, tmp_path: Path
) -> None:
    # a cluster of this test's own: it is stopped and started again under the gateway
    cluster = PostgresCluster().start()
    try:
        url = cluster.create_database("restart")
        prepare_ledger(url)
        acc = cli(url, "account", "create", "restart@example.com", "--trial-bytes", "0")
        cli(url, "balance", "add", str(acc["id"]), "100")
        cred = cli(url, "credential", "create", str(acc["id"]))
        user, pw = cred["username"], cred["password"]
        gw = Gateway(tmp_path / "unused.db", {"db": url, "ledger_grace": 60}, set_db=False)
        gw.start()
        try:
            gw.wait_for_credential(user, pw)
            before = len(raw_origin.conns)

            def get(n: int) -> None:
                with requests.Session() as s:
                    r = s.get(
                        raw_origin.url(f"/bytes/{n}"),
                        proxies={"http": gw.proxy(user, pw)},
                        timeout=30,
                    )
                assert r.status_code == 200 and len(r.content) == n

            get(1000)
            cluster.stop()
            for n in (2000, 3000, 4000):  # served from memory within the ledger grace
                get(n)
            wait_until(
                lambda: "usage write failed" in gw.log.read_text(), 10, 0.05, "a failed write"
            )
            cluster.start()
            conns = raw_origin.conns[before:]
            moved = sum(c["in"] + c["out"] for c in conns)

            def written() -> dict | None:
                got = cli(url, "usage", str(acc["id"]), check=False)
                return got if got.get("requests") == 4 else None

            used = wait_until(written, 20, 0.1, "the kept usage written")
            assert used["bytes"] == moved and used["chargedNanocents"] == moved * 300
            assert used["balanceNanocents"] == 100 * NANO - moved * 300
            assert "usage write recovered" in gw.log.read_text()
        finally:
            assert gw.stop() == 0
        final = cli(url, "usage", str(acc["id"]))
        assert final["requests"] == 4 and final["bytes"] == moved  # nothing written twice
    finally:
        cluster.destroy()
