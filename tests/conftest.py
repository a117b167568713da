"""Shared fixtures: one gateway per test module, origins and a throwaway CA per session."""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from hypothesis import settings as hypothesis_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.ledger import ledger_backend  # noqa: E402
from support.origins import Origin  # noqa: E402
from support.paths import REPO  # noqa: E402
from support.postgres import (  # noqa: E402
    PostgresCluster,
    close_shared_cluster,
    postgres_available,
    shared_cluster,
)
from support.processes import (  # noqa: E402
    Gateway,
    GatewaySetup,
    gateway_nodes,
    gateway_workers,
    start_gateway,
)
from support.redis_server import REDIS_SERVER, RedisServer  # noqa: E402
from support.waiting import free_port, wait_http  # noqa: E402

# No test gateway listens on the SOCKS5 entry's default port 1080 (parallel gateways would
# fight over it): a test that wants the entry gives its gateway a free port of its own.
os.environ.setdefault("DATORUS_SOCKS5_PORT", "0")

# Property tests draw the same examples on every run (a run's result does not depend on
# the draw) and have no per-example deadline (a busy shared box is not a failure).
# HYPOTHESIS_PROFILE=explore draws fresh, and more, examples to hunt for new failures.
hypothesis_settings.register_profile("datorus", deadline=None, derandomize=True)
hypothesis_settings.register_profile("explore", deadline=None, max_examples=2000)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "datorus"))

# The tests' proxy lists name proxies on loopback: every gateway, API and CLI the tests
# start may take them (a test of the denial starts its gateway without this).
os.environ.setdefault("DATORUS_SOURCE_PROXY_ALLOW", "127.0.0.0/8,::1/128")


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


@pytest.fixture(scope="session")
def tls_origin(ca: trustme.CA) -> Iterator[Origin]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    o = Origin(tls_context=ctx)
    yield o
    o.close()


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    """How this module's ``gw`` is set up: a module that needs its own overrides this."""
    return GatewaySetup()


@pytest.fixture(scope="module")
def gw(gw_setup: GatewaySetup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway the tests of one module share, set up as the module's ``gw_setup`` says."""
    g = start_gateway(tmp_path_factory.mktemp("gw"), gw_setup)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A plain gateway shared by the tests of one module (fresh ledger), apart from ``gw``."""
    gw = start_gateway(tmp_path_factory.mktemp("gw"))
    yield gw
    gw.stop()


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator:
    """Start a gateway with particular settings for one test."""
    started: list[Gateway] = []

    def make(**settings) -> Gateway:
        d = tmp_path / f"g{len(started)}"
        d.mkdir()
        gw = start_gateway(d, GatewaySetup(settings))
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def customer(gateway: Gateway) -> tuple[int, str, str]:
    """An account with plenty of trial bytes and a credential: (id, user, password)."""
    return gateway.customer(trial_bytes=10**12)


# -- the REST API (issue 6): fake Stripe and a real SMTP server, one each per session ------


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """localstripe on a free loopback port; yields its base URL."""
    import subprocess

    port = free_port()
    log = open(tmp_path_factory.mktemp("localstripe") / "localstripe.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "localstripe_server.py"), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/v1/customers", proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def smtp_server() -> Iterator:
    """An aiosmtpd server on a free loopback port; ``.messages`` holds what it received."""
    from aiosmtpd.controller import Controller

    class Sink:
        def __init__(self) -> None:
            self.messages: list[dict] = []

        async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
            self.messages.append(
                {
                    "from": envelope.mail_from,
                    "to": list(envelope.rcpt_tos),
                    "data": envelope.content.decode("utf-8", "replace"),
                }
            )
            return "250 OK"

    sink = Sink()
    ctl = Controller(sink, hostname="127.0.0.1", port=free_port())
    ctl.start()
    ctl.messages = sink.messages  # type: ignore[attr-defined]
    yield ctl
    ctl.stop()


# -- Redis (issue 15): a real redis-server per test -----------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port for one test (``.url``, ``.port``)."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed: run scripts/test (it installs it)")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


# -- PostgreSQL (issue 16): a real cluster per test process, a database per test ---------


@pytest.fixture(scope="session")
def postgres_cluster() -> PostgresCluster:
    """This test process's PostgreSQL cluster (``.create_database()`` gives a fresh URL)."""
    if not postgres_available():
        pytest.fail("PostgreSQL is not installed: run scripts/test (it installs it)")
    return shared_cluster()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """The URL of a fresh, empty database of this test's own."""
    return postgres_cluster.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh ledger location on each backend in turn: a SQLite path, then a fresh
    PostgreSQL database's URL (for tests of the ledger package on both)."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return str(request.getfixturevalue("postgres_url"))


# -- one process or several (issue 15), one node or several, a SQLite file or PostgreSQL
# (issue 16) ------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "one_process: holds for one gateway process only (skipped with several workers or nodes)",
    )
    config.addinivalue_line(
        "markers",
        "one_node: holds for one node only, not behind a balancer (skipped with several nodes)",
    )
    config.addinivalue_line(
        "markers",
        "sqlite_only: about the SQLite ledger file itself (skipped with"
        " DATORUS_TEST_LEDGER=postgresql)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {}
    if gateway_workers() > 1 or gateway_nodes() > 1:
        skips["one_process"] = pytest.mark.skip(reason="holds for one gateway process only")
    if gateway_nodes() > 1:
        skips["one_node"] = pytest.mark.skip(
            reason="holds for one node only (DATORUS_GATEWAY_NODES)"
        )
    if ledger_backend() == "postgresql":
        skips["sqlite_only"] = pytest.mark.skip(reason="about the SQLite ledger file itself")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop this test process's PostgreSQL cluster, if it started one."""
    close_shared_cluster()
