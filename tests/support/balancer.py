"""A real HAProxy for tests: the proxy sections of ``deploy/haproxy.cfg`` in front of nodes.

:func:`render_config` reads the shipped ``deploy/haproxy.cfg`` and keeps its
``defaults``, ``frontend datorus_proxy`` and ``backend datorus_nodes`` sections line for
line (timeouts, retries, redispatch, the health check and its timing, the unchecked
fallback lines), with four changes for a test: a ``global`` section of its own (one
thread, an admin socket in the test's folder, its log (a line per connection, naming
the node) to its stdout, no chroot, user or syslog), the frontend
bound to ``127.0.0.1:PORT``, one primary and one fallback ``server`` line per test node
with the options the shipped lines carry, and ``balance roundrobin``, so that
consecutive connections alternate nodes (the shipped ``leastconn`` would do the same
among idle nodes, but a tunnel held open would steer every later connection away).
The API's sections are left out: a test gateway's REST API is served by its first node.

:class:`Balancer` runs ``haproxy -db -f CONFIG`` (``scripts/test`` installs Debian's
``haproxy``); ``.servers()`` reads what it thinks of each node from its admin socket.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

from .paths import REPO
from .waiting import wait_until

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
DEPLOY_CONFIG = REPO / "deploy" / "haproxy.cfg"
FRONTEND = "datorus_proxy"
BACKEND = "datorus_nodes"


def haproxy_available() -> bool:
    """Whether HAProxy is installed."""
    return Path(HAPROXY).exists()


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """The configuration's sections: (header line, body lines), comments left out."""
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line[0].isspace():
            sections.append((stripped, []))
        elif sections:
            sections[-1][1].append(stripped)
    return sections


def render_config(listen_port: int, node_ports: list[int], admin_socket: Path) -> str:
    """A configuration for HAProxy on 127.0.0.1:*listen_port* in front of *node_ports*."""
    kept = {"defaults", f"frontend {FRONTEND}", f"backend {BACKEND}"}
    out = [
        "global",
        "    nbthread 1",
        "    log stdout format raw local0",  # one line per connection, with its node
        f"    stats socket {admin_socket} mode 600 level admin",
        "",
    ]
    for header, body in _sections(DEPLOY_CONFIG.read_text()):
        if header not in kept:
            continue
        out.append(header)
        servers = []
        for line in body:
            words = line.split()
            if header == f"frontend {FRONTEND}" and words[0] == "bind":
                line = f"bind 127.0.0.1:{listen_port}"
            elif header == f"backend {BACKEND}" and words[0] == "balance":
                line = "balance roundrobin"
            elif header == f"backend {BACKEND}" and words[0] == "server":
                servers.append(words[3:])
                continue
            out.append(f"    {line}")
        if header == f"backend {BACKEND}":
            primary = next(opts for opts in servers if "backup" not in opts)
            backup = next(opts for opts in servers if "backup" in opts)
            for i, port in enumerate(node_ports):
                out.append(f"    server node{i} 127.0.0.1:{port} {' '.join(primary)}")
            for i, port in enumerate(node_ports):
                out.append(f"    server node{i}-fallback 127.0.0.1:{port} {' '.join(backup)}")
        out.append("")
    return "\n".join(out)


class Balancer:
    """``haproxy -db -f CONFIG`` on 127.0.0.1:*port*, in front of *node_ports*."""

    def __init__(self, directory: Path, port: int, node_ports: list[int]) -> None:
        self.dir = directory
        self.port = port
        self.node_ports = node_ports
        self.config = directory / f"haproxy-{port}.cfg"
        self.admin = directory / f"haproxy-{port}.sock"
        self.log = directory / f"haproxy-{port}.log"
        self.proc: subprocess.Popen | None = None
        self.soft_stopped = False  # SIGUSR1 sent: no longer accepting

    def running(self) -> bool:
        """Whether the HAProxy process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> Balancer:
        """Write the configuration, start HAProxy, wait until its port and socket answer."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(render_config(self.port, self.node_ports, self.admin))
        self.admin.unlink(missing_ok=True)
        self.soft_stopped = False
        self.logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(self.config)], stdout=self.logf, stderr=subprocess.STDOUT
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited: {self.log.read_text()[-2000:]}")
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return bool(self.servers())

        wait_until(up, timeout, 0.02, "haproxy listening")
        return self

    def command(self, line: str) -> str:
        """One command on HAProxy's admin socket (``show stat``, ``set server ...``)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.admin))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, str]:
        """The status of each checked node as HAProxy sees it: ``{"node0": "UP", ...}``."""
        lines = self.command("show stat").splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        names = lines[0][2:].split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(names, line.split(","), strict=False))
            name = row.get("svname", "")
            primary = name.startswith("node") and not name.endswith("-fallback")
            if row.get("pxname") == BACKEND and primary:
                states[name] = row["status"]
        return states

    def wait_all_up(self, timeout: float = 30.0) -> None:
        """Wait until HAProxy's health check has every node up."""
        wait_until(
            lambda: (s := self.servers()) and all(v == "UP" for v in s.values()),
            timeout,
            0.05,
            "every node up at the balancer",
        )

    def soft_stop(self) -> None:
        """SIGUSR1: stop accepting; connections already open go on until they end."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGUSR1)
            self.soft_stopped = True

    def stop(self) -> None:
        """Stop it at once (SIGTERM, then SIGKILL)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self.logf.close()
