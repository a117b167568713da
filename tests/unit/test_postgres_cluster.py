"""The tests' own PostgreSQL (tests/support/postgres.py): a real server that the tests start,
with a database per test that survives a restart of the server."""

from __future__ import annotations

from support.postgres import PostgresCluster


def test_each_test_gets_a_database_of_its_own(postgres_cluster: PostgresCluster) -> None:
    a, b = postgres_cluster.create_database(), postgres_cluster.create_database()
    assert a != b and a.startswith("postgresql://postgres@127.0.0.1:")
    name = a.rsplit("/", 1)[1]
    postgres_cluster.psql("CREATE TABLE t (x BIGINT); INSERT INTO t VALUES (1)", name)
    assert postgres_cluster.psql("SELECT sum(x) FROM t", name).strip() == "1"
    listen = postgres_cluster.psql("SHOW listen_addresses").strip()
    assert listen == "127.0.0.1"


def test_a_restarted_server_keeps_what_was_committed() -> None:
    # a cluster of its own: restarting the shared one would cut other tests' connections
    cluster = PostgresCluster().start()
    try:
        name = cluster.create_database().rsplit("/", 1)[1]
        cluster.psql("CREATE TABLE t (x BIGINT); INSERT INTO t VALUES (41), (1)", name)
        cluster.restart(kill=True)
        assert cluster.psql("SELECT sum(x) FROM t", name).strip() == "42"
    finally:
        cluster.destroy()
    assert not cluster.dir.exists()
