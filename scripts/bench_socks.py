"""The SOCKS5 entry against CONNECT on one gateway, interleaved, in one run (issue 19).

Run: ``.venv/bin/python scripts/bench_socks.py [--rounds N] [--tunnels N]``. It starts
``scripts/bench_origin.py`` (HTTPS, ``/1k`` and ``/100m``, a throwaway CA made with
``trustme``), one gateway (``mitmdump -s addons/datorus.py``, a fresh ledger, limits far
above the load, loopback allowed) with its SOCKS5 entry on a free port, and measures per
round, CONNECT and SOCKS5 in turn:

- tunnels per second at c50: connect (an HTTP CONNECT, or the SOCKS5 greeting, RFC 1929
  auth and request), TLS verified against the CA, ``GET /1k``, close, by a client in a
  process of its own (``_client`` below);
- MB/s of the 100 MB file through one tunnel, with curl (``-x`` and ``--socks5``).

Prints the medians, the SOCKS5/CONNECT ratios and the issue's targets (at least 0.9x
tunnels/s, 0.95x MB/s), then one JSON object. Everything it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
C50 = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench_socks: a process exited at start ({proc.args})")
        try:
            socket.create_connection((HOST, port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench_socks: nothing listens on {port}")


def datorus(db: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [str(BIN / "datorus"), "--db", str(db), *args, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


# -- the client (its own process, so its CPU is not the gateway's) -----------------------


async def client(mode: str, gw: int, socks_port: int, port: int, ca: str, n: int, auth: str):
    user, _, password = base64.b64decode(auth).decode().partition(":")
    ctx = ssl.create_default_context(cafile=ca)
    target = f"{HOST}:{port}"
    connect = (
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    ).encode()
    u, p = user.encode(), password.encode()
    socks_auth = bytes((1, len(u))) + u + bytes((len(p),)) + p
    socks_req = b"\x05\x01\x00\x01" + socket.inet_aton(HOST) + struct.pack("!H", port)
    get = f"GET /1k HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode()
    state: dict[str, Any] = {"ok": 0, "failed": 0, "error": None}
    sem = asyncio.Semaphore(C50)

    async def one() -> None:
        if mode == "connect":
            reader, writer = await asyncio.open_connection(HOST, gw)
            writer.write(connect)
            head = await reader.readuntil(b"\r\n\r\n")
            if head.split(b" ", 2)[1] != b"200":
                raise ValueError(head.split(b"\r\n")[0].decode(errors="replace"))
        else:
            reader, writer = await asyncio.open_connection(HOST, socks_port)
            writer.write(b"\x05\x01\x02")
            if await reader.readexactly(2) != b"\x05\x02":
                raise ValueError("method refused")
            writer.write(socks_auth)
            if await reader.readexactly(2) != b"\x01\x00":
                raise ValueError("auth refused")
            writer.write(socks_req)
            reply = await reader.readexactly(10)
            if reply[1] != 0:
                raise ValueError(f"reply 0x{reply[1]:02x}")
        try:
            await writer.start_tls(ctx, server_hostname=HOST)
            writer.write(get)
            body = (await reader.read()).partition(b"\r\n\r\n")[2]
            if len(body) != 1024:
                raise ValueError(f"{len(body)} body bytes")
        finally:
            writer.close()

    async def guarded() -> None:
        async with sem:
            try:
                await asyncio.wait_for(one(), 30)
                state["ok"] += 1
            except (
                OSError,
                ValueError,
                IndexError,
                TimeoutError,
                asyncio.IncompleteReadError,
            ) as e:
                state["failed"] += 1
                state["error"] = f"{type(e).__name__}: {e}"

    t0 = time.perf_counter()
    await asyncio.gather(*(guarded() for _ in range(n)))
    state["rate"] = state["ok"] / (time.perf_counter() - t0)
    return state


# -- the bench -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tunnels", type=int, default=300, help="tunnels per measurement")
    args = ap.parse_args()
    import trustme

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ca = trustme.CA()
        cert = ca.issue_cert(HOST, "localhost")
        cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
        for pem in cert.cert_chain_pems[1:]:
            with open(tmp / "cert.pem", "ab") as f:
                f.write(pem.bytes())
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        https = free_port()
        db = tmp / "ledger.db"
        datorus(db, "init")
        datorus(db, "policy", "allow", "127.0.0.0/8")
        acc = datorus(db, "account", "create", "bench@example.com", "--trial-bytes", str(10**15))
        cred = datorus(db, "credential", "create", str(acc["id"]))
        auth = base64.b64encode(f"{cred['username']}:{cred['password']}".encode()).decode()
        gw, socks_port = free_port(), free_port()
        env = {**os.environ, "DATORUS_SOCKS5_PORT": str(socks_port)}
        try:
            origin = subprocess.Popen(
                [sys.executable, str(REPO / "scripts/bench_origin.py"), "--http-port",
                 str(free_port()), "--https-port", str(https), "--cert", str(tmp / "cert.pem"),
                 "--key", str(tmp / "key.pem")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(origin)
            gateway = subprocess.Popen(
                [str(BIN / "mitmdump"), "-q", "-s", str(REPO / "addons/datorus.py"),
                 "--listen-host", HOST, "--listen-port", str(gw), "--set", f"datorus_db={db}",
                 "--set", f"confdir={tmp / 'mitm'}", "--set", "datorus_api_port=0",
                 "--set", "datorus_rps=10000000", "--set", "datorus_burst=10000000",
                 "--set", "datorus_max_tunnels=100000"],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(gateway)
            wait_port(https, origin)
            wait_port(gw, gateway)
            wait_port(socks_port, gateway)
            time.sleep(1.0)  # the ledger's first snapshot
            for mode in ("connect", "socks5"):  # warm-up: the credential's first slow hash
                subprocess.run(
                    [sys.executable, __file__, "_client", mode, str(gw), str(socks_port),
                     str(https), str(tmp / "ca.pem"), "20", auth],
                    capture_output=True, timeout=300,
                )  # fmt: skip
            results: dict[str, list[dict[str, float]]] = {"connect": [], "socks5": []}
            for n in range(1, args.rounds + 1):
                for mode in ("connect", "socks5"):
                    before = cpu_seconds(gateway.pid)
                    out = subprocess.run(
                        [sys.executable, __file__, "_client", mode, str(gw), str(socks_port),
                         str(https), str(tmp / "ca.pem"), str(args.tunnels), auth],
                        capture_output=True, text=True, timeout=300,
                    ).stdout  # fmt: skip
                    t = json.loads(out.strip().splitlines()[-1])
                    cpu = cpu_seconds(gateway.pid) - before
                    proxy = (
                        ["-x", f"http://{HOST}:{gw}"]
                        if mode == "connect"
                        else ["--socks5", f"{HOST}:{socks_port}"]
                    )
                    user = base64.b64decode(auth).decode()
                    dl = subprocess.run(
                        ["curl", "-sS", "-o", "/dev/null", "--max-time", "120", "--cacert",
                         str(tmp / "ca.pem"), *proxy, "--proxy-user", user, "-w",
                         "%{http_code} %{speed_download}", f"https://{HOST}:{https}/100m"],
                        capture_output=True, text=True, timeout=150,
                    ).stdout.split()  # fmt: skip
                    mbps = float(dl[1]) / 1e6 if dl and dl[0] == "200" else 0.0
                    row = {
                        "tunnels_per_s": t["rate"],
                        "failed": t["failed"],
                        "cpu_ms_per_tunnel": 1000 * cpu / max(1, t["ok"]),
                        "mbps": mbps,
                    }
                    results[mode].append(row)
                    print(
                        f"round {n}: {mode:<8} {t['rate']:7.1f} tunnels/s c50"
                        f" ({t['failed']} failed)  {row['cpu_ms_per_tunnel']:.2f} CPU ms/tunnel"
                        f"  {mbps:7.0f} MB/s one tunnel",
                        flush=True,
                    )
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    summary: dict[str, Any] = {"rounds": args.rounds, "tunnels": args.tunnels}
    for key, target in (("tunnels_per_s", 0.9), ("mbps", 0.95), ("cpu_ms_per_tunnel", None)):
        c, s = median("connect", key), median("socks5", key)
        ratio = s / c if c else 0.0
        summary[key] = {"connect": round(c, 2), "socks5": round(s, 2), "ratio": round(ratio, 3)}
        verdict = "" if target is None else (" PASS" if ratio >= target else " MISS")
        goal = "" if target is None else f" (target >= {target}x)"
        print(f"{key:<18} CONNECT {c:9.2f}  SOCKS5 {s:9.2f}  ratio {ratio:.3f}{goal}{verdict}")
    print(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_client"]:
        mode, gw, sp, port, ca, n, auth = sys.argv[2:9]
        result = asyncio.run(client(mode, int(gw), int(sp), int(port), ca, int(n), auth))
        print(json.dumps(result))
    else:
        main()
