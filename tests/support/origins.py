"""HTTP origins on loopback: one that answers by path, one that blocks chosen peers."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


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
