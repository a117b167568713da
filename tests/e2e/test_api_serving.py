"""The gateway serves the REST API on its second port: start-up and clean stop."""

from __future__ import annotations

import socket

import httpx
import pytest
from support.ledger import new_ledger, prepare_ledger
from support.processes import Gateway
from support.waiting import free_port, wait_http


def test_gateway_with_api_port_in_use_refuses_to_start(tmp_path) -> None:
    db = new_ledger(tmp_path)
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
    db = new_ledger(tmp_path)
    prepare_ledger(db)
    g = Gateway(db, {"api_port": free_port()}).start()
    wait_http(g.api_url + "/health", proc=g.proc)
    if g.workers == 1:  # one process keeps its hot state to itself
        assert httpx.get(g.api_url + "/health", timeout=5).json()["hotState"] == {
            "state": "in-process"
        }
    assert g.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(g.api_url + "/health", timeout=5)


def test_api_docs_load_only_same_origin_assets(tmp_path) -> None:
    """/docs and /redoc work offline: every script, style and icon they reference (and the
    OpenAPI document) is served by the API itself, with the right type."""
    import re

    db = new_ledger(tmp_path)
    prepare_ledger(db)
    g = Gateway(db, {"api_port": free_port()}).start()
    try:
        wait_http(g.api_url + "/health", proc=g.proc)
        kinds = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
        for page in ("/docs", "/redoc"):
            r = httpx.get(g.api_url + page, timeout=10)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
            urls += re.findall(r"""(?:url|spec-url)\s*[:=]\s*['"]([^'"]+)['"]""", r.text)
            assert len(urls) >= 3, r.text
            for url in urls:
                assert url.startswith("/") and not url.startswith("//"), (page, url)
                asset = httpx.get(g.api_url + url, timeout=10)
                assert asset.status_code == 200, (page, url)
                kind = next((v for k, v in kinds.items() if url.endswith(k)), "application/json")
                assert kind in asset.headers["content-type"], (url, asset.headers)
                assert len(asset.content) > 100, url
            assert "http://" not in r.text and "https://" not in r.text, r.text
    finally:
        g.stop()
