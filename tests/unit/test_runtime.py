"""Property tests for the in-memory meter: reservations bound the overdraft, nothing is lost.

The runtime is pure state (no mitmproxy, no database), so these drive it directly
with random interleavings of parallel forward flows, tunnel chunks, flushes and
operator snapshots, and check the money invariants after every step.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from datorus_core.envelope import DatorusError
from datorus_core.runtime import Runtime

NANO = 10**9
SETTINGS = {
    "price_cents_per_gb": 300,
    "rps": 50,
    "burst": 100,
    "max_tunnels": 10,
    "max_overdraft_cents": 5,
    "min_balance_cents": 1,
}


def runtime(trial: int, nanocents: int, price: int, topped_up: bool, max_bytes=None) -> Runtime:
    rt = Runtime(dict(SETTINGS))
    rt.apply_snapshot(
        [(1, "active", price, None, None, None, trial, nanocents, int(topped_up))],
        [(7, 1, "dtuser", "hash", max_bytes, 0)],
        [],
        version=1,
    )
    return rt


ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "settle", "tunnel", "flush"]),
        st.integers(min_value=0, max_value=3),  # which of 4 parallel forward flows
        st.integers(min_value=0, max_value=5_000_000),  # bytes
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    trial=st.integers(min_value=0, max_value=10_000_000),
    cents=st.integers(min_value=0, max_value=20),
    price=st.integers(min_value=1, max_value=10**6),
    topped_up=st.booleans(),
    script=ops,
)
def test_parallel_flows_never_overspend_the_bound_and_lose_nothing(
    trial, cents, price, topped_up, script
):
    nanocents = cents * NANO if topped_up else 0
    rt = runtime(trial, nanocents, price, topped_up)
    cred = rt.by_username["dtuser"]
    acc = cred.account
    floor = -5 * NANO
    start_allowance = acc.allowance
    flows = [[0, 0] for _ in range(4)]  # reserved, moved
    flushed_nc, flushed_trial, moved_total = 0, 0, 0

    def flush():
        nonlocal flushed_nc, flushed_trial
        b = rt.take_batch()
        for nc, tr, _, _ in b.accounts.values():
            flushed_nc += nc
            flushed_trial += tr

    for op, i, n in script:
        if op == "reserve":
            fit = rt.reserve(cred, n)
            assert 0 <= fit <= n
            flows[i][0] += fit
            flows[i][1] += fit
        elif op == "settle":
            reserved, moved = flows[i]
            rt.settle(cred, moved, 0, reserved)
            moved_total += moved
            flows[i] = [0, 0]
        elif op == "tunnel":
            fit = min(n, max(0, acc.allowance - acc.inflight), cred.room())
            if fit:
                rt.settle(cred, 0, fit, 0, requests=0)
                moved_total += fit
        else:
            flush()
        # the invariants, after every step
        assert acc.inflight == sum(f[0] for f in flows) == cred.inflight
        assert acc.trial >= 0
        assert acc.nanocents >= floor or acc.nanocents == nanocents
        assert moved_total + acc.inflight <= start_allowance
    for reserved, moved in flows:
        rt.settle(cred, moved, 0, reserved)
        moved_total += moved
    flush()
    # in memory equals what was written: the ledger's balance plus nothing pending
    assert acc.inflight == 0
    assert (nanocents + flushed_nc, trial + flushed_trial) == (acc.nanocents, acc.trial)
    assert trial - acc.trial == min(moved_total, trial)
    assert nanocents - acc.nanocents == max(0, moved_total - trial) * price
    assert acc.nanocents >= floor


@given(
    trial=st.integers(min_value=0, max_value=10**6),
    cents=st.integers(min_value=0, max_value=100),
    used=st.integers(min_value=0, max_value=10**6),
)
def test_snapshot_keeps_unflushed_usage(trial, cents, used):
    rt = runtime(trial, cents * NANO, 300, True)
    cred = rt.by_username["dtuser"]
    rt.settle(cred, used, 0, 0)
    before = (cred.account.nanocents, cred.account.trial, cred.used)
    # the ledger has not seen the batch yet: a reload must not forget it
    rt.apply_snapshot(
        [(1, "active", 300, None, None, None, trial, cents * NANO, 1)],
        [(7, 1, "dtuser", "hash", None, 0)],
        [],
        version=2,
    )
    assert (cred.account.nanocents, cred.account.trial, cred.used) == before
    assert rt.by_username["dtuser"] is cred  # verified-credential cache survives


def test_admission_codes():
    rt = runtime(0, 0, 300, False)
    cred = rt.by_username["dtuser"]
    try:
        rt.admit(cred)
        raise AssertionError("admitted")
    except DatorusError as e:
        assert e.code == "TRIAL_EXHAUSTED" and e.headers["X-Datorus-Used-Bytes"] == "0"
    rt = runtime(0, 0, 300, True)
    try:
        rt.admit(rt.by_username["dtuser"])
        raise AssertionError("admitted")
    except DatorusError as e:
        assert e.code == "INSUFFICIENT_BALANCE"
        assert e.details == {
            "currentBalanceCents": 0,
            "currentBalanceNanocents": 0,
            "requiredCents": 1,
        }
    rt = runtime(10**6, 0, 300, False, max_bytes=100)
    cred = rt.by_username["dtuser"]
    rt.admit(cred)
    assert rt.reserve(cred, 1000) == 100  # the cap holds for forward flows too
    e = rt.dry_error(cred, 100)
    assert e.code == "INSUFFICIENT_BALANCE" and e.details["cap"] == "credential"
    assert e.headers["X-Datorus-Used-Bytes"] == "100"


def test_with_workers_a_snapshot_keeps_the_trial_credit_held_and_the_ledgers_apart():
    """Workers sharing the hot state: ``trial`` is the trial credit this worker holds
    (the shared state moves it), the ledger's trial goes to ``ledger_trial``; a worker
    that charged from its view of the ledger's trial would spend trial another holds."""
    rt = runtime(trial=5000, nanocents=0, price=300, topped_up=False)
    acc = rt.accounts[1]
    assert (acc.trial, acc.ledger_trial) == (5000, 5000)  # one process: the ledger's
    rt.worker = "w1"  # what a shared hot state's adopt sets
    acc.trial, acc.granted = 1200, 1200  # claimed
    rt.apply_snapshot(
        [
            (1, "active", 300, None, None, None, 3000, 0, 0),
            (2, "active", 300, None, None, None, 9000, 0, 0),
        ],
        [(7, 1, "dtuser", "hash", None, 0)],
        [],
        version=2,
        worker_usage=[("w1", 7, 1, 2000, 2000)],
    )
    assert rt.accounts[1] is acc and (acc.trial, acc.ledger_trial) == (1200, 3000)
    assert acc.flushed == {"w1": 2000} and acc.flushed_trial == {"w1": 2000}
    new = rt.accounts[2]
    assert (new.trial, new.granted, new.ledger_trial) == (0, 0, 9000)  # claims first
    c = rt.settle(rt.by_username["dtuser"], 1000, 500, 0)
    assert (c.trial_bytes, c.paid_bytes) == (1200, 300)  # only the trial held


