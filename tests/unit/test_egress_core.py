"""The pure egress core: URL kinds, username options, sessions, health and the pick."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datorus_core import egress as eg
from datorus_core.egress_status import Health
from datorus_core.sessions import (
    SessionTable,
    UsernameOptionError,
    parse_username,
    username_problem,
    valid_lease_id,
    valid_session_id,
)

SESSION_IDS = st.from_regex(r"\A[A-Za-z0-9_-]{1,128}\Z")

ACTIVE = Health("active")  # checked and passing: the pool may choose it


@pytest.mark.parametrize(
    ("url", "kind", "source", "prefix"),
    [
        ("direct://", "direct", None, None),
        ("direct://127.0.0.2", "direct", "127.0.0.2", None),
        ("direct://[2001:db8::5]", "direct", "2001:db8::5", None),
        ("direct://2001:db8::/64", "direct", None, "2001:db8::/64"),
        ("direct://10.0.0.7/32", "direct", "10.0.0.7", None),
        ("http://u:p%3Aq@127.0.0.1:3128", "http", None, None),
        ("socks5://proxy.example:1080", "socks5", None, None),
    ],
)
def test_parse_egress_url(url, kind, source, prefix):
    spec = eg.parse_egress_url(url)
    assert spec.kind == kind
    assert spec.source == source
    assert (str(spec.prefix) if spec.prefix else None) == prefix


def test_proxy_credentials_are_decoded_and_hidden():
    spec = eg.parse_egress_url("http://u:p%3Aq@127.0.0.1:3128")
    assert (spec.username, spec.password, spec.host, spec.port) == ("u", "p:q", "127.0.0.1", 3128)
    assert "p%3Aq" not in spec.public_url() and ":***@" in spec.public_url()


@pytest.mark.parametrize(
    "url", ["ftp://x:1", "http://host", "http://h:99999", "direct://nope", "http://h:1/path", ""]
)
def test_bad_egress_urls(url):
    with pytest.raises(ValueError):
        eg.parse_egress_url(url)


def test_prefix_gives_stable_address_per_key():
    spec = eg.parse_egress_url("direct://2001:db8::/64")
    a = eg.source_for(spec, "1/abc")
    assert a == eg.source_for(spec, "1/abc")
    assert a != eg.source_for(spec, "2/abc")
    assert ipaddress.ip_address(a) in spec.prefix


@given(SESSION_IDS, st.sampled_from([None, "us", "DE"]))
def test_every_valid_session_id_reads_back_from_the_username(sid, country):
    raw = "dtabc123" + (f"-country-{country}" if country else "") + f"-session-{sid}"
    opts = parse_username(raw)
    assert opts is not None
    assert (opts.username, opts.session_id) == ("dtabc123", sid)
    assert opts.country == (country.lower() if country else None)


@pytest.mark.parametrize(
    "raw", ["dt1-session-", "dt1-country-usa", "dt1-foo-bar", "-session-x", "dt1-country-"]
)
def test_malformed_username_options(raw):
    with pytest.raises(ValueError):
        parse_username(raw)


LEASE = "ls" + "0123456789abcdef01234567"


@given(SESSION_IDS)
def test_lease_rides_in_the_username_beside_country_and_session(sid):
    opts = parse_username(f"dtabc123-country-de-lease-{LEASE}-session-{sid}")
    assert (opts.username, opts.country, opts.lease_id, opts.session_id) == (
        "dtabc123",
        "de",
        LEASE,
        sid,
    )
    assert parse_username(f"dtabc123-lease-{LEASE}").lease_id == LEASE


@pytest.mark.parametrize(
    "raw",
    ["dt1-lease-", "dt1-lease-LS0123", f"dt1-lease-{LEASE}x", f"dt1-lease-{LEASE}-", "dt1-lease-x"],
)
def test_malformed_lease_options(raw):
    with pytest.raises(ValueError):
        parse_username(raw)


def test_plain_username_has_no_options():
    assert parse_username("dtabc123") is None


def test_session_id_syntax():
    assert valid_session_id("a") and valid_session_id("A-z_9" * 25)
    assert not valid_session_id("") and not valid_session_id("x" * 129)
    assert not valid_session_id("a b") and not valid_session_id("é")


@pytest.mark.parametrize("tail", ["\n", "\r\n", "\r", " ", "\t", "\x00", "\x0b"])
def test_ids_and_countries_are_matched_whole(tail):
    """``$`` matches before a final newline: every check must take the whole value."""
    assert not valid_session_id("abc" + tail)
    assert not valid_lease_id(LEASE + tail)
    assert not eg.valid_country("us" + tail)
    for raw in (f"dt1-session-abc{tail}", f"dt1-country-us{tail}", f"dt1-lease-{LEASE}{tail}"):
        with pytest.raises(UsernameOptionError):
            parse_username(raw)


@pytest.mark.parametrize(
    ("raw", "option"),
    [
        ("dt1-country-usa", "-country-usa"),
        ("dt1-country-usa-session-x", "-country-usa"),
        ("dt1-foo-bar", "-foo"),
        ("dt1-session-", "-session-"),
        ("dt1-session-a.b", "-session-a.b"),
        ("dt1-lease-ls12-session-x", "-lease-ls12"),
        ("dt1-", "-"),
        ("dt1-country-us-", "-"),
        ("dt1-country-us-country-de", "-country"),
    ],
)
def test_a_bad_option_is_named(raw, option):
    with pytest.raises(UsernameOptionError) as e:
        parse_username(raw)
    assert e.value.option == option
    assert username_problem(raw) == {"reason": "bad_option", "option": option}


@pytest.mark.parametrize("raw", ["dt1\n", "dt1-session-abc\n", "dt 1", "dt1\x00", "\u2028dt1"])
def test_control_characters_and_spaces_make_a_username_malformed(raw):
    assert username_problem(raw) == {"reason": "malformed"}


@given(SESSION_IDS, st.sampled_from(["", "-country-us", f"-lease-{LEASE}"]))
def test_a_well_formed_username_has_no_problem(sid, opts):
    assert username_problem("dtabc123") is None
    assert username_problem(f"dtabc123{opts}-session-{sid}") is None


def test_session_table_ttl_and_lru_eviction():
    t = SessionTable(ttl=10, max_sessions=3)
    t.put(1, "a", 7, 0)
    t.put(2, "a", 8, 0)  # same id, other account: independent
    assert t.get(1, "a", 5) == 7 and t.get(2, "a", 5) == 8
    assert t.get(1, "a", 14.9) == 7  # idle TTL counts from the last use
    assert t.get(2, "a", 15.1) is None  # expired
    t.put(1, "b", 1, 16)
    t.put(1, "c", 2, 17)
    t.put(1, "d", 3, 18)  # over the bound: the one idle longest (1/a) goes
    assert t.get(1, "a", 18) is None and len(t) == 3
    assert t.sweep(100) == 3 and len(t) == 0


def _pool(n: int = 4) -> eg.Pool:
    return eg.Pool(
        [
            eg.Egress(
                i, eg.parse_egress_url(f"direct://127.0.0.{i + 2}"), country="us", health=ACTIVE
            )
            for i in range(n)
        ]
    )


def test_pick_spreads_and_respects_country():
    pool = _pool()
    rng = random.Random(3)
    picks = {pool.pick("example.com", None, 0, rng).id for _ in range(200)}
    assert picks == {0, 1, 2, 3}
    assert pool.pick("example.com", "US", 0, rng).country == "us"
    with pytest.raises(eg.NoEgress) as e:
        pool.pick("example.com", "fr", 0, rng)
    assert e.value.reason == "no_egress_for_country"


def test_pick_never_takes_an_excluded_egress():
    pool = _pool()
    rng = random.Random(5)
    picks = {pool.pick("example.com", None, 0, rng, exclude={0, 2}).id for _ in range(300)}
    assert picks == {1, 3}
    with pytest.raises(eg.NoEgress) as e:
        pool.pick("example.com", None, 0, rng, exclude={0, 1, 2, 3})
    assert e.value.reason == "no_healthy_egress"


def test_blocks_limit_then_exclude_then_recover():
    pool = _pool(2)
    e0 = pool.by_id[0]
    rng = random.Random(1)
    assert e0.blocked("example.com", 0, base=10) == eg.LIMITED
    # limited: avoided while another egress is fine
    assert {pool.pick("example.com", None, 1, rng).id for _ in range(50)} == {1}
    assert {pool.pick("other.com", None, 1, rng).id for _ in range(50)} == {0, 1}
    e0.blocked("example.com", 1, base=10)
    assert e0.blocked("example.com", 2, base=10) == eg.UNAVAILABLE  # third in a row
    assert e0.domains["example.com"].until == 2 + 40  # doubling back-off
    pool.by_id[1].failed(3)  # the other is down too: nothing left
    with pytest.raises(eg.NoEgress) as e:
        pool.pick("example.com", None, 3, rng)
    assert e.value.reason == "no_healthy_egress"
    assert e0.state_for("example.com", 42) == eg.OK  # recovers by itself
    assert 0 in {pool.pick("example.com", None, 42, rng).id for _ in range(50)}


def test_limited_is_a_fallback_when_nothing_else_is_ok():
    pool = _pool(1)
    pool.by_id[0].blocked("example.com", 0, base=10)
    assert pool.pick("example.com", None, 1).id == 0


def test_down_egress_backs_off_and_comes_back():
    e = _pool(1).by_id[0]
    e.failed(0)
    assert not e.up(1) and e.up(eg.DOWN_BASE_SECONDS)
    e.failed(10)
    assert e.down_until == 10 + 2 * eg.DOWN_BASE_SECONDS
    e.succeeded()
    assert e.up(10)


def test_score_is_in_unit_interval():
    assert eg.compute_score(1.0, None, True) == 1.0
    assert eg.compute_score(1.0, 1000.0, True) == 0.75
    assert eg.compute_score(0.5, 0.0, True) == 0.5
    assert eg.compute_score(1.0, 5.0, False) == 0.0


def test_block_markers_are_case_insensitive():
    assert eg.find_marker(b"<div class='G-RECAPTCHA'>", (b"g-recaptcha",)) == b"g-recaptcha"
    assert eg.find_marker(b"fine", (b"g-recaptcha",)) is None


def test_egress_settings_are_validated():
    from datorus_core.settings import BY_NAME, SettingsError, coerce

    assert (
        coerce(BY_NAME["egress_check_url"], "http://judge.example/ip") == "http://judge.example/ip"
    )
    assert coerce(BY_NAME["egress_check_url"], "") == ""
    with pytest.raises(SettingsError):
        coerce(BY_NAME["egress_check_url"], "ftp://judge.example/")
    with pytest.raises(SettingsError):
        coerce(BY_NAME["block_seconds"], "0")


def test_source_addresses_only_reach_their_own_family():
    pool = eg.Pool(
        [
            eg.Egress(1, eg.parse_egress_url("direct://127.0.0.2"), health=ACTIVE),
            eg.Egress(2, eg.parse_egress_url("direct://[::1]"), health=ACTIVE),
            eg.Egress(3, eg.parse_egress_url("http://proxy.example:3128"), health=ACTIVE),
        ]
    )
    rng = random.Random(2)
    assert {pool.pick("x", None, 0, rng, family=6).id for _ in range(60)} == {2, 3}
    assert {pool.pick("x", None, 0, rng, family=4).id for _ in range(60)} == {1, 3}


def test_domain_health_summary():
    pool = _pool(2)
    pool.by_id[0].blocked("example.com", 0, base=10)
    h = eg.domain_health(pool, "example.com", 1)
    assert (h["available"], h["limited"], h["retryAfterSeconds"]) == (1, 1, None)
    assert h["egress"][0]["state"] == "limited" and h["egress"][0]["recoversInSeconds"] == 9
    pool.by_id[1].failed(1)
    h = eg.domain_health(pool, "example.com", 2)
    assert h["available"] == 0 and h["retryAfterSeconds"] == 4  # egress 1 is back at 6
