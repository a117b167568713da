"""A proxy-list server on loopback: the lists a test puts at paths, and the bad ones.

``ListServer().serve(path, body, content_type)`` answers ``GET path`` with that list
(the test may change it between scrapes); ``status`` gives an error answer. Built in:

- ``/huge`` an endless ``text/plain`` list of valid lines, streamed without a
  ``Content-Length`` (only a body cap stops a reader);
- ``/huge-declared`` a ``Content-Length`` of 11 MiB (a reader may refuse at once);
- ``/redirect/N`` N redirects in a row, then ``/list.txt``.

``hits(path)`` counts the GETs of a path (how often a schedule fetched it); a route
served with ``delay`` answers that many seconds late (a scrape that takes a while).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_LINE = b"10.1.2.3:8080\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lists"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv: ListServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        with srv.lock:
            srv.counts[path] += 1
            entry = srv.routes.get(path)
            delay = srv.delays.get(path, 0.0)
        if delay:
            time.sleep(delay)  # a slow list server, as the test asked
        if path == "/huge":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(1_000_000):  # ~14 MB, more than any cap
                    self.wfile.write(_LINE * 64)
            except OSError:
                pass  # the reader hung up: what a cap does
            self.close_connection = True
            return
        if path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(11 * 1024 * 1024))
            self.end_headers()
            self.close_connection = True
            return
        if path.startswith("/redirect/"):
            n = int(path.rsplit("/", 1)[1])
            self.send_response(302)
            self.send_header("Location", f"/redirect/{n - 1}" if n > 1 else "/list.txt")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if entry is None:
            status, ctype, body = 404, "text/plain", b"no such list\n"
        else:
            status, ctype, body = entry
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ListServer:
    """A threaded HTTP server on 127.0.0.1 serving proxy lists."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, str, bytes]] = {}
        self.delays: dict[str, float] = {}
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        """The URL of *path* on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(
        self,
        path: str,
        body: str | bytes,
        content_type: str = "text/plain",
        status: int = 200,
        delay: float = 0.0,
    ) -> str:
        """Answer ``GET path`` with *body* (after *delay* seconds); its URL."""
        data = body.encode() if isinstance(body, str) else body
        with self.lock:
            self.routes[path] = (status, content_type, data)
            self.delays[path] = delay
        return self.url(path)

    def hits(self, path: str) -> int:
        """How many times *path* was fetched."""
        with self.lock:
            return self.counts[path]

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()