def test_a_failed_batch_is_kept_whole_with_its_id_and_written_first():
    # issue 16: the ledger writes a batch id once, so a batch whose write failed (it may
    # have committed with only the answer lost) must be written again as it was, never
    # merged with what came since
    rt = runtime(0, 10 * NANO, 300, True)
    cred = rt.by_username["dtuser"]
    rt.settle(cred, 0, 1000, 0)
    failed = rt.take_batch()
    assert failed.id and failed.id != rt.batch.id
    rt.restore_batch(failed)
    rt.settle(cred, 0, 2000, 0)
    assert rt.pending_events == 2 and rt.batch.events == 1
    # a snapshot of the ledger without either batch keeps both pending in memory
    rt.apply_snapshot(
        [(1, "active", 300, None, None, None, 0, 10 * NANO, 1)],
        [(7, 1, "dtuser", "hash", None, 0)],
        [],
        version=2,
    )
    assert cred.account.nanocents == 10 * NANO - 3000 * 300 and cred.used == 3000
    again = rt.take_batch()
    assert again is failed and again.accounts == {1: [-1000 * 300, 0, 1000, 1]}
    assert rt.unwritten is None and rt.pending_events == 1
    nxt = rt.take_batch()
    assert nxt.id != failed.id and nxt.accounts == {1: [-2000 * 300, 0, 2000, 1]}
