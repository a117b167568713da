"""The routing decision (``datorus_core.routing.choose``) and the lease book it reads.

One decision for the proxy and the ``/debug/pick`` preview: leases, API pins, sticky
sessions and the weighted draw, refusals as the envelope's errors; it changes no
state (the caller pins a session), and a preview drawing from a copy of the router's
generator names the egress the next request takes, leaving the router's draws alone.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError

from addons.egress import EgressRouter
from datorus_core import egress as eg
from datorus_core.egress_status import Health
from datorus_core.envelope import DatorusError
from datorus_core.hotstate.local import LocalHotState
from datorus_core.live import Lease, LeaseBook, LiveRouting
from datorus_core.routing import Ask, chances, choose, vouch, vouched
from datorus_core.sessions import SessionTable, UsernameOptionError, parse_username

NOW, WALL = 1000.0, 1_800_000_000.0
DOMAIN = "example.com"

ACTIVE = Health("active")  # checked and passing: the pool may choose it


def pool(*countries: str | None) -> eg.Pool:
    """A pool of source addresses 127.0.0.2, .3, ... (ids 2, 3, ...) with these countries."""
    return eg.Pool(
        [
            eg.Egress(
                i + 2, eg.parse_egress_url(f"direct://127.0.0.{i + 2}"), country=c, health=ACTIVE
            )
            for i, c in enumerate(countries)
        ]
    )


def go(ask: Ask, p: eg.Pool, book: LeaseBook | None = None, rng=None, session=None):
    return choose(ask, p, book or LeaseBook(), NOW, WALL, rng or random.Random(1), session)


def refusal(ask: Ask, p: eg.Pool, book: LeaseBook | None = None, session=None) -> DatorusError:
    with pytest.raises(DatorusError) as x:
        go(ask, p, book, session=session)
    return x.value


# -- the pool ------------------------------------------------------------------------------


def test_no_pool_is_the_default_route():
    assert go(Ask(1, DOMAIN), eg.Pool()) is None


def test_a_draw_respects_country_and_leases():
    p = pool("us", "de", "us")
    assert {go(Ask(1, DOMAIN), p, rng=random.Random(s)).egress.id for s in range(40)} == {2, 3, 4}
    assert all(
        go(Ask(1, DOMAIN, country="us"), p, rng=random.Random(s)).egress.country == "us"
        for s in range(40)
    )
    book = LeaseBook([Lease("ls1", 9, 2, int(WALL) + 60)])
    assert all(
        go(Ask(1, DOMAIN, country="us"), p, book, rng=random.Random(s)).egress.id == 4
        for s in range(40)
    )


def test_nothing_left_is_upstream_failed_with_the_reason():
    err = refusal(Ask(1, DOMAIN, country="fr"), pool("us"))
    assert (err.code, err.details) == (
        "UPSTREAM_FAILED",
        {"reason": "no_egress_for_country", "country": "fr"},
    )
    p = pool("us", "de")
    for e in p.by_id.values():
        for _ in range(3):
            e.blocked(DOMAIN, NOW, 30.0)
    err = refusal(Ask(1, DOMAIN), p)
    assert err.details["reason"] == "no_healthy_egress"
    assert err.details["retryAfterSeconds"] == 120  # the third strike: 4 x 30 s


# -- leases and API pins -------------------------------------------------------------------


def test_a_lease_routes_its_holder_and_refuses_everyone_else():
    p = pool("us", "de")
    book = LeaseBook([Lease("ls1", 7, 3, int(WALL) + 60), Lease("ls2", 7, 2, int(WALL) - 1)])
    chosen = go(Ask(7, DOMAIN, family=4, lease_id="ls1"), p, book)
    assert chosen.egress.id == 3 and chosen.source == "127.0.0.3" and not chosen.pin_session
    for ask in (
        Ask(8, DOMAIN, lease_id="ls1"),  # someone else's
        Ask(7, DOMAIN, lease_id="ls2"),  # lapsed
        Ask(7, DOMAIN, lease_id="nope"),
    ):
        err = refusal(ask, p, book)
        assert err.code == "RESOURCE_NOT_FOUND" and err.details == {"lease": ask.lease_id}
    p.by_id[3].failed(NOW)
    err = refusal(Ask(7, DOMAIN, lease_id="ls1"), p, book)
    assert err.details == {"reason": "leased_egress_unavailable", "lease": "ls1"}
    err = refusal(Ask(7, DOMAIN, family=6, lease_id="ls1"), pool("us", "de"), book)
    assert err.details["reason"] == "leased_egress_unavailable"  # an IPv4 source, IPv6 target


def test_an_api_pin_leaves_by_that_egress_unless_someone_else_leased_it():
    p = pool("us", "de")
    book = LeaseBook([Lease("ls1", 7, 3, int(WALL) + 60)])
    assert go(Ask(1, DOMAIN, family=4, pin=2), p, book).egress.id == 2
    assert go(Ask(7, DOMAIN, family=4, pin=3), p, book).egress.id == 3  # the holder's own
    for ask in (Ask(1, DOMAIN, family=4, pin=3), Ask(1, DOMAIN, family=4, pin=99)):
        err = refusal(ask, p, book)
        assert err.details == {"reason": "egress_unavailable", "egress": ask.pin}


def test_a_pin_is_only_what_the_secret_vouched_for():
    assert vouched(vouch("12", "k"), "k") == "12"
    assert vouched("x:12", "k") is None and vouched(None, "k") is None and vouched("", "k") is None


# -- sessions ------------------------------------------------------------------------------


def test_a_session_keeps_its_egress_while_usable_and_moves_otherwise():
    p = pool("us", "de")
    table = SessionTable(60, 100)
    table.put(1, "s", 3, NOW)
    chosen = go(Ask(1, DOMAIN, session_id="s"), p, session=table.get)
    assert chosen.egress.id == 3 and chosen.pinned and not chosen.pin_session
    # another country, a lease on it, a block: the session moves (and the caller re-pins)
    book = LeaseBook([Lease("ls1", 9, 3, int(WALL) + 60)])
    for ask, b in (
        (Ask(1, DOMAIN, session_id="s", country="us"), None),
        (Ask(1, DOMAIN, session_id="s"), book),
    ):
        moved = go(ask, p, b, session=table.get)
        assert moved.egress.id == 2 and moved.pin_session and not moved.pinned
    for _ in range(3):
        p.by_id[3].blocked(DOMAIN, NOW, 30.0)
    moved = go(Ask(1, DOMAIN, session_id="s"), p, session=table.get)
    assert moved.egress.id == 2 and moved.pin_session


def test_choose_changes_no_session_and_a_peek_keeps_none_alive():
    p = pool("us", "de")
    table = SessionTable(60, 100)
    chosen = go(Ask(1, DOMAIN, session_id="new"), p, session=table.peek)
    assert chosen.pin_session and len(table) == 0  # pinning is the caller's
    table.put(1, "s", 3, NOW - 50)
    assert go(Ask(1, DOMAIN, session_id="s"), p, session=table.peek).pinned
    assert table.table[(1, "s")] == (3, NOW - 50)  # not touched: it still lapses at NOW + 10
    assert go(Ask(1, DOMAIN, session_id="s"), p).pin_session is False  # sessions not kept


def test_a_prefix_source_follows_the_session():
    p = eg.Pool([eg.Egress(2, eg.parse_egress_url("direct://2001:db8::/64"), health=ACTIVE)])
    a = go(Ask(1, DOMAIN, family=6, session_id="s"), p, rng=random.Random(1))
    b = go(Ask(1, DOMAIN, family=6, session_id="s"), p, rng=random.Random(2))
    assert a.source == b.source == eg.source_for(p.by_id[2].spec, "1/s")


# -- the preview ---------------------------------------------------------------------------


def _router(seed: int) -> EgressRouter:
    settings = {"router_seed": seed, "session_ttl": 60, "max_sessions": 10}
    gw = type("Gw", (), {"settings": settings, "hot": LocalHotState(settings)})
    r = EgressRouter(gw)  # type: ignore[arg-type]
    r.configure({"datorus_router_seed"})
    r.pool.replace(
        [
            eg.Egress(i, eg.parse_egress_url(f"direct://127.0.0.{i}"), health=ACTIVE)
            for i in range(2, 9)
        ]
    )
    return r


def test_a_preview_names_the_next_draw_and_leaves_the_routers_sequence_alone():
    r, twin = _router(5), _router(5)
    live: LiveRouting = r
    for _ in range(30):
        ask = Ask(1, DOMAIN)
        seen = choose(ask, live.pool, live.leases, NOW, WALL, live.preview_rng(), live.peek_session)
        again = choose(ask, live.pool, live.leases, NOW, WALL, live.preview_rng())
        real = choose(ask, r.pool, r.leases, NOW, WALL, r.rng, r.gw.hot.sessions.get)
        assert seen.egress is again.egress is real.egress
        assert real.egress.id == choose(ask, twin.pool, twin.leases, NOW, WALL, twin.rng).egress.id


def test_chances_share_the_weights_and_skip_limited_and_leased():
    p = pool("us", "us", "us")
    p.by_id[2].weight, p.by_id[3].weight = 3, 1
    p.reweigh()
    odds = chances(p, DOMAIN, "us", NOW, None, frozenset({4}))
    assert odds == {2: 0.75, 3: 0.25, 4: 0.0}
    p.by_id[2].blocked(DOMAIN, NOW, 30.0)  # limited: avoided while another is fine
    assert chances(p, DOMAIN, None, NOW, None, frozenset()) == {2: 0.0, 3: 0.5, 4: 0.5}


# -- the lease book ------------------------------------------------------------------------


def test_the_lease_book_by_id_by_egress_and_over_time():
    book = LeaseBook([Lease.from_row(("ls1", 7, 3, 100)), Lease.from_row(("ls2", 8, 4, 200))])
    assert book.get("ls1") == Lease("ls1", 7, 3, 100) and book.holder(4) == book.get("ls2")
    assert book.leased_now(50) == {3, 4} and book.leased_now(150) == {4}
    assert book.leased_now(250) == frozenset()
    book.add(Lease("ls3", 7, 5, 300))
    assert book.leased_now(250) == {5} and [x.id for x in book.of_account(7)] == ["ls1", "ls3"]
    book.end("ls3")
    assert book.leased_now(250) == frozenset() and book.holder(5) is None and len(book) == 2
    book.end("unknown")
    book.replace([])
    assert len(book) == 0 and book.leased_now(0) == frozenset()


# -- the country code: one rule ------------------------------------------------------------


class _Body(BaseModel):
    country: str | None = Field(default=None, pattern=eg.COUNTRY_PATTERN)


@given(st.text(max_size=4))
def test_every_country_check_agrees(value):
    ok = eg.valid_country(value)
    try:
        _Body(country=value)
        assert ok
    except ValidationError:
        assert not ok
    if "-" not in value and value:
        try:
            parse_username(f"user-country-{value}")
            assert ok
        except UsernameOptionError:
            assert not ok
    assert ok == (len(value) == 2 and value.isascii() and value.isalpha())


@pytest.mark.parametrize("value", ["us", "DE", "us\n", "u", "usa", "u1", "éa", ""])
def test_country_examples(value):
    assert eg.valid_country(value) == (value in ("us", "DE"))
