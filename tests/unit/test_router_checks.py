"""The gateway applies what the pool worker's checks wrote (``EgressRouter.apply_checked``)."""

from __future__ import annotations

from types import SimpleNamespace

from addons.egress import EgressRouter
from datorus_core import egress as eg
from datorus_core.egress_status import Health


def router() -> EgressRouter:
    r = EgressRouter(SimpleNamespace(settings={}))  # type: ignore[arg-type]
    r.pool.replace(
        [eg.Egress(i, eg.parse_egress_url(f"http://127.0.0.1:{3000 + i}")) for i in (1, 2, 3)]
    )
    return r


def test_checked_rows_move_status_score_and_findings():
    r = router()
    assert r.pool.candidates(None) == []  # unchecked: nothing to choose
    rows = [
        (1, "active", 0, 0.9, 12.0, "192.0.2.1", "de", 4),
        (2, "dead", 3, 0.0, None, None, None, 4),
        (9, "active", 0, 0.9, 12.0, None, None, 5),  # not loaded yet: the next reload
    ]
    assert r.apply_checked(rows, 100.0)  # an egress became active: reweigh now
    r.pool.reweigh()
    e = r.pool.by_id[1]
    assert (e.status, e.score, e.latency_ms, e.exit_ip, e.country) == (
        "active",
        0.9,
        12.0,
        "192.0.2.1",
        "de",
    )
    assert [x.id for x in r.pool.candidates("de")] == [1]
    assert r.check_seq == 5
    # unchecked -> dead, or a dead one's score: no active egress moved, no reweigh
    assert not r.apply_checked([(3, "dead", 3, 0.0, None, None, None, 6)], 101.0)
    assert not r.rescored


def test_a_failed_check_backs_an_active_egress_off_and_a_pass_brings_it_back():
    r = router()
    r.pool.by_id[1].health = Health("active", 0)
    r.pool.reweigh()
    assert not r.apply_checked([(1, "active", 1, 0.0, None, None, None, 7)], 50.0)
    e = r.pool.by_id[1]
    assert e.status == "active" and not e.up(50.0) and e.up(e.down_until)
    assert r.rescored  # its score moved: reweighed within a few seconds
    r.apply_checked([(1, "active", 0, 0.8, 10.0, None, None, 8)], 51.0)
    assert e.up(51.0)
