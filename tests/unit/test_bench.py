"""scripts/bench's parsing and attribution: ApacheBench output and py-spy stacks."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest

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


def test_bench_seeding_goes_through_the_ledger_package(tmp_path: Path) -> None:
    from datorus_core.envelope import DatorusError
    from datorus_core.ledger import IntegrityError, accounts, open_ledger, usage

    d = open_ledger(tmp_path / "seed.db")
    ids = [accounts.create_account(d, f"s{i}@bench.example", 10**9)["id"] for i in range(3)]
    assert accounts.add_credentials_bulk(d, [(i, f"user{i}", "hash") for i in ids]) == 3
    assert [c["username"] for c in accounts.list_credentials(d, ids[1])] == [f"user{ids[1]}"]
    old = "2026-01-01T00:00:00Z"
    rows = [(f"req-{n}", ids[0], 1, "GET", "example.com", 80, 200, 100, 1000, 0, 0, old, old)
            for n in range(5)]  # fmt: skip
    assert usage.insert_receipts(d, rows) == 5
    got = usage.receipt(d, "req-3")
    assert (got["account_id"], got["host"], got["bytes_down"], got["finished_at"]) == (
        ids[0], "example.com", 1000, old,
    )  # fmt: skip
    with pytest.raises(IntegrityError):  # one transaction: the new row goes with the duplicate
        usage.insert_receipts(d, [("req-new", *rows[0][1:]), rows[0]])
    with pytest.raises(DatorusError):
        usage.receipt(d, "req-new")
    d.close()


def test_baseline_and_workers_comparisons_are_parsed() -> None:
    a = bench.parse_args(["--quick", "--baseline", "dcd3bfb", "--workers-compare"])
    assert (a.baseline, a.workers_compare, a.workers, a.rounds) == ("dcd3bfb", True, 2, 1)
    plain = bench.parse_args([])
    assert (plain.baseline, plain.workers_compare) == (None, False)


@pytest.mark.parametrize("argv", [["--workers-compare", "--workers", "1"], ["--baseline", " "]])
def test_a_comparison_without_its_subject_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2


def test_comparisons_are_made_within_each_round() -> None:
    rounds = [
        {"datorus": {"rps": 300.0, "p99": 6.0}, "baseline": {"rps": 200.0, "p99": 5.0}},
        {"datorus": {"rps": 100.0}, "baseline": {"rps": 125.0, "p99": 4.0}},
        {"datorus": {"rps": 90.0}, "baseline": {"rps": 0}},  # no ratio to a zero
    ]
    assert bench.per_round(rounds, "datorus", "baseline", "rps") == [1.5, 0.8]
    assert bench.per_round(rounds, "datorus", "baseline", "p99", "diff") == [1.0]
    assert bench.per_round(rounds, "datorus", "workers", "rps") == []
    assert (bench.shown(1.234, "ratio"), bench.shown(-0.5, "diff"), bench.shown(None, "x")) == (
        "1.23x", "-0.50 ms", "-",
    )  # fmt: skip
    assert bench.mark(lambda r: r >= 1.7, 1.69) == "MISS"
    assert bench.mark(None, 2.0) == bench.mark(lambda r: True, None) == ""


def test_costs_per_request_count_redis_apart_from_its_info_command() -> None:
    before, after = bench.Sample(10.0, 1.0, 500), bench.Sample(10.5, 1.1, 1501)
    assert bench.costs(before, after, 500) == {
        "cpu_ms": 1.0, "redis_cpu_ms": 0.2, "redis_cmds": 2.0,
    }  # fmt: skip
    assert bench.costs(bench.Sample(1.0), bench.Sample(2.0), 1000) == {"cpu_ms": 1.0}
    busy = bench.costs(
        bench.Sample(1.0, box=(100, 1000), clients=0.5),
        bench.Sample(1.1, box=(150, 1100), clients=0.6),
        100,
    )
    assert busy == {"cpu_ms": 1.0, "box_idle_pct": 50.0, "client_cpu_ms": 1.0}
    idle, every = bench.box_jiffies()
    assert 0 <= idle <= every


def test_proc_stat_gives_session_and_cpu_even_with_odd_names() -> None:
    line = "4242 (a (b) c) S 1 4200 4200 0 -1 4194304 0 0 0 0 300 100 0 0 20 0 5 0 9 1 1"
    assert bench.stat_fields(line) == (4200, 400 / bench.CLK_TCK)
    assert bench.redis_info("$40\r\n# Stats\r\ntotal_commands_processed:7\r\n") == {
        "total_commands_processed": "7"
    }


SPIN = """
import os, sys, time
def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
pid = os.fork()
if pid == 0:
    spin(0.3)
    print("child", flush=True)
    sys.stdin.read()
    os._exit(0)
print(sys.stdin.readline() and "", end="")
"""


def test_session_cpu_counts_the_workers_a_proxy_forks() -> None:
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-c", SPIN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "child\n"
        whole = bench.session_cpu_seconds({proc.pid})
        assert whole >= 0.25 and bench.cpu_seconds(proc.pid) < 0.2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the forked child too
        proc.wait(10)


def test_two_nodes_are_compared_with_one_within_each_round() -> None:
    a = bench.parse_args(["--quick", "--ledger-compare"])
    assert a.ledger_compare and not bench.parse_args([]).ledger_compare
    fake = bench.Bench(a, Path("/nonexistent"), bench.Children(Path("/nonexistent")))
    fake.rounds = [
        {"one_node": {"rps": 400.0, "pg_cpu_pct": 1.0}, "two_nodes": {"rps": 720.0,
                                                                      "pg_cpu_pct": 3.5}},
        {"one_node": {"rps": 500.0, "pg_cpu_pct": 2.0}, "two_nodes": {"rps": 850.0,
                                                                      "pg_cpu_pct": 3.0}},
    ]  # fmt: skip
    rows, summary = bench.nodes_table(fake)
    assert summary["rps"]["rounds"] == [1.8, 1.7]
    assert summary["rps"]["ratio"] == pytest.approx(1.75) and summary["rps"]["mark"] == "PASS"
    assert rows[0][3:5] == ["1.75x", "1.80 1.70"]
    pg = next(r for r in rows if r[0].startswith("PostgreSQL CPU, %"))
    assert pg[3] == "+1.8 pts"  # the median of +2.5 and +1.0 points of a core


def test_the_bench_s_postgresql_cpu_counts_the_server_s_children() -> None:
    import subprocess

    burn = (
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass\n"
        "print('burnt', flush=True)\ntime.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "burnt\n"
        me = os.getpid()
        assert bench.family_cpu_seconds(me) >= bench.cpu_seconds(me) + 0.2
    finally:
        child.kill()
        child.wait()
