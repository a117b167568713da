"""Real upstream proxies on loopback for the egress pool's tests: HTTP, SOCKS4, SOCKS5.

Each is a small threaded server on 127.0.0.1 that the test can stop and start again
(as a crashed proxy and its restart), whose outgoing connections leave from *source*
(a loopback alias), so an origin that echoes the peer address shows which proxy a
request went through. ``connects`` counts the connections each opened for a client.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading

from .clients import basic
from .waiting import free_port


def _recv_exact(c: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = c.recv(n - len(data))
        if not more:
            raise OSError("closed")
        data += more
    return data


def _split_authority(authority: str) -> tuple[str, int]:
    """``host[:port]`` or ``[v6][:port]`` as (host, port), port 80 when absent."""
    if authority.startswith("["):
        host, _, after = authority[1:].partition("]")
        return host, int(after[1:]) if after.startswith(":") else 80
    host, colon, port = authority.rpartition(":")
    return (host, int(port)) if colon else (authority, 80)


def _recv_until_nul(c: socket.socket, limit: int = 512) -> bytes:
    data = b""
    while not data.endswith(b"\0"):
        if len(data) > limit:
            raise ValueError("too long")
        data += _recv_exact(c, 1)
    return data[:-1]


class _Proxy:
    """What the three kinds share: the listener, stop/start, the relay."""

    scheme = "proxy"

    def __init__(self, source: str) -> None:
        self.source = source
        self.port = free_port()
        self.connects = 0
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.live: set[socket.socket] = set()
        self.start()

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
            threading.Thread(target=self._serve_one, args=(c,), daemon=True).start()

    def _serve_one(self, c: socket.socket) -> None:
        c.settimeout(30)
        try:
            self._serve(c)
        except (OSError, ValueError):
            return
        finally:
            c.close()

    def _serve(self, c: socket.socket) -> None:
        raise NotImplementedError

    def _dial(self, host: str, port: int) -> socket.socket:
        up = socket.create_connection((host.strip("[]"), port), 10, (self.source, 0))
        with self.lock:
            self.connects += 1
            self.live.add(up)
        return up

    def _relay(self, c: socket.socket, up: socket.socket, first: bytes = b"") -> None:
        if first:
            up.sendall(first)
        t = threading.Thread(target=self._pump, args=(up, c), daemon=True)
        t.start()
        self._pump(c, up)
        t.join(30)

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


class UpstreamProxy(_Proxy):
    """An HTTP proxy: ``CONNECT`` tunnels and plain forward requests (absolute form).

    With *user* and *password* it demands ``Proxy-Authorization`` (407 otherwise);
    every value it saw is kept in ``auth_seen`` (the customer's must never arrive here).
    *forwarded* is what it adds to forward requests: None nothing (elite),
    ``"via"`` a ``Via`` header (anonymous), ``"xff"`` ``Via`` and ``X-Forwarded-For``
    with its client's address (transparent). *tls* serves it as an ``https://`` proxy.
    """

    def __init__(
        self,
        source: str,
        user: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        forwarded: str | None = None,
    ):
        self.tls = tls
        self.user, self.password = user, password
        self.forwarded = forwarded
        self.auth_seen: list[str | None] = []
        super().__init__(source)

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user is not None else ""
        return f"{'https' if self.tls else 'http'}://{auth}127.0.0.1:{self.port}"

    def _serve(self, c: socket.socket) -> None:
        peer = c.getpeername()[0]
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
        method, target, version = lines[0].split(" ", 2)
        fields = [(k.strip(), v.strip()) for k, _, v in (x.partition(":") for x in lines[1:])]
        hdrs = {k.lower(): v for k, v in fields}
        auth = hdrs.get("proxy-authorization")
        with self.lock:
            self.auth_seen.append(auth)
        if self.user is not None and auth != basic(self.user, self.password or ""):
            c.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            try:
                up = self._dial(host, int(port))
            except OSError:
                c.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self._relay(c, up, rest)
            return
        if not target.startswith("http://"):
            c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        authority, _, path = target[len("http://") :].partition("/")
        try:
            up = self._dial(*_split_authority(authority))
        except OSError:
            c.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        hop = ("proxy-authorization", "proxy-connection")
        keep = [(k, v) for k, v in fields if k.lower() not in hop]
        if self.forwarded in ("via", "xff"):
            keep.append(("Via", "1.1 test-upstream"))
        if self.forwarded == "xff":
            keep.append(("X-Forwarded-For", peer))
        out = f"{method} /{path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in keep)
        self._relay(c, up, out.encode("latin-1") + b"\r\n" + rest)


class Socks4Proxy(_Proxy):
    """A SOCKS4 proxy (SOCKS4a too: a name after the user id); with *user_id* it grants
    only requests carrying that USERID (reply 91 otherwise). ``user_ids`` keeps every
    USERID it was sent."""

    def __init__(self, source: str, user_id: str | None = None) -> None:
        self.user_id = user_id
        self.user_ids: list[str] = []
        super().__init__(source)

    @property
    def url(self) -> str:
        auth = f"{self.user_id}@" if self.user_id is not None else ""
        return f"socks4://{auth}127.0.0.1:{self.port}"

    def _serve(self, c: socket.socket) -> None:
        vn, cd, port_hi, port_lo, *ip = _recv_exact(c, 8)
        user = _recv_until_nul(c).decode("latin-1")
        with self.lock:
            self.user_ids.append(user)
        port = port_hi << 8 | port_lo
        host = str(ipaddress.IPv4Address(bytes(ip)))
        if ip[:3] == [0, 0, 0] and ip[3] != 0:  # SOCKS4a: the name follows
            host = _recv_until_nul(c).decode("idna")
        refuse = b"\0\x5b" + b"\0" * 6
        if vn != 4 or cd != 1 or (self.user_id is not None and user != self.user_id):
            c.sendall(refuse)
            return
        try:
            up = self._dial(host, port)
        except OSError:
            c.sendall(refuse)
            return
        c.sendall(b"\0\x5a" + b"\0" * 6)
        self._relay(c, up)


class Socks5Proxy(_Proxy):
    """A SOCKS5 proxy (RFC 1928, CONNECT only), with RFC 1929 username/password when
    *user* is set; IPv4, IPv6 and name targets."""

    def __init__(self, source: str, user: str | None = None, password: str | None = None):
        self.user, self.password = user, password
        super().__init__(source)

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user is not None else ""
        return f"socks5://{auth}127.0.0.1:{self.port}"

    def _serve(self, c: socket.socket) -> None:
        ver, n = _recv_exact(c, 2)
        methods = _recv_exact(c, n)
        want = 2 if self.user is not None else 0
        if ver != 5 or want not in methods:
            c.sendall(b"\x05\xff")
            return
        c.sendall(bytes([5, want]))
        if want == 2:
            _, ulen = _recv_exact(c, 2)
            user = _recv_exact(c, ulen).decode()
            (plen,) = _recv_exact(c, 1)
            pw = _recv_exact(c, plen).decode()
            ok = (user, pw) == (self.user, self.password)
            c.sendall(b"\x01\x00" if ok else b"\x01\x01")
            if not ok:
                return
        _, cmd, _, atyp = _recv_exact(c, 4)
        if atyp == 1:
            host = str(ipaddress.IPv4Address(_recv_exact(c, 4)))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(_recv_exact(c, 16)))
        else:
            host = _recv_exact(c, _recv_exact(c, 1)[0]).decode("idna")
        port = int.from_bytes(_recv_exact(c, 2), "big")
        if cmd != 1:
            c.sendall(_socks5_reply(7))  # command not supported
            return
        try:
            up = self._dial(host, port)
        except OSError:
            c.sendall(_socks5_reply(5))  # connection refused
            return
        c.sendall(_socks5_reply(0))
        self._relay(c, up)


def _socks5_reply(code: int) -> bytes:
    """A SOCKS5 reply with *code* and a zero IPv4 bound address."""
    return bytes([5, code, 0, 1]) + b"\0" * 6
