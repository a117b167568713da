"""Measure the sticky-session table: memory for 100,000 live sessions and time per lookup.

Run: ``.venv/bin/python scripts/bench_sessions.py [N]``. Prints one JSON object.
"""

from __future__ import annotations

import json
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datorus_core.egress import Egress, Pool, parse_egress_url  # noqa: E402
from datorus_core.egress_status import Health  # noqa: E402
from datorus_core.sessions import SessionTable  # noqa: E402


def main(n: int = 100_000) -> dict:
    """Fill a table with *n* sessions of realistic ids; measure memory and speed."""
    rng = random.Random(1)
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    # the ids are the clients' strings and live as long as the table: counted (with the
    # list holding them, so the figure is an upper bound)
    ids = [f"{rng.getrandbits(128):032x}-{i}" for i in range(n)]  # ~38-char ids
    table = SessionTable(ttl=600, max_sessions=2 * n)
    now = time.monotonic()
    for i, sid in enumerate(ids):
        table.put(1 + i % 1000, sid, i % 50, now)
    after = tracemalloc.take_snapshot()
    size = sum(s.size_diff for s in after.compare_to(base, "filename"))
    tracemalloc.stop()
    t0 = time.perf_counter()
    for i, sid in enumerate(ids):
        table.get(1 + i % 1000, sid, now)
    get_us = (time.perf_counter() - t0) / n * 1e6
    pool = Pool(
        [
            Egress(
                i,
                parse_egress_url(f"direct://10.0.{i // 250}.{i % 250 + 1}"),
                health=Health("active"),
            )
            for i in range(1000)
        ]
    )
    t0 = time.perf_counter()
    for _ in range(n):
        pool.pick("example.com", None, now, rng)
    pick_us = (time.perf_counter() - t0) / n * 1e6
    return {
        "sessions": len(table),
        "bytes_total": size,
        "mb_total": round(size / 1e6, 1),
        "bytes_per_session": round(size / n),
        "get_us": round(get_us, 2),
        "pick_us_1000_egress": round(pick_us, 2),
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)))
