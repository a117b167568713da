"""Test support: a real gateway process, real origins on loopback, the real CLI.

Nothing here patches Datorus: the gateway is ``mitmdump -s addons/datorus.py`` in a
subprocess, the ledger is a real SQLite file, the CLI is the installed ``datorus``.
Helpers wait on readiness probes, never on fixed sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MITMDUMP = str(BIN / "mitmdump")
DATORUS = str(BIN / "datorus")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on *host* right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll *pred* until it returns a truthy value; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # probes may fail while a server starts
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def basic(user: str, password: str) -> str:
    """A ``Basic`` header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- the CLI ------------------------------------------------------------------------------


def cli(db: str | Path, *args: str, check: bool = True) -> dict[str, Any]:
    """Run ``datorus --db DB ARGS --json`` and return its one JSON object."""
    p = subprocess.run(
        [DATORUS, "--db", str(db), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"datorus {args} failed ({p.returncode}): {p.stderr}")
    out = p.stdout if p.returncode == 0 else p.stderr
    return json.loads(out) if out.strip() else {}


# -- the gateway --------------------------------------------------------------------------


class Gateway:
    """A running ``mitmdump -s addons/datorus.py`` on a free loopback port."""

    def __init__(
        self,
        db: Path,
        settings: dict[str, Any] | None = None,
        env: dict | None = None,
        set_db: bool = True,
    ):
        """*set_db* False leaves ``datorus_db`` to the settings file and environment."""
        self.db = db
        self.set_db = set_db
        self.port = free_port()
        self.settings = {
            "api_port": 0,
            "refresh_ms": 200,
            "auth_fail_limit": 100_000,
            "router_seed": 1,  # a failing run's egress picks repeat when it is run again
            **(settings or {}),
        }
        self.env = env
        self.proc: subprocess.Popen | None = None
        logdir = db.parent if db.parent.exists() else db.parent.parent
        self.log = logdir / f"gateway-{self.port}.log"

    def start(self, wait: bool = True) -> Gateway:
        cmd = [
            MITMDUMP,
            "-s",
            str(REPO / "addons" / "datorus.py"),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
        ]
        if self.set_db:
            cmd += ["--set", f"datorus_db={self.db}"]
        for k, v in self.settings.items():
            if isinstance(v, list | tuple):
                for item in v:
                    cmd += ["--set", f"datorus_{k}={item}"]
            else:
                cmd += ["--set", f"datorus_{k}={v}"]
        env = {**os.environ, **(self.env or {})}
        self.logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=self.logf, stderr=subprocess.STDOUT, env=env
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Ready when a request without credentials gets the 407 envelope (not 503)."""

        def probe() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"gateway exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.1 407")

        wait_until(probe, timeout, 0.05, "gateway ready")

    def stop(self, sig: int | None = None, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.logf.close()
        return self.proc.returncode

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def proxy(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def cli(self, *args: str, check: bool = True) -> dict[str, Any]:
        return cli(self.db, *args, check=check)

    def customer(self, **opts: Any) -> tuple[int, str, str]:
        """A new account (with options as CLI flags) and a credential: (id, user, password)."""
        email = f"c{time.monotonic_ns()}@example.com"
        args = ["account", "create", email]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        acc = self.cli(*args)
        cred = self.cli("credential", "create", str(acc["id"]))
        self.wait_for_credential(cred["username"], cred["password"])
        return acc["id"], cred["username"], cred["password"]

    def wait_for_credential(self, user: str, password: str, timeout: float = 5.0) -> None:
        """Wait until the running gateway knows a credential (operator changes are polled)."""

        def known() -> bool:
            with raw_connection(self.port) as s:
                # port 1: parsed and authenticated, then refused at once by loopback
                s.sendall(
                    f"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n"
                    f"Proxy-Authorization: {basic(user, password)}\r\n\r\n".encode()
                )
                return read_response(s)[0] != 407

        wait_until(known, timeout, 0.05, f"credential {user} live")


def prepare_ledger(db: Path) -> None:
    """``datorus init`` and allow the loopback origins the tests use."""
    cli(db, "init")
    cli(db, "policy", "allow", "127.0.0.0/8")
    cli(db, "policy", "allow", "::1/128")


# -- origins ------------------------------------------------------------------------------


class OriginHandler(BaseHTTPRequestHandler):
    """A test origin: records what it saw, answers by path."""

    protocol_version = "HTTP/1.1"
    server_version = "origin"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _record(self, body: bytes) -> None:
        self.server.seen.append(  # type: ignore[attr-defined]
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "raw_headers": list(self.headers.items()),
                "body_len": len(body),
                "body_sha": hashlib.sha256(body).hexdigest(),
                "peer": self.client_address[0],
            }
        )

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("content-length") or 0)
        out = bytearray()
        while len(out) < n:
            chunk = self.rfile.read(min(1 << 20, n - len(out)))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def _send(
        self, status: int, body: bytes, ctype: str = "text/plain", extra: dict | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: C901
        body = self._read_body()
        self._record(body)
        u = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        if u.path == "/headers":
            self._send(
                200,
                json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(),
                "application/json",
            )
        elif u.path.startswith("/bytes/"):
            n = int(u.path.split("/")[2])
            block = bytes(range(256)) * 4096
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            sent = 0
            while sent < n:
                part = block[: min(len(block), n - sent)]
                self.wfile.write(part)
                sent += len(part)
        elif u.path == "/chunked":
            parts = int(q.get("parts", 5))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(parts):
                data = f"chunk-{i}-".encode() * (i + 1)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
        elif u.path == "/slow":
            time.sleep(float(q.get("s", 5)))
            self._send(200, b"slow")
        elif u.path.startswith("/status/"):
            self._send(int(u.path.split("/")[2]), b"status")
        elif u.path == "/peer":
            self._send(200, self.client_address[0].encode())
        else:
            self._send(200, b"hello from origin")

    do_POST = do_GET
    do_PUT = do_GET
    do_HEAD = do_GET
    do_DELETE = do_GET

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True


class Origin:
    """A threaded HTTP (or HTTPS) origin on 127.0.0.1."""

    def __init__(self, tls_context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.server = ThreadingHTTPServer((host, 0), OriginHandler)
        self.server.daemon_threads = True
        self.server.seen = []  # type: ignore[attr-defined]
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.host = host
        self.scheme = "https" if tls_context else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def seen(self) -> list[dict[str, Any]]:
        return self.server.seen  # type: ignore[attr-defined]

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def raw_connection(port: int, timeout: float = 10.0) -> Iterator[socket.socket]:
    """A plain socket to the gateway."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        yield s
    finally:
        s.close()


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length body from *sock*."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before headers: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:n]


# -- byte-counting servers (metering tests) -----------------------------------------------


class RawOrigin:
    """An HTTP/1.1 origin that counts every byte it reads and writes, per connection.

    Paths: ``/bytes/N`` (Content-Length body of N bytes; ``/html/N`` the same as HTML),
    ``/chunked/N/K`` (N bytes in
    K chunks), ``/upgrade`` a 101 answer and then an echo of raw bytes (a WebSocket
    stand-in), anything else a short body. Request bodies (Content-Length) are read.
    ``conns`` holds ``{"in": n, "out": n, "requests": k}`` per accepted connection.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[dict[str, int]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def total_in(self) -> int:
        with self.lock:
            return sum(c["in"] for c in self.conns)

    @property
    def total_out(self) -> int:
        with self.lock:
            return sum(c["out"] for c in self.conns)

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            rec = {"in": 0, "out": 0, "requests": 0}
            with self.lock:
                self.conns.append(rec)
            threading.Thread(target=self._serve, args=(c, rec), daemon=True).start()

    def _serve(self, c: socket.socket, rec: dict[str, int]) -> None:
        c.settimeout(30)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    rec["in"] += len(data)
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split()[1]
                hdrs = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (x.partition(":") for x in lines[1:])
                }
                need = int(hdrs.get("content-length", "0"))
                while len(buf) < need:
                    data = c.recv(65536)
                    if not data:
                        return
                    rec["in"] += len(data)
                    buf += data
                buf = buf[need:]
                rec["requests"] += 1
                if path.startswith("/upgrade"):
                    self._echo_upgraded(c, rec, buf)
                    return
                self._respond(c, rec, path)
        except OSError:
            return
        finally:
            c.close()

    def _send(self, c: socket.socket, rec: dict[str, int], data: bytes) -> None:
        c.sendall(data)
        rec["out"] += len(data)

    def _echo_upgraded(self, c: socket.socket, rec: dict[str, int], buf: bytes) -> None:
        """Switch protocols (a WebSocket handshake's answer), then echo raw bytes."""
        self._send(
            c,
            rec,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n",
        )
        if buf:
            self._send(c, rec, buf)
        while data := c.recv(65536):
            rec["in"] += len(data)
            self._send(c, rec, data)

    def _respond(self, c: socket.socket, rec: dict[str, int], path: str) -> None:
        parts = path.split("?")[0].split("/")
        if len(parts) >= 3 and parts[1] in ("bytes", "html"):
            n = int(parts[2])
            ctype = b"text/html" if parts[1] == "html" else b"application/octet-stream"
            self._send(
                c,
                rec,
                b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (ctype, n),
            )
            block = b"x" * 65536
            left = n
            while left:
                part = block[: min(left, len(block))]
                self._send(c, rec, part)
                left -= len(part)
        elif len(parts) >= 4 and parts[1] == "chunked":
            n, k = int(parts[2]), int(parts[3])
            self._send(c, rec, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            size = max(1, n // k)
            left = n
            while left:
                part = b"y" * min(size, left)
                self._send(c, rec, b"%x\r\n%s\r\n" % (len(part), part))
                left -= len(part)
            self._send(c, rec, b"0\r\n\r\n")
        else:
            self._send(c, rec, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    def close(self) -> None:
        self.sock.close()


class CountingRelay:
    """A TCP relay to *target* that counts the bytes in each direction (tunnel metering)."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.up = 0  # client -> target
        self.down = 0  # target -> client
        self.lock = threading.Lock()
        self.active = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.create_connection(self.target, timeout=30)
            with self.lock:
                self.active += 1
            threading.Thread(target=self._pump, args=(c, s, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self.lock:
                self.active -= 0 if direction == "up" else 1

    def close(self) -> None:
        self.sock.close()


# -- the REST API (issue 6) ---------------------------------------------------------------


def _gateway_api_url(self: Gateway) -> str:
    """The REST API the gateway serves (start it with ``settings={"api_port": free_port()}``)."""
    port = self.settings.get("api_port")
    if not port:
        raise AssertionError("this gateway runs without its REST API (api_port=0)")
    return f"http://127.0.0.1:{port}"


Gateway.api_url = property(_gateway_api_url)  # type: ignore[attr-defined]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until *url* answers any HTTP response (a server is up)."""
    import urllib.error
    import urllib.request

    def probe() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True

    wait_until(probe, timeout, 0.05, f"{url} answering")


class ApiProcess:
    """A standalone ``datorus api`` on a free loopback port (settings as DATORUS_* env)."""

    def __init__(self, db: Path, settings: dict[str, Any] | None = None) -> None:
        self.db = db
        self.port = free_port()
        self.env = {
            **os.environ,
            **{f"DATORUS_{k.upper()}": str(v) for k, v in (settings or {}).items()},
        }
        self.log = db.parent / f"api-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        self.logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [DATORUS, "--db", str(self.db), "api", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO,
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        wait_http(self.url + "/health", proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self.logf.close()


# -- egress pool (issue 5): upstream proxies and a blocking origin --------------------------


class UpstreamProxy:
    """A real threaded HTTP CONNECT proxy on 127.0.0.1 that the test can stop and start.

    Its outgoing connections leave from *source* (a loopback alias), so an origin that
    echoes the peer address shows which proxy a request went through. With *user*
    and *password* set it demands ``Proxy-Authorization`` (407 otherwise); every
    value it saw is kept in ``auth_seen`` (the customer's must never arrive here).
    """

    def __init__(
        self,
        source: str,
        user: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        self.source = source
        self.tls = tls
        self.user, self.password = user, password
        self.port = free_port()
        self.auth_seen: list[str | None] = []
        self.connects = 0
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.live: set[socket.socket] = set()
        self.start()

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user is not None else ""
        return f"{'https' if self.tls else 'http'}://{auth}127.0.0.1:{self.port}"

    def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener and every open connection (as a crashed proxy would)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
        with self.lock:
            live, self.live = self.live, set()
        for c in live:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                c, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                self.live.add(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(30)
        try:
            if self.tls is not None:
                c = self.tls.wrap_socket(c, server_side=True)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = c.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            hdrs = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
            }
            auth = hdrs.get("proxy-authorization")
            with self.lock:
                self.auth_seen.append(auth)
            if self.user is not None and auth != basic(self.user, self.password or ""):
                c.sendall(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
                )
                return
            if method != "CONNECT":
                c.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            host, _, port = target.rpartition(":")
            try:
                up = socket.create_connection((host.strip("[]"), int(port)), 10, (self.source, 0))
            except OSError:
                c.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            with self.lock:
                self.connects += 1
                self.live.add(up)
            c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                up.sendall(rest)
            t = threading.Thread(target=self._pump, args=(up, c), daemon=True)
            t.start()
            self._pump(c, up)
            t.join(30)
        except (OSError, ValueError):
            return
        finally:
            c.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


class BlockingHandler(OriginHandler):
    """An origin that echoes the peer address, and answers a block page to chosen peers.

    ``/peer`` answers the peer address, ``/judge`` it and the request headers as JSON;
    ``/guarded`` answers 403 with a block page to
    a peer in ``server.blocked`` and the peer address to everyone else; ``/marked``
    answers 200 with a captcha page to a blocked peer; ``/reset`` resets a blocked peer's
    connection before answering.
    """

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        peer = self.client_address[0]
        blocked = peer in self.server.blocked  # type: ignore[attr-defined]
        self.server.peers.append(peer)  # type: ignore[attr-defined]
        if path in ("/guarded", "/marked", "/peer", "/reset", "/judge"):
            self._record(b"")  # what the origin saw (the base class records its own paths)
        page = b"<html><body>Are you a robot? <div class='g-recaptcha'></div></body></html>"
        if path == "/guarded" and blocked:
            self._send(403, page, "text/html")
        elif path == "/marked" and blocked:
            self._send(200, page, "text/html")
        elif path == "/reset" and blocked:  # drop the connection with a TCP reset
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            self.connection.close()
            self.close_connection = True
        elif path == "/judge":  # a proxy judge: the caller's address and the headers it sent
            body = {"ip": peer, "headers": {k: v for k, v in self.headers.items()}}
            self._send(200, json.dumps(body).encode(), "application/json")
        elif path in ("/guarded", "/marked", "/peer", "/reset"):
            self._send(200, peer.encode(), "text/plain")
        else:
            super().do_GET()


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class BlockingOrigin(Origin):
    """A :class:`BlockingHandler` origin on *host* (IPv4 or IPv6)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        cls = _Server6 if ":" in host else ThreadingHTTPServer
        self.server = cls((host, 0), BlockingHandler)
        self.server.daemon_threads = True
        self.server.seen = []  # type: ignore[attr-defined]
        self.server.blocked = set()  # type: ignore[attr-defined]
        self.server.peers = []  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.host = f"[{host}]" if ":" in host else host
        self.scheme = "http"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def blocked(self) -> set[str]:
        return self.server.blocked  # type: ignore[attr-defined]
