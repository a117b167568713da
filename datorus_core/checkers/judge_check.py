"""The shipped ``http_anonymity`` checker (stage 2): a GET of the judge through the egress.

It passes when the judge answers 200 with the address it saw (the exit IP), within
the timeout. For an upstream proxy it also grades anonymity from the headers the
judge echoes (:mod:`.anonymity`): an ``http://`` judge is fetched through an HTTP(S)
proxy as a plain forward request (absolute form, where a proxy adds its headers), an
``https://`` one, or any through SOCKS, inside a tunnel. The exit's country comes from
the offline table (:mod:`.geo`). A source address is checked from that address;
one of the other family than the judge is skipped (it cannot reach it).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from ..egress import EgressSpec, source_for
from ..egress_io import HandshakeError, handshake, open_egress, proxy_tls
from .anonymity import SENT, grade, read_judge
from .base import CheckContext, CheckOutcome
from .geo import country_of

MAX_ANSWER = 256 * 1024  # bytes of a judge's answer read at most


class Skip(Exception):
    """The egress cannot take this check (not its fault)."""


@dataclass(slots=True)
class _Way:
    """An open connection to the judge (or to the proxy that forwards to it)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    absolute: bool  # a forward request to an HTTP proxy: absolute form, its auth
    own: frozenset[str]  # our address as the proxy saw the connection come


class HttpAnonymity:
    """Stage 2: fetch the judge through the egress; exit IP, anonymity, country, latency."""

    name = "http_anonymity"
    stage = 2
    priority = 0

    async def check(self, egress: EgressSpec, ctx: CheckContext) -> CheckOutcome:
        """One GET of ``ctx.judge_url`` through *egress*."""
        if not ctx.judge_url:
            return CheckOutcome.skip("no judge configured")
        u = urlsplit(ctx.judge_url)
        start = time.monotonic()
        try:
            async with asyncio.timeout(ctx.timeout):
                way = await _open(egress, u)
                try:
                    raw = await _exchange(egress, u, way)
                finally:
                    way.writer.close()
        except Skip as s:
            return CheckOutcome.skip(str(s))
        except TimeoutError:
            return CheckOutcome(False, f"no answer from the judge within {ctx.timeout:g} s")
        except (OSError, HandshakeError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            return CheckOutcome(False, f"judge not reached: {_why(e)}")
        latency = round((time.monotonic() - start) * 1000, 1)
        return _judge(egress, raw, latency, way.own | ctx.own_addresses)


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _target(u: SplitResult) -> tuple[str, int]:
    host = u.hostname or ""
    return host, u.port or (443 if u.scheme == "https" else 80)


async def _open(egress: EgressSpec, u: SplitResult) -> _Way:
    host, port = _target(u)
    if not egress.is_proxy:
        return await _open_direct(egress, host, port)
    reader, writer = await open_egress(egress, 3600)  # the check's own timeout bounds it
    own = frozenset({str(writer.get_extra_info("sockname")[0])})
    try:
        if egress.kind in ("http", "https") and u.scheme == "http":
            await proxy_tls(egress, writer)
            return _Way(reader, writer, True, own)
        if egress.kind == "socks4" and ":" in host:
            raise Skip("a SOCKS4 proxy cannot reach an IPv6 judge")
        await handshake(egress, host, port, reader, writer)
        if u.scheme == "https":
            await writer.start_tls(ssl.create_default_context(), server_hostname=host)
    except BaseException:
        writer.close()
        raise
    return _Way(reader, writer, False, own)


async def _open_direct(egress: EgressSpec, host: str, port: int) -> _Way:
    src = source_for(egress, None)
    family = 0
    if src is not None:
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and (literal.version == 6) != (family == socket.AF_INET6):
            raise Skip(f"the judge is not reachable from {src} (another address family)")
        try:
            await asyncio.get_running_loop().getaddrinfo(
                host, port, family=family, type=socket.SOCK_STREAM
            )
        except socket.gaierror:
            raise Skip(f"the judge has no address of {src}'s family") from None
    reader, writer = await asyncio.open_connection(
        host, port, family=family, local_addr=(src, 0) if src else None
    )
    return _Way(reader, writer, False, frozenset())


def _request(egress: EgressSpec, u: SplitResult, absolute: bool) -> bytes:
    """The GET of the judge (the headers it sends are ``anonymity.SENT``)."""
    netloc = u.netloc.rpartition("@")[2]
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    target = f"http://{netloc}{path}" if absolute else path
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {netloc}",
        "User-Agent: datorus-check",
        "Accept: application/json, text/plain",
        "Connection: close",
    ]
    if absolute and egress.username is not None:
        token = base64.b64encode(f"{egress.username}:{egress.password or ''}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _exchange(egress: EgressSpec, u: SplitResult, way: _Way) -> bytes:
    if not egress.is_proxy and u.scheme == "https":
        await way.writer.start_tls(ssl.create_default_context(), server_hostname=u.hostname)
    way.writer.write(_request(egress, u, way.absolute))
    await way.writer.drain()
    raw = b""
    while len(raw) <= MAX_ANSWER:
        chunk = await way.reader.read(65536)
        if not chunk:
            break
        raw += chunk
    return raw


def _judge(egress: EgressSpec, raw: bytes, latency: float, own: frozenset[str]) -> CheckOutcome:
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return CheckOutcome(False, "no HTTP answer from the judge", latency_ms=latency)
    if status != 200:
        return CheckOutcome(False, f"the judge answered {status}", latency_ms=latency)
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    answer = read_judge(body)
    if answer.ip is None:
        return CheckOutcome(False, "the judge's answer names no address", latency_ms=latency)
    anonymity = None
    if egress.is_proxy and answer.headers is not None:
        anonymity = grade(answer.headers, own, SENT, answer.ip)
    detail = f"judge OK: exit {answer.ip}" + (f", {anonymity}" if anonymity else "")
    return CheckOutcome(
        True,
        detail,
        latency_ms=latency,
        exit_ip=answer.ip,
        anonymity=anonymity,
        country=country_of(answer.ip),
    )


def dechunk(data: bytes) -> bytes:
    """The payload of a chunked body (as much as is there).

    >>> dechunk(b"3\\r\\nabc\\r\\n2\\r\\nde\\r\\n0\\r\\n\\r\\n")
    b'abcde'
    """
    out = bytearray()
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
    return bytes(out)
