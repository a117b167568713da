"""Byte-counting servers for the metering tests: an origin and a TCP relay."""

from __future__ import annotations

import contextlib
import socket
import threading


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
