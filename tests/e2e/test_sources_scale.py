"""10,000 listed proxies imported and checked with bounded memory (issue 17).

A proxy farm on loopback (``support/proxy_farm.py``, a process of its own) serves a
list of 10,000 ``host:port`` lines: 100 small asyncio HTTP proxies that relay for real,
9,900 addresses where nothing listens. A real gateway with its REST API and default
check settings (every 30 s, 50 at once, the built-in judge) scrapes it on an operator's
request; every proxy then has to leave ``unchecked`` (active or dead) within the bound,
the gateway's RSS must stay bounded, and a customer's forward requests keep being
answered all along. ``egress_dead_after`` is 1 here (an existing setting, an operator's
choice for a free list): with the default 3, a refusing proxy is dead only at its third
check, a minute later at the default 30 s period, and the test would wait on the clock
rather than on the work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import requests
from api_helpers import bearer
from support.ledger import add_egress, prepare_ledger
from support.origins import BlockingOrigin
from support.processes import Gateway
from support.waiting import free_port, wait_until

FARM = Path(__file__).resolve().parents[1] / "support" / "proxy_farm.py"
TOTAL, LIVE = 10_000, 100
CHECKED_WITHIN = 240.0  # s from the scrape's answer: a bound, not a target (measured 47 s at load
# 1.7 on 2 cores; the whole suite beside it on -n 2 can halve the check rate: the time
# target is scripts/bench --sources's)
# RSS growth bound: measured +39 MB (135 -> 174 MB) for 10,000 egress (their records, the pool's
# weights, the check heap, 10,000 check rows in flight to the ledger). 150 MB leaves room
# for allocator noise on a busy box and still catches a leak per check or a copy per proxy.
RSS_GROWTH_MB = 150


def rss_mb(pid: int) -> float:
    """VmRSS of *pid* in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def farm():
    proc = subprocess.Popen(
        [sys.executable, str(FARM), "--total", str(TOTAL), "--live", str(LIVE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())  # printed once everything listens
        assert info["live"] == LIVE and info["refused"] == TOTAL - LIVE
        yield info
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def origin():
    o = BlockingOrigin("127.0.0.1")
    yield o
    o.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    db = tmp_path_factory.mktemp("scale") / "ledger.db"
    prepare_ledger(db)
    add_egress(db, [("direct://", None)])
    g = Gateway(db, {"api_port": free_port(), "egress_dead_after": 1}).start()
    g.acc, g.user, g.pw = g.customer(trial_bytes=10**12)
    g.op = g.cli("key", "create", "--operator", "--label", "ops")["key"]
    yield g
    g.stop()


def by_status(g: Gateway) -> dict[str, int]:
    r = httpx.get(g.api_url + "/stats/pool", headers=bearer(g.op), timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json()["by_status"])


def test_10000_listed_proxies_imported_and_checked_with_bounded_memory(gw, farm, origin):
    assert gw.proc is not None
    proxies = {"http": gw.proxy(gw.user, gw.pw)}
    wait_until(lambda: by_status(gw).get("active") == 1, 30, 0.2, "the direct egress checked")
    # the gateway reads what the pool worker's checks changed every 0.5 s
    wait_until(
        lambda: requests.get(origin.url("/x"), proxies=proxies, timeout=20).status_code == 200,
        10,
        0.1,
        "the direct egress in the gateway's pool",
    )
    before = rss_mb(gw.proc.pid)

    answered: list[int] = []
    failed: list[str] = []
    stop = threading.Event()

    def customer() -> None:  # forward requests all along the import and the checks
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.get(origin.url("/x"), proxies=proxies, timeout=20)
                    (answered if r.status_code == 200 else failed).append(r.status_code)
                except requests.RequestException as e:
                    failed.append(str(e))
                stop.wait(0.05)

    client = threading.Thread(target=customer, daemon=True)
    client.start()
    peak = before
    try:
        r = httpx.post(
            gw.api_url + "/sources",
            headers=bearer(gw.op),
            json={"url": farm["list_url"], "name": "farm", "parser_name": "plaintext"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        t0 = time.monotonic()
        r = httpx.post(
            f"{gw.api_url}/sources/{r.json()['id']}/scrape", headers=bearer(gw.op), timeout=60
        )
        assert r.status_code == 200, r.text
        assert r.json()["proxies_new"] == TOTAL, r.json()
        scraped = time.monotonic() - t0

        def all_checked() -> dict[str, int] | None:
            nonlocal peak
            peak = max(peak, rss_mb(gw.proc.pid))
            counts = by_status(gw)
            done = counts.get("active", 0) + counts.get("dead", 0) == TOTAL + 1
            return counts if done else None

        counts = wait_until(all_checked, CHECKED_WITHIN, 1.0, "every listed proxy checked")
        checked = time.monotonic() - t0
    finally:
        stop.set()
        client.join(30)
    after = rss_mb(gw.proc.pid)
    print(
        f"\nscrape {scraped:.1f} s, all checked {checked:.1f} s; RSS {before:.0f} MB before,"
        f" {peak:.0f} MB peak, {after:.0f} MB after; {len(answered)} forward requests answered"
    )
    assert counts == {"active": LIVE + 1, "dead": TOTAL - LIVE}, counts
    assert peak - before < RSS_GROWTH_MB, (before, peak)
    assert not failed, failed[:5]
    assert len(answered) >= 20, len(answered)  # it kept answering, not just once
