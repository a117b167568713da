"""Fixtures of the unit tests: a real redis-server per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_proc import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port (no persistence), stopped after the test."""
    d = tmp_path / "redis"
    d.mkdir()
    server = RedisServer(d).start()
    yield server
    server.stop()
