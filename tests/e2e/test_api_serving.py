"""The gateway serves the REST API on its second port: start-up and clean stop."""

from __future__ import annotations

import socket

import httpx
import pytest
from support import Gateway, free_port, prepare_ledger, wait_http


def test_gateway_with_api_port_in_use_refuses_to_start(tmp_path) -> None:
    db = tmp_path / "ledger.db"
    prepare_ledger(db)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        g = Gateway(db, {"api_port": taken.getsockname()[1]}).start(wait=False)
        try:
            assert g.proc.wait(30) == 2
        finally:
            g.stop()
        assert "REST API cannot listen" in g.log.read_text()


def test_gateway_stops_cleanly_with_its_api(tmp_path) -> None:
    db = tmp_path / "ledger.db"
    prepare_ledger(db)
    g = Gateway(db, {"api_port": free_port()}).start()
    wait_http(g.api_url + "/health", proc=g.proc)
    assert g.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(g.api_url + "/health", timeout=5)
