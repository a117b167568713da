"""An upstream CONNECT proxy on loopback for the egress pool's tests (issue 5)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading

from .clients import basic
from .waiting import free_port


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
