"""scripts/bench's parsing and attribution: ApacheBench output and py-spy stacks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench"] = bench
_spec.loader.exec_module(bench)

AB_OUT = """\
Concurrency Level:      50
Time taken for tests:   2.001 seconds
Complete requests:      1704
Failed requests:        0
Non-2xx responses:      3
Keep-Alive requests:    1704
Requests per second:    851.62 [#/sec] (mean)
"""
AB_CSV = "Percentage served,Time in ms\n0,0.512\n50,51.250\n99,98.003\n100,120.1\n"


def test_ab_report_and_percentile_csv_are_parsed(tmp_path: Path) -> None:
    csv = tmp_path / "ab.csv"
    csv.write_text(AB_CSV)
    got = bench.parse_ab(AB_OUT, csv)
    assert got == {"requests": 1704, "failed": 3, "rps": 851.62, "p50": 51.25, "p99": 98.003}


def test_ab_failure_is_an_error_not_a_figure(tmp_path: Path) -> None:
    out = "Benchmarking 127.0.0.1\napr_socket_recv: Connection reset by peer (104)\n"
    got = bench.parse_ab(out, tmp_path / "missing.csv")
    assert got == {"requests": 0, "error": "ab: apr_socket_recv: Connection reset by peer (104)"}


def test_profile_samples_go_to_the_innermost_datorus_addon() -> None:
    mitm = "handle_hook (mitmproxy/proxy/mode_servers.py:73)"
    lean = "LeanDispatch.trigger_event (addons/lean.py:174)"
    assert bench.attribute([mitm, lean, "Metering.count (addons/metering.py:120)"]) == "metering"
    assert bench.attribute([mitm, lean]) == "lean dispatch"
    assert bench.attribute([mitm, lean, "Proxyserver.x (mitmproxy/addons/proxyserver.py:1)"]) == (
        "(mitmproxy, asyncio, protocol)"
    )
    write = "MeteredWriter.write (addons/metering.py:78)"
    assert bench.attribute([mitm, write, "StreamWriter.write (asyncio/streams.py:343)"]) == (
        "(mitmproxy, asyncio, protocol)"
    )
    thread = "_connection_worker_thread (aiosqlite/core.py:63)"
    assert bench.attribute(["Thread.run (threading.py:1010)", thread]) == (
        "ledger I/O thread (aiosqlite)"
    )


def test_profile_samples_in_patches_py_go_to_lean_dispatch_or_mitmproxy() -> None:
    """lean's dispatch and the HTTP/1 wrappers are written in patches.py."""
    mitm = "handle_hook (mitmproxy/proxy/mode_servers.py:73)"
    lean = "LeanDispatch.trigger_event (addons/patches.py:500)"
    rest = "(mitmproxy, asyncio, protocol)"
    assert bench.attribute([mitm, lean]) == "lean dispatch"
    assert bench.attribute([mitm, lean, "Metering.count (addons/metering.py:120)"]) == "metering"
    assert (
        bench.attribute([mitm, lean, "Proxyserver.x (mitmproxy/addons/proxyserver.py:1)"]) == rest
    )
    reader = "bound_request_heads.<locals>.make.<locals>.read_headers (addons/patches.py:300)"
    parse = "Http1Server.read_headers (mitmproxy/proxy/layers/http/_http1.py:285)"
    assert bench.attribute([mitm, reader, parse]) == rest
    assert bench.attribute([mitm, reader]) == "patches"


def test_table_renders_as_markdown() -> None:
    text = bench.render([["forward req/s, c50", "800", "900", "1.12x"]], ["figure", "a", "b", "r"])
    lines = text.splitlines()
    assert lines[0].startswith("| figure") and lines[1].startswith("|---")
    assert lines[2].split("|")[3].strip() == "900"
