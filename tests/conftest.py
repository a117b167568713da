"""Shared fixtures: one gateway per test module, origins and a throwaway CA per session."""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import Gateway, Origin, prepare_ledger  # noqa: E402


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


def _start(tmp: Path, settings: dict | None = None) -> Gateway:
    db = tmp / "ledger.db"
    prepare_ledger(db)
    return Gateway(db, settings).start()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway shared by the tests of one module (fresh ledger)."""
    gw = _start(tmp_path_factory.mktemp("gw"))
    yield gw
    gw.stop()


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator:
    """Start a gateway with particular settings for one test."""
    started: list[Gateway] = []

    def make(**settings) -> Gateway:
        d = tmp_path / f"g{len(started)}"
        d.mkdir()
        gw = _start(d, settings)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def customer(gateway: Gateway) -> tuple[int, str, str]:
    """An account with plenty of trial bytes and a credential: (id, user, password)."""
    return gateway.customer(trial_bytes=10**12)
