"""Opening a way through an upstream proxy, and the staged health check.

Network I/O on asyncio streams, shared by the gateway's routing (which runs the
handshake on mitmproxy's freshly opened server connection) and the background
health check. Nothing here knows mitmproxy or the ledger.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from .egress import EgressSpec, source_for


class HandshakeError(Exception):
    """The upstream proxy refused or broke the tunnel set-up.

    ``target`` is True when the proxy itself works but could not reach the target
    (an HTTP 5xx answer to CONNECT, a SOCKS5 unreachable/refused reply): that is no
    reason to take the egress out of the pool.
    """

    def __init__(self, message: str, target: bool = False) -> None:
        super().__init__(message)
        self.target = target


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def handshake(
    spec: EgressSpec,
    host: str,
    port: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Ask the upstream proxy *spec* for a tunnel to ``host:port`` on an open connection.

    HTTP(S) proxies get ``CONNECT`` with our own ``Proxy-Authorization`` for them
    (never the customer's); SOCKS5 proxies the RFC 1928 exchange with RFC 1929
    username/password when the URL has them. Raises HandshakeError.
    """
    if spec.kind in ("http", "https"):
        if spec.kind == "https":
            # TLS to the proxy itself, verified against the system's trust store
            # (SSL_CERT_FILE / SSL_CERT_DIR as OpenSSL reads them)
            ctx = ssl.create_default_context()
            try:
                await writer.start_tls(ctx, server_hostname=spec.host)
            except (ssl.SSLError, OSError) as e:
                raise HandshakeError(f"TLS to the upstream proxy failed: {e}") from e
        await _http_connect(spec, host, port, reader, writer)
    elif spec.kind == "socks5":
        await _socks5_connect(spec, host, port, reader, writer)
    else:
        raise HandshakeError(f"not a proxy egress: {spec.kind}")


