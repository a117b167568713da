"""Property tests for what a flow is billed (``datorus_core.billing``).

Every outcome record hypothesis can build is billed by the rules: never for the
gateway's own answers, never more than crossed the wire, a cut flow exactly what it
moved. ``test_the_rules_are_the_hooks_they_replace`` pins the decision to the one the
metering hooks made before it moved to the core.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datorus_core import pricing
from datorus_core.billing import (
    DRY,
    HEAD_BYTES,
    Bill,
    Cut,
    Ending,
    ErrorKind,
    FlowOutcome,
    allowance_covers,
    answers_cut,
    bill,
)

sizes = st.integers(min_value=0, max_value=10**12)
statuses = st.sampled_from([0, 101, 200, 204, 206, 301, 404, 500, 502, 504])

outcomes = st.builds(
    FlowOutcome,
    ending=st.sampled_from(Ending),
    tunnel=st.booleans(),
    status=statuses,
    up=sizes,
    down=sizes,
    answered=st.booleans(),
    cut=st.sampled_from(Cut),
    client_closed=st.booleans(),
    timed_out=st.booleans(),
    error=st.sampled_from(ErrorKind),
)


@given(outcomes)
def test_never_more_than_crossed_the_wire(o: FlowOutcome) -> None:
    b = bill(o)
    assert 0 <= b.up <= o.up and 0 <= b.down <= o.down
    assert all(type(v) is int for v in (b.up, b.down, b.status))


@given(outcomes)
def test_the_gateways_own_answers_are_never_billed(o: FlowOutcome) -> None:
    """No request, no receipt; a tunnel the gateway answered moved nothing of its own
    that the tunnel had not already paid for as it passed."""
    if o.answered:
        b = bill(o)
        assert not b.charged
        if not o.tunnel:
            assert (b.up, b.down) == (0, 0)


@given(outcomes)
def test_a_gateway_failure_is_not_billed(o: FlowOutcome) -> None:
    """A request that failed before the target answered (502, 504: status 0) is not
    billed unless the client walked away after moving bytes, or it ran dry (or out of
    a worker's credit)."""
    failed = (
        o.ending is Ending.FAILED
        and not o.tunnel
        and not o.status
        and (o.timed_out or not o.client_gone)
    )
    if (failed or o.ending is Ending.CONNECT_FAILED) and o.cut not in DRY:
        assert not bill(o).charged


@given(outcomes)
def test_a_cut_flow_is_billed_exactly_what_it_moved(o: FlowOutcome) -> None:
    """Cut because the account ran dry (or a worker's credit ran out with the shared
    state out of reach: the 503), a tunnel closed by a suspension, any flow ended by a
    clean stop: the bytes it moved are its bill, no more, no less."""
    if o.answered:
        return
    b = bill(o)
    if o.cut in DRY:
        assert b == Bill(True, o.up, o.down, o.status or DRY[o.cut])
    if (o.cut is Cut.SUSPENDED and o.tunnel) or o.ending is Ending.STOPPED:
        assert (b.up, b.down) == (o.up, o.down)
    if o.ending is Ending.STOPPED:
        assert b.charged == (o.tunnel or o.moved or o.cut in DRY)


@given(outcomes)
def test_a_client_that_walks_away_pays_for_what_it_moved(o: FlowOutcome) -> None:
    if o.ending is Ending.FAILED and not o.answered and o.client_gone and not o.timed_out:
        assert (bill(o).up, bill(o).down) == (o.up, o.down)


@given(outcomes)
def test_a_finished_exchange_is_billed_in_full(o: FlowOutcome) -> None:
    if o.ending is Ending.COMPLETED and not o.answered:
        assert bill(o) == Bill(True, o.up, o.down, o.status or DRY.get(o.cut, 0))


@given(outcomes)
def test_a_tunnel_pays_for_its_bytes_however_it_ends(o: FlowOutcome) -> None:
    """A tunnel settles as its bytes pass: whatever the end, they are its bill."""
    if o.tunnel:
        b = bill(o)
        assert (b.up, b.down) == (o.up, o.down)


@given(outcomes)
def test_the_receipt_shows_the_status_the_client_got(o: FlowOutcome) -> None:
    b = bill(o)
    if o.status:
        assert b.status == o.status
    else:
        assert b.status == DRY.get(o.cut, 0)


@given(outcomes)
def test_an_uncharged_forward_flow_pays_nothing(o: FlowOutcome) -> None:
    b = bill(o)
    if not b.charged and not o.tunnel:
        assert (b.up, b.down) == (0, 0)


def _old_charge(o: FlowOutcome) -> bool:
    """The decision as the metering hooks wrote it before it moved to the core (a cut
    for want of a worker's credit, newer, is billed as one for running dry)."""
    if o.cut is Cut.CREDIT:
        o = replace(o, cut=Cut.BALANCE)
    if o.ending is Ending.COMPLETED:
        return not o.answered
    if o.ending is Ending.CONNECT_FAILED:
        return False
    if o.ending is Ending.STOPPED:
        return o.tunnel or bool(o.up or o.down)
    if o.ending is Ending.DISCONNECTED:
        return o.tunnel or bool(o.status) or o.cut == "balance"
    client_gone = (
        o.client_closed
        or o.error is ErrorKind.CLIENT_DISCONNECTED
        or (not o.status and o.error is ErrorKind.INCOMPLETE_BODY)
    )
    return (
        o.cut == "balance"
        or (bool(o.status) and not o.answered)
        or (client_gone and not o.timed_out and bool(o.up or o.down))
    )


@given(outcomes)
def test_the_rules_are_the_hooks_they_replace(o: FlowOutcome) -> None:
    """Unchanged for every flow the gateway did not answer itself, but two: a CONNECT
    that failed after running dry (it cannot: nothing is counted before it connects) and
    a flow that ran dry with nothing moved and is still open at a clean stop (the cut
    aborts it on the next loop turn) are billed like every other dry cut, a receipt with
    the 402. A flow the gateway answered is never charged now (``client_disconnected``
    could write a 0-byte receipt for the gateway's own 502 on a tunnel)."""
    b = bill(o)
    if o.answered:
        assert not b.charged
    elif o.cut in DRY and o.ending in (Ending.CONNECT_FAILED, Ending.STOPPED):
        assert b.charged
    else:
        assert b.charged == _old_charge(o)
    if b.charged:
        assert (b.up, b.down) == (o.up, o.down)
        assert b.status == (o.status or DRY.get(o.cut, 0))


@given(st.booleans(), st.booleans())
def test_only_a_forward_request_whose_head_is_not_sent_is_answered_when_cut(tunnel, sent):
    assert answers_cut(tunnel, sent) == (not tunnel and not sent)


def _holder(allowance: int, inflight: int, room: int) -> SimpleNamespace:
    acc = SimpleNamespace(allowance=allowance, inflight=inflight)
    return SimpleNamespace(cred=SimpleNamespace(account=acc, room=lambda: room))


@given(sizes, sizes, sizes, st.integers(0, 10**6))
def test_a_body_is_held_whole_only_when_it_and_its_head_are_covered(
    allowance, inflight, room, body
) -> None:
    covered = allowance_covers(_holder(allowance, inflight, room), body)
    need = body + HEAD_BYTES
    assert covered == (need < allowance - inflight and need < room)
    assert not allowance_covers(SimpleNamespace(cred=None), body)


@given(
    st.integers(min_value=-(10**15), max_value=10**15),
    st.lists(st.integers(min_value=-(10**12), max_value=10**12), max_size=30),
)
def test_whole_cent_steps_add_up_to_what_the_balance_moved(balance, amounts) -> None:
    steps = pricing.whole_cent_steps(balance, amounts)
    assert len(steps) == len(amounts)
    start = balance - sum(amounts)
    assert sum(steps) == pricing.whole_cents(balance) - pricing.whole_cents(start)
    for step, amount in zip(steps, amounts, strict=True):
        # rounding never moves a step by a whole cent or more beyond its exact amount
        assert abs(step * pricing.NANOCENTS_PER_CENT - amount) < pricing.NANOCENTS_PER_CENT
        if amount % pricing.NANOCENTS_PER_CENT == 0:
            assert step * pricing.NANOCENTS_PER_CENT == amount


# -- the one translation from mitmproxy's view (addons/metering.py) ----------------------


@pytest.mark.parametrize(
    ("msg", "kind"),
    [
        ("Client disconnected.", ErrorKind.CLIENT_DISCONNECTED),
        (
            "peer closed connection without sending complete message body"
            " (received 10 bytes, expected 100)",
            ErrorKind.INCOMPLETE_BODY,
        ),
        ("Connection refused", ErrorKind.OTHER),
        (None, ErrorKind.NONE),
    ],
)
def test_flow_outcome_reads_mitmproxys_error_wording_once(msg, kind) -> None:
    from mitmproxy import flow as mflow
    from mitmproxy.test import tflow

    from addons.context import TUNNEL, FlowCtx
    from addons.metering import flow_outcome

    f = tflow.tflow(err=msg is not None)
    if msg is not None:
        f.error = mflow.Error(msg)
    f.client_conn.timestamp_end = None
    fc = FlowCtx("r1", f.client_conn.id, "GET", "example.com", 80)
    fc.up, fc.down, fc.status, fc.cut, fc.timed_out = 10, 20, 200, "balance", True
    o = flow_outcome(fc, Ending.FAILED, f)
    assert o == FlowOutcome(
        Ending.FAILED,
        tunnel=False,
        status=200,
        up=10,
        down=20,
        cut=Cut.BALANCE,
        timed_out=True,
        error=kind,
    )
    f.client_conn.timestamp_end = 1.0
    assert flow_outcome(fc, Ending.FAILED, f).client_closed
    fc.kind = TUNNEL
    gone = flow_outcome(fc, Ending.DISCONNECTED)
    assert gone.tunnel and gone.client_closed and gone.error is ErrorKind.NONE
