#!/usr/bin/env python3
"""A small, fast asyncio HTTP/1.1 origin for ``scripts/bench`` when nginx is not available.

It serves ``/1k`` (1,024 bytes) and ``/100m`` (100 MB) over plain HTTP and over HTTPS,
with keep-alive (HTTP/1.1 by default, HTTP/1.0 with ``Connection: keep-alive``, the
token compared case-insensitively). Bodies are generated in memory; nothing is read
from disk. It listens on loopback only and runs until SIGTERM or SIGINT.

    python scripts/bench_origin.py --http-port 8080 --https-port 8443 \\
        --cert cert.pem --key key.pem
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl

SMALL = bytes(range(256)) * 4
LARGE_SIZE = 100 * 1000 * 1000
CHUNK = b"\0" * (256 * 1024)
MAX_HEAD = 64 * 1024


def _head(status: str, length: int, keep_alive: bool, version: bytes) -> bytes:
    """The status line and headers of one response."""
    conn = b"keep-alive" if keep_alive else b"close"
    return (
        version + b" " + status.encode() + b"\r\nServer: bench-origin\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n"
        b"Connection: " + conn + b"\r\n\r\n"
    )


def _keep_alive(version: bytes, head: bytes) -> bool:
    """Whether the client asked for (or, on HTTP/1.1, did not refuse) a persistent connection."""
    tokens: set[bytes] = set()
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    if b"close" in tokens:
        return False
    return version == b"HTTP/1.1" or b"keep-alive" in tokens


async def _send_large(writer: asyncio.StreamWriter) -> None:
    """Write the 100 MB body in chunks, respecting flow control."""
    left = LARGE_SIZE
    while left > 0:
        chunk = CHUNK if left >= len(CHUNK) else CHUNK[:left]
        writer.write(chunk)
        left -= len(chunk)
        await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve requests on one connection until the client or a ``close`` ends it."""
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3:
                writer.write(_head("400 Bad Request", 0, False, b"HTTP/1.1"))
                return
            method, target, version = parts
            keep = _keep_alive(version, head)
            out_version = b"HTTP/1.1" if version == b"HTTP/1.1" else b"HTTP/1.0"
            path = target.split(b"?", 1)[0]
            if b"://" in path:  # absolute-form, as a proxy would forward it untouched
                path = b"/" + path.split(b"://", 1)[1].partition(b"/")[2]
            if path == b"/1k":
                writer.write(_head("200 OK", len(SMALL), keep, out_version))
                if method != b"HEAD":
                    writer.write(SMALL)
            elif path == b"/100m":
                writer.write(_head("200 OK", LARGE_SIZE, keep, out_version))
                if method != b"HEAD":
                    await _send_large(writer)
            else:
                writer.write(_head("404 Not Found", 0, keep, out_version))
            if not keep:
                await writer.drain()
                return
            if writer.transport.get_write_buffer_size() > 256 * 1024:
                await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(host: str, http_port: int, https_port: int | None, cert: str, key: str) -> None:
    """Listen on the HTTP (and, given a port, HTTPS) port until a stop signal arrives."""
    servers = [await asyncio.start_server(handle, host, http_port, limit=MAX_HEAD, backlog=1024)]
    if https_port:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        servers.append(
            await asyncio.start_server(
                handle, host, https_port, ssl=ctx, limit=MAX_HEAD, backlog=1024
            )
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the origin."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--https-port", type=int, default=0)
    ap.add_argument("--cert", default="")
    ap.add_argument("--key", default="")
    args = ap.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("::1", "localhost"):
        ap.error("the bench origin listens on loopback addresses only")
    asyncio.run(serve(args.host, args.http_port, args.https_port or None, args.cert, args.key))


if __name__ == "__main__":
    main()