async def _http_connect(spec, host, port, reader, writer) -> None:
    authority = _authority(host, port)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if spec.username is not None:
        token = base64.b64encode(f"{spec.username}:{spec.password or ''}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise HandshakeError("upstream proxy closed during CONNECT") from e
    parts = head.split(b" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        raise HandshakeError("upstream proxy sent no HTTP status") from None
    if status != 200:
        raise HandshakeError(f"upstream proxy answered CONNECT with {status}", status >= 500)


async def _socks5_connect(spec, host, port, reader, writer) -> None:
    try:
        methods = b"\x00\x02" if spec.username is not None else b"\x00"
        writer.write(b"\x05" + bytes([len(methods)]) + methods)
        await writer.drain()
        ver, method = await reader.readexactly(2)
        if ver != 5 or method == 0xFF:
            raise HandshakeError("SOCKS5 proxy accepts none of our auth methods")
        if method == 0x02:
            u = (spec.username or "").encode()
            p = (spec.password or "").encode()
            writer.write(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
            await writer.drain()
            _, status = await reader.readexactly(2)
            if status != 0:
                raise HandshakeError("SOCKS5 proxy refused our credentials")
        try:
            ip = ipaddress.ip_address(host)
            addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        except ValueError:
            name = host.encode("idna")
            addr = b"\x03" + bytes([len(name)]) + name
        writer.write(b"\x05\x01\x00" + addr + port.to_bytes(2, "big"))
        await writer.drain()
        _, rep, _, atyp = await reader.readexactly(4)
        if rep != 0:
            # 3, 4, 5, 6: network or host unreachable, refused, TTL: the target's fault
            raise HandshakeError(
                f"SOCKS5 proxy could not connect (reply {rep})", rep in (3, 4, 5, 6)
            )
        n = {1: 4, 4: 16}.get(atyp)
        if n is None:
            n = (await reader.readexactly(1))[0]
        await reader.readexactly(n + 2)
    except asyncio.IncompleteReadError as e:
        raise HandshakeError("SOCKS5 proxy closed during the handshake") from e


# -- the health check ---------------------------------------------------------------------


@dataclass(slots=True)
class CheckResult:
    """One staged check: stage 1 TCP connect, stage 2 HTTP through the egress."""

    ok: bool
    stage: int  # the last stage run
    latency_ms: float | None = None
    exit_ip: str | None = None
    detail: str = ""
    anonymity: str | None = None  # transparent | anonymous | elite, when the judge tells


_PROXY_HEADERS = (
    "x-forwarded-for",
    "x-real-ip",
    "forwarded",
    "via",
    "client-ip",
    "x-client-ip",
    "x-proxy-id",
    "proxy-connection",
)


def judge_anonymity(body: bytes, exit_ip: str | None) -> str | None:
    """Anonymity from a judge that echoes JSON ``{"headers": {...}}`` (seed 002's levels).

    ``transparent``: a proxy header names an address other than the exit (ours leaks);
    ``anonymous``: proxy headers are present but name no other address; ``elite``: none.
    None when the judge does not echo headers.
    """
    try:
        data = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        return None
    headers = data.get("headers") if isinstance(data, dict) else None
    if not isinstance(headers, dict):
        return None
    found = {k.lower(): str(v) for k, v in headers.items() if k.lower() in _PROXY_HEADERS}
    if not found:
        return "elite"
    for value in found.values():
        for token in value.replace(",", " ").replace("=", " ").replace(";", " ").split():
            try:
                ip = str(ipaddress.ip_address(token.strip('"[]')))
            except ValueError:
                continue
            if ip != exit_ip:
                return "transparent"
    return "anonymous"


def _exit_ip(body: bytes) -> str | None:
    text = body.decode("utf-8", "replace").strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, dict):
        for k in ("ip", "origin", "exit_ip", "address"):
            v = data.get(k)
            if isinstance(v, str):
                try:
                    return str(ipaddress.ip_address(v.split(",")[0].strip()))
                except ValueError:
                    continue
    return None


async def check_egress(spec: EgressSpec, check_url: str, timeout: float) -> CheckResult:
    """Run the staged check of one egress against *check_url* (may be empty)."""
    u = urlsplit(check_url) if check_url else None
    target = None
    if u is not None and u.hostname:
        target = (u.hostname, u.port or (443 if u.scheme == "https" else 80))
    start = time.monotonic()
    # stage 1: TCP connect (to the proxy, or from the source address to the judge)
    try:
        if spec.is_proxy:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(spec.host, spec.port), timeout
            )
        elif target is not None:
            src = source_for(spec, None)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*target, local_addr=(src, 0) if src else None), timeout
            )
        else:
            src = source_for(spec, None)
            if src:
                family = socket.AF_INET6 if ":" in src else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind((src, 0))
            return CheckResult(True, 1, None, None, "bind ok" if src else "default route")
    except (OSError, TimeoutError) as e:
        return CheckResult(False, 1, None, None, f"connect failed: {e or type(e).__name__}")
    connect_ms = (time.monotonic() - start) * 1000
    try:
        if u is None or target is None:
            return CheckResult(True, 1, connect_ms, None, "tcp ok")
        try:
            if spec.is_proxy:
                await asyncio.wait_for(handshake(spec, *target, reader, writer), timeout)
            if u.scheme == "https":
                ctx = ssl.create_default_context()
                await asyncio.wait_for(writer.start_tls(ctx, server_hostname=u.hostname), timeout)
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {u.netloc.rpartition('@')[2]}\r\n"
                "User-Agent: datorus-check\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(65536 * 2), timeout)
            while len(raw) < 65536:
                more = await asyncio.wait_for(reader.read(65536), timeout)
                if not more:
                    break
                raw += more
        except (OSError, TimeoutError, HandshakeError, ssl.SSLError) as e:
            return CheckResult(False, 2, connect_ms, None, f"http check failed: {e}")
        latency = (time.monotonic() - start) * 1000
        head, _, body = raw.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return CheckResult(False, 2, latency, None, "no HTTP response")
        if status != 200:
            return CheckResult(False, 2, latency, None, f"judge answered {status}")
        if b"chunked" in head.lower():
            body = _dechunk(body)
        ip = _exit_ip(body)
        anonymity = judge_anonymity(body, ip) if spec.is_proxy else None
        return CheckResult(True, 2, latency, ip, "http ok", anonymity)
    finally:
        writer.close()


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            n = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2 :]
    return out
