"""Does delivering events cost the proxy? (issue 18's performance figure)

Two gateways of this checkout on loopback, each on a ledger of its own made as
``scripts/bench`` makes it, forward the same small nginx page (ab keep-alive, c1),
alternating round by round:

- ``quiet``: no subscription;
- ``events``: 100 webhook subscriptions to ``credits.*`` (the operator's), 10 of
  them at a port where nothing listens (every delivery fails and is retried), the other
  90 at a receiver in this process; a feeder tops the account up once a second, so the
  gateway's delivery task fans out and sends 100 deliveries a second (and retries the
  failing ones) while ab measures.

Prints each round and the medians of forward req/s and p99 at c1, c50 req/s, and the CPU
the gateway's own process spent per forward request at c50 (its delivery process apart:
what the proxy itself pays, whatever else the box's cores are busy with).
Usage: ``.venv/bin/python scripts/bench_events.py [--rounds 3] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench as B  # noqa: E402

from datorus_core.ledger import events as ledger_events  # noqa: E402
from datorus_core.ledger import money, open_ledger  # noqa: E402


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen = 0

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        _Ok.seen += 1
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()


def subscribe(db: Path, url: str, dead: list[str], n: int = 100) -> None:
    """*n* operator webhooks to ``credits.*`` (an account may have 20; the operator's see
    every account's events alike), the *dead* ones first."""
    d = open_ledger(db)
    for i in range(n):
        target = dead[i] if i < len(dead) else url
        ledger_events.add_subscription(d, None, "webhook", target, ("credits.*",))
    d.close()


def feed(db: Path, stop: threading.Event) -> None:
    """A top-up of account 1 every second (one credits.purchased event)."""
    d = open_ledger(db)
    while not stop.wait(1.0):
        money.add_balance(d, 1, 1, "bench feeder")
    d.close()


def ab(proxy: B.Proxy, origin: B.Origin, conc: int, seconds: float, tmp: Path) -> dict[str, Any]:
    """One ab run, and the CPU the gateway's own process (not its delivery process) spent
    per request meanwhile."""
    csv = tmp / f"ab-{proxy.key}-{conc}.csv"
    before = B.cpu_seconds(proxy.pid)
    out = B.run(B.ab_cmd(proxy, origin, conc, seconds, 10**7, csv), seconds + 60)
    res = B.parse_ab(out.stdout, csv)
    if "rps" not in res:
        raise SystemExit(f"bench: {proxy.key} at c{conc}: {res.get('error')} {out.stderr[-300:]}")
    res["cpu_ms"] = (B.cpu_seconds(proxy.pid) - before) * 1000 / max(1, res["requests"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="datorus-bench-events-"))
    children = B.Children(tmp)
    receiver = ThreadingHTTPServer((B.HOST, 0), _Ok)
    receiver.daemon_threads = True
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    stop = threading.Event()
    try:
        origin = B.start_origin(children, tmp, force_python=False)
        proxies = {}
        for key in ("quiet", "events"):
            db = tmp / f"{key}.db"
            creds = B.prepare_ledger(db)
            if key == "events":
                dead = [f"http://{B.HOST}:{B.free_port()}/dead" for _ in range(10)]
                subscribe(db, f"http://{B.HOST}:{receiver.server_address[1]}/hook", dead)
                threading.Thread(target=feed, args=(db, stop), daemon=True).start()
            p = B.start_proxy(children, tmp, key, "addons/datorus.py", db, creds)
            children.wait_port(p.proc, key, p.port, 30)
            B.probe(p, origin)
            proxies[key] = p
        time.sleep(3)  # the first deliveries and failures under way
        got: dict[str, dict[str, list[float]]] = {k: {} for k in proxies}
        for r in range(args.rounds):
            for key, p in proxies.items():
                c1 = ab(p, origin, 1, args.seconds, tmp)
                c50 = ab(p, origin, 50, args.seconds, tmp)
                row = got[key]
                row.setdefault("rps_c1", []).append(c1["rps"])
                row.setdefault("p99_c1", []).append(c1["p99"])
                row.setdefault("rps_c50", []).append(c50["rps"])
                row.setdefault("cpu_c50", []).append(c50["cpu_ms"])
                print(
                    f"round {r + 1} {key:>6}: c1 {c1['rps']:.0f} req/s p99 {c1['p99']:.2f} ms,"
                    f" c50 {c50['rps']:.0f} req/s, {c50['cpu_ms']:.3f} gateway CPU ms/request"
                    f" (failed {c1.get('failed')}/{c50.get('failed')})",
                    flush=True,
                )
        d = open_ledger(tmp / "events.db")
        counts = dict(
            d.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall()
        )
        d.close()
        print(f"deliveries: {counts}; the receiver got {_Ok.seen}")
        for key in proxies:
            med = {k: statistics.median(v) for k, v in got[key].items()}
            print(
                f"median {key:>6}: c1 {med['rps_c1']:.0f} req/s, p99 {med['p99_c1']:.2f} ms,"
                f" c50 {med['rps_c50']:.0f} req/s, {med['cpu_c50']:.3f} gateway CPU ms/request"
            )
    finally:
        stop.set()
        receiver.shutdown()
        children.stop_all()


if __name__ == "__main__":
    main()
