"""Opening a way through an upstream proxy: the HTTP CONNECT, SOCKS4(a) and SOCKS5
handshakes.

Network I/O on asyncio streams, shared by the gateway's routing (which runs the
handshake on mitmproxy's freshly opened server connection) and the checkers
(``datorus_core.checkers``, which open their own with :func:`open_egress`). Nothing
here knows mitmproxy or the ledger.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import ssl

from .egress import EgressSpec, source_for


class HandshakeError(Exception):
    """The upstream proxy refused or broke the tunnel set-up.

    ``target`` is True when the proxy itself works but could not reach the target
    (an HTTP 5xx answer to CONNECT, a SOCKS5 unreachable/refused reply, a SOCKS4
    rejection, an IPv6 target for SOCKS4): that is no reason to take the egress out of the pool.
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
    (never the customer's); SOCKS4 proxies a SOCKS4 request (SOCKS4a for a name) with
    the URL's user as USERID; SOCKS5 proxies the RFC 1928 exchange with RFC 1929
    username/password when the URL has them. Raises HandshakeError, also for what
    cannot be said to the proxy at all (a user name longer than SOCKS allows, a name IDNA
    cannot encode): the egress is then failed like any other, never a crash.
    """
    try:
        if spec.kind in ("http", "https"):
            await proxy_tls(spec, writer)
            await _http_connect(spec, host, port, reader, writer)
        elif spec.kind == "socks4":
            await _socks4_connect(spec, host, port, reader, writer)
        elif spec.kind == "socks5":
            await _socks5_connect(spec, host, port, reader, writer)
        else:
            raise HandshakeError(f"not a proxy egress: {spec.kind}")
    except (ValueError, UnicodeError) as e:  # UnicodeError is a ValueError; named for clarity
        # a target name IDNA cannot encode is the target's fault, not the proxy's
        raise HandshakeError(
            f"cannot ask the {spec.kind} proxy: {type(e).__name__}", not _idna_ok(host)
        ) from e


def _idna_ok(host: str) -> bool:
    """Whether *host* (a name or an address literal) can be put on the wire."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host.encode("idna")
        except UnicodeError:
            return False
    return True


async def proxy_tls(spec: EgressSpec, writer: asyncio.StreamWriter) -> None:
    """For an ``https://`` proxy, TLS to the proxy itself, verified against the system's
    trust store (SSL_CERT_FILE / SSL_CERT_DIR as OpenSSL reads them); else nothing."""
    if spec.kind != "https":
        return
    ctx = ssl.create_default_context()
    try:
        await writer.start_tls(ctx, server_hostname=spec.host)
    except (ssl.SSLError, OSError) as e:
        raise HandshakeError(f"TLS to the upstream proxy failed: {e}") from e


async def open_egress(
    spec: EgressSpec, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the proxy *spec* names; for a direct egress, nothing is opened
    (raises ValueError: the caller connects to its target from :func:`source_for`)."""
    if not spec.is_proxy:
        raise ValueError("a direct egress has no proxy to connect to")
    return await asyncio.wait_for(asyncio.open_connection(spec.host, spec.port), timeout)


async def open_direct(
    spec: EgressSpec, host: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``host:port`` leaving by the direct egress *spec* (its source
    address bound, or a fresh one of its prefix)."""
    src = source_for(spec, None)
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(src, 0) if src else None), timeout
    )


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


# SOCKS4 replies (the second byte): 90 granted; 91 rejected or failed (the target, or
# the proxy's rules); 92 and 93: the proxy's identd check of our USERID failed
_SOCKS4_GRANTED = 90
_SOCKS4_IDENT = (92, 93)


async def _socks4_connect(spec, host, port, reader, writer) -> None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and ip.version != 4:
        raise HandshakeError("a SOCKS4 proxy cannot reach IPv6 addresses", True)
    user = (spec.username or "").encode() + b"\0"
    if ip is not None:
        request = b"\x04\x01" + port.to_bytes(2, "big") + ip.packed + user
    else:  # SOCKS4a: 0.0.0.1 and the name after the USERID, resolved by the proxy
        name = host.encode("idna")
        request = b"\x04\x01" + port.to_bytes(2, "big") + b"\0\0\0\x01" + user + name + b"\0"
    writer.write(request)
    await writer.drain()
    try:
        vn, cd = (await reader.readexactly(8))[:2]
    except asyncio.IncompleteReadError as e:
        raise HandshakeError("SOCKS4 proxy closed during the handshake") from e
    if vn != 0:
        raise HandshakeError("not a SOCKS4 proxy (bad reply version)")
    if cd in _SOCKS4_IDENT:
        raise HandshakeError(f"SOCKS4 proxy refused our user id (reply {cd})")
    if cd != _SOCKS4_GRANTED:
        # 91: SOCKS4 does not say whether the target or the proxy's rules refused
        raise HandshakeError(f"SOCKS4 proxy could not connect (reply {cd})", True)


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
