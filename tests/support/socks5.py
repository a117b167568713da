"""A raw SOCKS5 client (RFC 1928, RFC 1929) that reports every byte the gateway answers.

curl says only whether a SOCKS5 connection worked; the tests of the entry's refusals
need the exact method, auth status and reply code, so this client speaks the protocol
itself over a plain socket.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field


@dataclass
class Socks5Answer:
    """What the gateway answered: the method it chose, the RFC 1929 status (None: no
    auth was run), the reply code (None: no reply came), and the open socket on success."""

    method: int | None = None
    auth_status: int | None = None
    reply: int | None = None
    sock: socket.socket | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _recv_exactly(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def socks5_connect(
    port: int,
    host: str,
    target_port: int,
    user: str | None = None,
    password: str | None = None,
    methods: bytes | None = None,
    domain: bool | None = None,
    source: str | None = None,
    timeout: float = 15.0,
    command: int = 0x01,
) -> Socks5Answer:
    """Ask the gateway's SOCKS5 port for a tunnel to *host*:*target_port*.

    *methods* defaults to username/password with credentials, "no authentication"
    without; *domain* sends *host* as a name (ATYP 3; default: when it is not an IP
    literal); *source* binds the client's own address (e.g. ``127.0.0.2``); *command*
    is CONNECT (1) unless given (2 BIND, 3 UDP ASSOCIATE). On success
    the socket is left open in the answer (the caller closes it); else it is closed.
    """
    s = socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
    )
    answer = Socks5Answer()
    try:
        offered = methods if methods is not None else (b"\x02" if user is not None else b"\x00")
        s.sendall(bytes((5, len(offered))) + offered)
        got = _recv_exactly(s, 2)
        if got is None:
            return answer
        answer.method = got[1]
        if answer.method == 0xFF:
            return answer
        if answer.method == 0x02:
            u, p = (user or "").encode(), (password or "").encode()
            s.sendall(bytes((1, len(u))) + u + bytes((len(p),)) + p)
            got = _recv_exactly(s, 2)
            if got is None:
                return answer
            answer.auth_status = got[1]
            if answer.auth_status != 0:
                return answer
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if domain or ip is None:
            name = host.encode()
            addr = b"\x03" + bytes((len(name),)) + name
        elif ip.version == 4:
            addr = b"\x01" + ip.packed
        else:
            addr = b"\x04" + ip.packed
        s.sendall(bytes((5, command, 0)) + addr + struct.pack("!H", target_port))
        head = _recv_exactly(s, 4)
        if head is None:
            return answer
        answer.reply = head[1]
        rest = {1: 4, 4: 16}.get(head[3])
        if rest is None:
            name_len = _recv_exactly(s, 1)
            rest = name_len[0] if name_len else 0
        _recv_exactly(s, rest + 2)
        if answer.reply == 0:
            answer.sock, s = s, None  # type: ignore[assignment]
        return answer
    finally:
        if s is not None:
            s.close()


def http_get_through(answer: Socks5Answer, host: str, path: str = "/") -> tuple[int, bytes]:
    """A plain ``GET`` inside an open SOCKS5 tunnel: (status, body); reads to the close."""
    assert answer.sock is not None
    s = answer.sock
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body
