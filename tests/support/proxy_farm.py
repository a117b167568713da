"""A proxy list of thousands on loopback: a few real (tiny) HTTP proxies, the rest refusing.

Run as its own process (``python tests/support/proxy_farm.py --total 10000 --live 100``),
so its CPU is not the test's or the benchmark's: it prints one JSON line,
``{"list_url", "live", "refused", "port"}``, once everything listens, and serves until
killed. What it serves:

- ``LIVE`` small asyncio HTTP proxies, one listening socket each on
  ``127.98.X.Y:PORT``: an absolute-form request is relayed to its target (one request
  per connection, ``Connection: close``) and a CONNECT is tunnelled, so a gateway's
  checks through them reach its judge for real;
- ``TOTAL - LIVE`` addresses ``127.99.X.Y:PORT`` where nothing listens (loopback
  answers a connect with a reset at once): *PORT* is one that refuses on 127.0.0.1
  too, so no wildcard listener on the box catches them;
- ``GET /list.txt`` on 127.0.0.1 (an asyncio HTTP server of its own): every one of them,
  one ``host:port`` line each, live and refusing interleaved.

File descriptors: one per live listener, plus two per relayed connection while it lasts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys


def _refusing_port() -> int:
    """A port that nothing on the box accepts on 127.0.0.1 (so none on 0.0.0.0 either)."""
    for port in range(47_000, 48_000):
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no refusing port found in 47000-47999")


def _address(net: int, i: int) -> str:
    return f"127.{net}.{i // 250}.{i % 250 + 1}"


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    with contextlib.suppress(Exception):
        w.close()


async def _proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One client of a fake proxy: relay one forward request or open one tunnel."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        line, _, rest = head.partition(b"\r\n")
        method, target, version = line.decode("latin-1").split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            ur, uw = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, uw), _pipe(ur, writer))
            return
        if not target.startswith("http://"):
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        authority, _, path = target[len("http://") :].partition("/")
        host, colon, port = authority.rpartition(":")
        host, port = (host, port) if colon else (authority, "80")
        headers = [
            h
            for h in rest.split(b"\r\n")
            if h and not h.lower().startswith((b"proxy-", b"connection:"))
        ]
        ur, uw = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
        uw.write(
            f"{method} /{path} {version}\r\n".encode("latin-1")
            + b"\r\n".join([*headers, b"Connection: close"])
            + b"\r\n\r\n"
        )
        await _pipe(ur, writer)  # the answer as it comes, until the target closes
        uw.close()
    except Exception:  # a fake: whatever goes wrong, the client sees a closed connection
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _list(body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    writer.close()


async def serve(total: int, live: int) -> None:
    """Start the list server and the live proxies, print where, serve forever."""
    servers = [await asyncio.start_server(_proxy, _address(98, i), 0) for i in range(live)]
    lives = [f"{s.sockets[0].getsockname()[0]}:{s.sockets[0].getsockname()[1]}" for s in servers]
    port = _refusing_port()
    refused = [f"{_address(99, i)}:{port}" for i in range(total - live)]
    step = max(1, total // max(live, 1))
    lines = list(refused)
    for n, entry in enumerate(lives):  # spread through the list, as a provider's would be
        lines.insert(min(n * step, len(lines)), entry)
    body = ("# proxy farm\n" + "\n".join(lines) + "\n").encode()
    lister = await asyncio.start_server(lambda r, w: _list(body, r, w), "127.0.0.1", 0)
    list_port = lister.sockets[0].getsockname()[1]
    info = {
        "list_url": f"http://127.0.0.1:{list_port}/list.txt",
        "live": len(lives),
        "refused": len(refused),
        "port": port,
    }
    print(json.dumps(info), flush=True)
    await asyncio.Event().wait()


def main() -> None:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total", type=int, default=10_000)
    ap.add_argument("--live", type=int, default=100)
    a = ap.parse_args()
    if not 0 <= a.live <= min(a.total, 62_500) or a.total > 62_500:
        sys.exit("proxy_farm: need 0 <= live <= total <= 62500")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(a.total, a.live))


if __name__ == "__main__":
    main()
