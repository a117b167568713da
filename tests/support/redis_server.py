"""A real redis-server for tests: Debian's ``redis-server`` on a free loopback port.

``RedisServer(folder).start()`` runs one, nothing saved to disk, and waits for PING;
``.url`` is what ``datorus_redis_url`` takes. The ``redis_server`` fixture in
``conftest.py`` gives each test its own. ``scripts/test`` installs ``redis-server``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from .waiting import free_port, wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def ping(port: int, timeout: float = 1.0) -> bool:
    """Whether a Redis on 127.0.0.1:*port* answers ``PING`` with ``+PONG``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        return s.recv(64).startswith(b"+PONG")


class RedisServer:
    """``redis-server --port P --bind 127.0.0.1 --save '' --appendonly no --dir DIR``."""

    def __init__(self, directory: Path, db: int = 0) -> None:
        self.dir = directory
        self.port = free_port()
        self.db = db
        self.log = directory / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/DB``."""
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start it and wait until it answers PING."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=self.logf,
            stderr=subprocess.STDOUT,
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.log.read_text()[-1000:]}")
            return ping(self.port)

        wait_until(up, timeout, 0.02, "redis-server answering PING")
        return self

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.logf.close()
