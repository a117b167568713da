"""Webhook receivers on loopback: record what arrives, answer as told.

``Receiver(fail_first=2)`` answers 500 to its first two deliveries, then 204;
``Receiver(mode="hang")`` accepts and never answers; ``Receiver(mode="redirect")`` answers
302 to another receiver's URL.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802
        rcv: Receiver = self.server.receiver  # type: ignore[attr-defined]
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n)
        rcv.seen.append(
            {
                "at": time.monotonic(),
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
            }
        )
        if rcv.mode == "hang":
            rcv.release.wait(60)
            return
        if rcv.mode == "redirect":
            self.send_response(302)
            self.send_header("Location", rcv.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = 500 if len(rcv.seen) <= rcv.fail_first else 204
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class Receiver:
    """A webhook receiver on a free loopback port; ``seen`` holds every POST."""

    def __init__(self, fail_first: int = 0, mode: str = "ok", location: str = "") -> None:
        self.fail_first = fail_first
        self.mode = mode
        self.location = location
        self.seen: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.receiver = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        """The deliveries of one event type."""
        return [s for s in self.seen if s["headers"].get("datorus-event-type") == event_type]

    def close(self) -> None:
        """Stop it (a hanging answer is let go)."""
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
