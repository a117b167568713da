"""Measure what one round trip of the Redis hot state costs: take() (the GCRA Lua script),
take() with a tunnel slot, claim() (the credit Lua script), session() and a bare PING.

Run: ``.venv/bin/python scripts/bench_redis_state.py [N] [REDIS_URL]``. Without a URL it
starts Debian's redis-server on a free loopback port (no persistence) and stops it after.
Sequential calls from one event loop (the latency a request waits), then the same calls
50 at a time (what one worker's event loop gets through). Prints one JSON object, times
in microseconds; ``client_cpu_us`` is this process's CPU per sequential call and
``c50_client_cpu_us`` per call 50 at a time (the request path's commands of one event
loop turn share one pipeline).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datorus_core.hotstate.redis_state import BLOCK, RedisHotState  # noqa: E402
from datorus_core.runtime import Runtime  # noqa: E402

SETTINGS: dict[str, Any] = {
    "price_cents_per_gb": 300,
    "rps": 10**6,
    "burst": 10**6,
    "max_tunnels": 10**6,
    "max_overdraft_cents": 0,
    "min_balance_cents": 0,
    "session_ttl": 600,
    "max_sessions": 1000,
    "auth_fail_limit": 5,
    "auth_block_seconds": 30,
}


class Quiet:
    def on_block(self, news: object) -> None: ...

    def on_lease(self, news: object) -> None: ...


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_us": round(s[len(s) // 2] * 1e6, 1),
        "p99_us": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6, 1),
        "mean_us": round(sum(s) / len(s) * 1e6, 1),
    }


async def timed(n: int, call: Callable[[int], Awaitable[Any]]) -> dict[str, Any]:
    for i in range(min(200, n)):  # warm up: connections, scripts loaded
        await call(i)
    samples = []
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - t0)
    out: dict[str, Any] = percentiles(samples)
    # this process's CPU per call (the client's share: what a worker pays per round trip)
    out["client_cpu_us"] = round((time.process_time() - cpu0) / n * 1e6, 1)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for start in range(0, n, 50):
        await asyncio.gather(*(call(i) for i in range(start, min(n, start + 50))))
    out["c50_calls_per_s"] = round(n / (time.perf_counter() - t0))
    out["c50_client_cpu_us"] = round((time.process_time() - cpu0) / n * 1e6, 1)
    return out


async def measure(url: str, n: int) -> dict[str, Any]:
    rt = Runtime(dict(SETTINGS))
    # price 0: the allowance never runs out, so every claim is a full grant
    # 50 credentials: the concurrent calls go to different ones (one worker sends one
    # claim per credential at a time, and coalesces the others)
    creds = [(i, 1, f"bench{i}", "h", None, 0) for i in range(50)]
    rt.apply_snapshot([(1, "active", 0, None, None, None, 0, 0, 1)], creds, [], 1)
    hot = RedisHotState(rt.settings, url, prefix=f"bench{time.time_ns()}:", workers=2)
    await hot.start(Quiet())
    token = await hot.before_snapshot()
    hot.adopt(rt, token)
    by_slot = [rt.by_username[f"bench{i}"] for i in range(50)]
    assert hot.up and token is not None, hot.status()

    async def take(i: int) -> None:
        await hot.take(by_slot[i % 50], None, 0.0)

    async def take_tunnel(i: int) -> None:
        cred = by_slot[i % 50]
        t = await hot.take(cred, f"t{i}", 0.0)
        if t.tunnel:
            hot.tunnel_closed(cred.account, f"t{i}")

    async def claim(i: int) -> None:
        cred = by_slot[i % 50]
        await hot.claim(cred, hot.credit(cred) + BLOCK)  # always a round trip

    async def session(i: int) -> None:
        await hot.session(1, f"s{i % 1000}", 0.0)

    async def ping(i: int) -> None:
        await hot.redis.ping()

    out = {
        "calls": n,
        "ping": await timed(n, ping),
        "take": await timed(n, take),
        "take_tunnel": await timed(n, take_tunnel),
        "claim": await timed(n, claim),
        "session": await timed(n, session),
    }
    await hot.stop()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    url = sys.argv[2] if len(sys.argv) > 2 else None
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if url is None:
            port = free_port()
            server = shutil.which("redis-server") or "/usr/bin/redis-server"
            args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "no", "--dir", tmp]
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.05)
        try:
            print(json.dumps(asyncio.run(measure(url, n)), indent=2))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
