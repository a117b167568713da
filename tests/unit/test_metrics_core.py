"""The metrics' pure parts: the state snapshot, its merge across workers, the top-N
domains, and prometheus_client's multiprocess files summed as the launcher serves them
(real processes writing into one directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from datorus_core import metrics as m


def test_a_snapshot_survives_its_state_file(tmp_path: Path) -> None:
    s = m.StateSnapshot(at=12.5)
    s.set("datorus_open_tunnels", 3, "tunnel")
    s.set("datorus_ledger_events_pending", 7)
    m.write_state(tmp_path, 4242, s)
    back = m.StateSnapshot.from_json(m.state_file(tmp_path, 4242).read_text())
    assert back == s
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed


def test_only_declared_gauges_can_be_set() -> None:
    with pytest.raises(KeyError):
        m.StateSnapshot().set("datorus_made_up", 1)


def test_workers_snapshots_merge_by_each_gauges_rule() -> None:
    old, new = m.StateSnapshot(at=1.0), m.StateSnapshot(at=2.0)
    old.set("datorus_open_tunnels", 2, "tunnel")
    new.set("datorus_open_tunnels", 3, "tunnel")
    new.set("datorus_open_tunnels", 1, "websocket")
    old.set("datorus_egress", 9, "active")  # a stale view of the same pool
    new.set("datorus_egress", 8, "active")
    old.set("datorus_ledger_pending_age_seconds", 4.0)
    new.set("datorus_ledger_pending_age_seconds", 0.5)
    merged = m.combine([new, old])
    assert merged.values["datorus_open_tunnels"] == [(("tunnel",), 5.0), (("websocket",), 1.0)]
    assert merged.values["datorus_egress"] == [(("active",), 8.0)]  # the freshest view
    assert merged.values["datorus_ledger_pending_age_seconds"] == [((), 4.0)]  # the worst
    assert m.combine([]).values == {}


def test_accounts_refused_on_several_workers_count_once() -> None:
    a, b = m.StateSnapshot(at=1.0), m.StateSnapshot(at=2.0)
    for acc in ("1", "2"):
        a.set("datorus_accounts_refused_for_money", 1, acc)
    for acc in ("2", "3"):
        b.set("datorus_accounts_refused_for_money", 1, acc)
    fams = {f.name: f for f in m.families(m.combine([a, b]))}
    [sample] = fams["datorus_accounts_refused_for_money"].samples
    assert sample.value == 3 and sample.labels == {}


def test_refused_accounts_are_forgotten_after_the_window() -> None:
    x = m.Metrics()
    x.answered("forward", 402, "TRIAL_EXHAUSTED", account=7)
    x.answered("forward", 200, "", account=8)  # not a refusal
    now = x.refused_accounts[7]
    assert x.accounts_refused(now) == [7]
    assert x.accounts_refused(now + m.REFUSED_WINDOW + 1) == []


def test_blocked_domains_are_bounded() -> None:
    counts = {f"d{i}.example": i for i in range(50)}
    top = m.top_domains(counts)
    assert len(top) == m.TOP_DOMAINS + 1
    assert top[0] == ("d49.example", 49)
    assert top[-1] == (m.OTHER, sum(range(40)))


def test_null_metrics_has_every_counting_method() -> None:
    counting = {
        n
        for n in vars(m.Metrics)
        if not n.startswith("_") and n not in ("prime", "accounts_refused", "accounts_refused_at")
    }
    assert counting <= set(vars(m.NullMetrics))


WORKER = """
import os, sys
from datorus_core import metrics as m
from datorus_core.metrics import StateSnapshot, write_state
x = m.Metrics()
x.prime()
for _ in range(int(sys.argv[1])):
    x.answered("forward", 200)
x.moved("tunnel", 10, 20)
s = StateSnapshot(at=float(sys.argv[1]))
s.set("datorus_open_tunnels", int(sys.argv[1]), "tunnel")
write_state(os.environ["PROMETHEUS_MULTIPROC_DIR"], os.getpid(), s)
print(os.getpid())
"""


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_the_launcher_sums_its_workers_and_keeps_the_totals_of_gone_ones(tmp_path: Path) -> None:
    env = {**os.environ, m.MULTIPROC_ENV: str(tmp_path)}
    pids = []
    for n in (2, 5):
        out = subprocess.run(
            [sys.executable, "-c", WORKER, str(n)],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        pids.append(int(out.stdout))
    registry = m.multiprocess_registry(tmp_path)
    got = _samples(generate_latest(registry).decode())
    ok = frozenset({("kind", "forward"), ("status", "200"), ("code", "")})
    assert got[("datorus_requests_total", ok)] == 7
    up = frozenset({("kind", "tunnel"), ("direction", "up")})
    assert got[("datorus_bytes_total", up)] == 20
    assert got[("datorus_open_tunnels", frozenset({("kind", "tunnel")}))] == 7
    m.forget_worker(tmp_path, pids[0])  # it exited: its state goes, its counts stay
    got = _samples(generate_latest(registry).decode())
    assert got[("datorus_requests_total", ok)] == 7
    assert got[("datorus_open_tunnels", frozenset({("kind", "tunnel")}))] == 5


def test_a_gone_workers_refused_accounts_count_until_out_of_their_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gauge, t0 = "datorus_accounts_refused_for_money", m.now()
    for pid, account in ((111, "7"), (222, "8")):
        s = m.StateSnapshot(at=t0)
        s.set(gauge, t0 - 10, account)  # refused 10 s ago
        s.set("datorus_open_tunnels", 1, "tunnel")
        m.write_state(tmp_path, pid, s)
    registry = m.multiprocess_registry(tmp_path)

    def scraped() -> tuple[float, float]:
        got = _samples(generate_latest(registry).decode())
        return got[(gauge, frozenset())], got.get(
            ("datorus_open_tunnels", frozenset({("kind", "tunnel")})), 0.0
        )

    assert scraped() == (2, 2)
    m.forget_worker(tmp_path, 111)  # replaced (a reload): its tunnels go, its refusals stay
    assert not m.state_file(tmp_path, 111).exists()
    assert scraped() == (2, 1)
    # past the window the gone worker's account is forgotten, and so is its file (a
    # living worker forgets its own: Metrics.accounts_refused)
    monkeypatch.setattr(m, "now", lambda: t0 - 10 + m.REFUSED_WINDOW + 1)
    assert scraped() == (1, 1)
    assert not list(tmp_path.glob(f"{m.GONE_PREFIX}*"))


def test_refused_accounts_carry_when_on_the_wall_clock() -> None:
    x = m.Metrics()
    x.answered("forward", 402, "INSUFFICIENT_BALANCE", account=5)
    mono = x.refused_accounts[5]
    assert x.accounts_refused_at(mono + 2.0, 1000.0) == [(5, 998.0)]
