"""``scripts/bench --sources``: the gateway idle against the same gateway while a source of
10,000 proxies is scraped and fully checked (issue 17), measured in one run.

One gateway (REST API on, default check settings: every 30 s, 50 at once, the built-in
judge; ``egress_dead_after`` 1 so a refusing proxy is checked once, as the e2e test
does), its origin, and ``tests/support/proxy_farm.py`` (100 relaying fakes, 9,900
refusing addresses, and the list). Forward c1 (p99) and c50 (req/s) with ab, as the main
bench runs them (keep-alive, one sticky session, so the load stays on the box's own
egress), alternate: idle before, then while the source is scraped through the API and
every proxy leaves ``unchecked``, then idle again. The scrape+check wall time runs from
the scrape request to the moment ``/stats/pool`` counts every proxy active or dead.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import bench as b

TOTAL, LIVE = 10_000, 100


def _api(port: int, key: str, method: str, path: str, body: Any = None) -> Any:
    import httpx

    r = httpx.request(
        method,
        f"http://{b.HOST}:{port}{path}",
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        timeout=60,
    )
    r.raise_for_status()
    return r.json()


def run_sources(args: Any, tmp: Path, children: b.Children) -> dict[str, Any]:
    """The whole ``--sources`` run; prints the table and returns the figures."""
    b.ensure_tools(not args.no_install)
    load = " ".join(f"{v:.1f}" for v in b.os.getloadavg())
    bench = b.Bench(args, tmp, children)
    bench.origin = origin = b.start_origin(children, tmp, args.python_origin)
    db = tmp / "sources.db"
    creds = b.prepare_ledger(db)
    key = json.loads(
        b.run(
            [
                b.tool("datorus") or "datorus",
                "key",
                "create",
                "--operator",
                "--db",
                str(db),
                "--json",
            ],
            60,
        ).stdout  # fmt: skip
    )["key"]
    api_port, port = b.free_port(), b.free_port()
    cmd = [b.tool("mitmdump") or "mitmdump", "-s", str(b.REPO / "addons/datorus.py")]
    gw_args = b.gateway_args(tmp, "gw", port, db)
    at = gw_args.index("datorus_api_port=0")
    del gw_args[at - 1 : at + 1]  # the API on: the scrape and the judge live there
    cmd += [*gw_args, "--set", f"datorus_api_port={api_port}"]
    cmd += ["--set", "datorus_egress_dead_after=1"]
    cmd += ["--set", "datorus_source_proxy_allow=127.0.0.0/8"]  # the farm is on loopback
    p = b.Proxy("gw", port, children.spawn("gw", cmd), creds)
    children.spawn(
        "farm",
        [
            b.sys.executable,
            str(b.REPO / "tests/support/proxy_farm.py"),
            "--total",
            str(TOTAL),
            "--live",
            str(LIVE),
        ],  # fmt: skip
    )
    children.wait_port(p.proc, "gw", port, 60)
    children.wait_port(p.proc, "gw", api_port, 60)
    deadline = time.monotonic() + 30
    while not (tmp / "farm.log").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    info = json.loads((tmp / "farm.log").read_text().splitlines()[0])
    b.probe(p, origin)
    bench.forward(p, 10, count=500)  # warm-up
    secs = args.seconds

    def pair() -> tuple[float, float]:
        c1 = bench.forward(p, 1, secs)
        c50 = bench.forward(p, b.C50, secs)
        return c1.get("p99", float("nan")), c50.get("rps", float("nan"))

    idle = [pair() for _ in range(args.rounds)]
    b.log("idle measured; adding and scraping the 10,000-proxy source")
    sid = _api(api_port, key, "POST", "/sources", {"url": info["list_url"], "name": "farm"})["id"]
    t0 = time.monotonic()
    scraped = _api(api_port, key, "POST", f"/sources/{sid}/scrape")
    scrape_s = time.monotonic() - t0
    done: dict[str, float] = {}

    def watch() -> None:
        while time.monotonic() - t0 < 300:
            st = _api(api_port, key, "GET", "/stats/pool")["by_status"]
            if st.get("active", 0) + st.get("dead", 0) >= TOTAL + 2:
                done["at"] = time.monotonic() - t0
                done["active"], done["dead"] = st.get("active", 0) - 2, st.get("dead", 0)
                return
            time.sleep(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    busy = []
    while watcher.is_alive():
        busy.append(pair())
    rss_busy = b.rss_mb(p.pid)
    after = [pair() for _ in range(args.rounds)]
    idle_all = idle + after

    def med(xs: list[tuple[float, float]], i: int) -> float:
        return statistics.median(x[i] for x in xs)

    fig = {
        "idle_p99_ms": med(idle_all, 0),
        "busy_p99_ms": med(busy, 0) if busy else None,
        "idle_rps": med(idle_all, 1),
        "busy_rps": med(busy, 1) if busy else None,
        "scrape_s": scrape_s,
        "checked_s": done.get("at"),
        "active": done.get("active"),
        "dead": done.get("dead"),
        "proxies_new": scraped.get("proxies_new"),
        "busy_runs": len(busy),
        "rss_mb_after": rss_busy,
        "load_avg_start": load,
        "load_avg_end": " ".join(f"{v:.1f}" for v in b.os.getloadavg()),
    }
    rows = [
        ["forward p99 c1 (ms)", f"{fig['idle_p99_ms']:.2f}", _n(fig["busy_p99_ms"], 2),
         _d(fig["busy_p99_ms"], fig["idle_p99_ms"], "ms")],
        ["forward req/s c50", f"{fig['idle_rps']:.0f}", _n(fig["busy_rps"], 0),
         _d(fig["busy_rps"], fig["idle_rps"], "%")],
        ["scrape (s)", "", f"{scrape_s:.1f}", f"{fig['proxies_new']} new"],
        ["scrape + all checked (s)", "", _n(fig["checked_s"], 1),
         f"{fig['active']} active, {fig['dead']} dead (target < 60 s)"],
    ]  # fmt: skip
    print(f"\nDatorus --sources bench: {TOTAL:,} proxies ({LIVE} live fakes), {secs:g} s ab runs,"
          f" {len(idle_all)} idle pairs, {len(busy)} pairs while checking; load avg {load} at"
          f" start, {fig['load_avg_end']} at end; gateway RSS {rss_busy:.0f} MB after")  # fmt: skip
    print(b.render(rows, ["figure", "idle", "scraping+checking", "change"]))
    return fig


def _n(v: float | None, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _d(busy: float | None, idle: float, how: str) -> str:
    if busy is None:
        return "n/a"
    if how == "ms":
        return f"{busy - idle:+.2f} ms"
    return f"{(busy / idle - 1) * 100:+.1f}%"
