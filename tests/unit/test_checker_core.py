"""Checkers (issue 17): anonymity grading, the status an egress's checks leave it in,
the ``datorus.checkers`` registry, the staged pipeline, the judge's token and answer.

Pure core, no network: the registry loads real entry points (Datorus's own and the
small plugins of ``support/checker_plugins.py``).
"""

from __future__ import annotations

import asyncio
import json
from importlib.metadata import EntryPoint, version

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datorus_core import egress as eg
from datorus_core.checkers.anonymity import SENT, addresses_in, grade, read_judge
from datorus_core.checkers.base import CheckContext, CheckOutcome
from datorus_core.checkers.geo import country_of
from datorus_core.checkers.pipeline import run_check
from datorus_core.checkers.registry import GROUP, discover_checkers, installed_checkers
from datorus_core.egress_status import (
    ACTIVE,
    DEAD,
    UNCHECKED,
    Health,
    after_check,
    change,
)
from datorus_core.judge import check_token, default_judge_url, judge_answer, valid_check_token

OURS = {"198.51.100.7"}
EXIT = "203.0.113.50"

# -- grading --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "level"),
    [
        ({"Host": "judge", "User-Agent": "datorus-check"}, "elite"),
        ({"Host": "judge", "Via": "1.1 squid"}, "anonymous"),
        ({"X-Forwarded-For": EXIT}, "anonymous"),  # names only the exit: not us
        ({"X-Forwarded-For": "10.1.2.3"}, "anonymous"),  # someone else (a chain), not us
        ({"X-Forwarded-For": "198.51.100.7"}, "transparent"),
        ({"Forwarded": 'for="198.51.100.7:4711";proto=http'}, "transparent"),
        ({"X-Originating-Ip": "[198.51.100.7]"}, "transparent"),
        ({"X-Something": "client 198.51.100.7"}, "transparent"),  # any header the proxy added
        ({"X-Forwarded-Proto": "http"}, "anonymous"),
        ({"Host": "198.51.100.7:8002"}, "elite"),  # what we sent ourselves never counts
    ],
)
def test_grades(headers, level):
    assert grade(headers, OURS, SENT, EXIT) == level


def test_without_our_address_another_address_in_a_proxy_header_is_transparent():
    assert grade({"X-Forwarded-For": "10.1.2.3"}, (), SENT, EXIT) == "transparent"
    assert grade({"X-Forwarded-For": EXIT}, (), SENT, EXIT) == "anonymous"
    assert grade({"Via": "1.1 x"}, (), SENT, EXIT) == "anonymous"


_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True)
_values = st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=40)


@given(st.dictionaries(_names, _values, max_size=8))
def test_only_added_headers_grade_and_our_address_always_makes_it_transparent(headers):
    sent_only = {k: v for k, v in headers.items() if k.lower() in SENT}
    assert grade(sent_only, OURS, SENT, EXIT) == "elite"
    level = grade(headers, OURS, SENT, EXIT)
    assert level in ("transparent", "anonymous", "elite")
    leaked = {**headers, "X-Leak": "for 198.51.100.7"}
    assert grade(leaked, OURS, SENT, EXIT) == "transparent"
    if level == "elite":
        assert grade({**headers, "Via": "1.1 p"}, OURS, SENT, EXIT) in ("anonymous", "transparent")


@given(st.ip_addresses())
def test_an_address_is_found_however_it_is_written(ip):
    ip = str(ip)
    for written in (ip, f"[{ip}]:80" if ":" in ip else f"{ip}:80", f'"{ip}"', f"a, {ip}; b"):
        assert ip in addresses_in(written)


def test_read_judge():
    body = json.dumps({"ip": "2001:db8::1", "headers": {"Via": ["a", "b"]}}).encode()
    assert read_judge(body).headers == {"via": "a, b"}
    assert read_judge(body).ip == "2001:db8::1"
    assert read_judge(b"<html>captive portal</html>").ip is None
    assert read_judge(b"[1, 2]").ip is None
    assert read_judge(b'{"ip": "not an address"}').ip is None


def test_country_from_the_offline_table():
    assert country_of("8.8.8.8") == "US"
    assert country_of("2001:4860:4860::8888") == "US"
    assert country_of("127.0.0.6") is None and country_of("192.0.2.1") is None
    assert country_of(None) is None and country_of("x") is None


# -- status ---------------------------------------------------------------------------------


def _trailing_failures(results: list[bool]) -> int:
    n = 0
    for ok in reversed(results):
        if ok:
            break
        n += 1
    return n


@given(st.lists(st.booleans(), max_size=40), st.integers(1, 6))
def test_status_follows_the_checks(results, dead_after):
    h = Health()
    for ok in results:
        h = after_check(h, ok, dead_after)
    trailing = _trailing_failures(results)
    assert h.streak == trailing
    if trailing >= dead_after:
        assert h.status == DEAD
    elif any(results):
        assert h.status == ACTIVE
    else:
        assert h.status == UNCHECKED


def test_one_failure_is_not_death_and_a_pass_recovers():
    h = after_check(Health(ACTIVE), False, 3)
    assert h == Health(ACTIVE, 1)
    dead = after_check(after_check(h, False, 3), False, 3)
    assert dead == Health(DEAD, 3)
    assert change(h, dead) == "proxy.dead"
    back = after_check(dead, True, 3)
    assert back == Health(ACTIVE, 0) and change(dead, back) == "proxy.recovered"
    assert change(Health(), back) == "proxy.activated"
    with pytest.raises(ValueError):
        Health("alive")
    with pytest.raises(ValueError):
        after_check(h, True, 0)


def test_only_active_egress_carry_traffic():
    spec = eg.parse_egress_url
    pool = eg.Pool(
        [
            eg.Egress(1, spec("http://127.0.0.1:1"), country="de"),
            eg.Egress(2, spec("http://127.0.0.1:2"), country="de", health=Health(DEAD, 3)),
        ]
    )
    with pytest.raises(eg.NoEgress) as e:
        pool.pick("example.com", None, 0.0)
    assert e.value.reason == "no_healthy_egress"
    with pytest.raises(eg.NoEgress) as e:
        pool.pick("example.com", "fr", 0.0)
    assert e.value.reason == "no_egress_for_country"
    assert pool.candidates(None) == []
    unchecked = pool.by_id[1]
    assert unchecked.status == UNCHECKED and not unchecked.up(0.0)
    assert unchecked.record_check(True, 40.0, 0.0).status == UNCHECKED  # the one before
    pool.reweigh()
    assert pool.pick("example.com", "de", 0.0).id == 1
    health = eg.domain_health(pool, "example.com", 0.0)
    assert [r["state"] for r in health["egress"]] == ["ok", "dead"]
    assert health["egress"][1]["recoversInSeconds"] is None


def test_the_score_keeps_its_meaning():
    e = eg.Egress(1, eg.parse_egress_url("http://127.0.0.1:1"))
    e.record_check(True, 1000.0, 0.0)
    assert e.score == eg.compute_score(1.0, 1000.0, True) == 0.75
    e.record_check(False, None, 1.0, dead_after=2)
    assert e.score == 0.0 and e.status == ACTIVE and not e.up(1.0)  # backed off, not dead
    assert e.up(1.0 + eg.DOWN_BASE_SECONDS)
    e.record_check(False, None, 2.0, dead_after=2)
    assert e.status == DEAD and e.uptime == pytest.approx(1 / 3)


def test_socks4_is_a_kind_for_ipv4_targets():
    s = eg.parse_egress_url("SOCKS4://alice@127.0.0.1:1080")
    assert (s.kind, s.username, s.password, s.is_proxy) == ("socks4", "alice", None, True)
    assert s.url == s.public_url() == "socks4://alice@127.0.0.1:1080"
    assert eg.parse_egress_url("socks4://alice:ignored@127.0.0.1:1080") == s
    assert s.customer_url() == "socks4://127.0.0.1:1080"
    assert eg.Egress(1, s).family == 4
    assert eg.parse_egress_url("socks4://127.0.0.1:1080").username is None


# -- the registry and the pipeline ----------------------------------------------------------


def _ep(name: str) -> EntryPoint:
    cls = "".join(part.capitalize() for part in name.split("_"))
    return EntryPoint(name, f"support.checker_plugins:{cls}", GROUP)


def test_installed_checkers_come_from_entry_points():
    reg = installed_checkers()
    assert reg.names()[:2] == ["tcp_connect", "http_anonymity"] and reg.failures == ()
    info = reg.get("http_anonymity").info()
    assert info == {
        "name": "http_anonymity",
        "type": "HttpAnonymity",
        "stage": 2,
        "priority": 0,
        "package": "datorus",
        "version": version("datorus"),
        "module": "datorus_core.checkers.judge_check",
        "loaded": True,
    }


def test_broken_plugins_are_listed_not_loaded():
    eps = [_ep(n) for n in ("not_async", "bad_stage", "str_stage", "passes")]
    eps += [
        EntryPoint("Bad Name", "support.checker_plugins:Passes", GROUP),
        EntryPoint("missing", "support.no_such_module:X", GROUP),
        EntryPoint("renamed", "support.checker_plugins:Passes", GROUP),
    ]
    reg = discover_checkers(eps)
    assert reg.names() == ["passes"]
    why = {f.name: f.error for f in reg.failures}
    assert "coroutine" in why["not_async"]
    assert "stage must be" in why["bad_stage"] and "not an int" in why["str_stage"]
    assert "name must be" in why["Bad Name"] and "ModuleNotFoundError" in why["missing"]
    assert "differs" in why["renamed"]


def _run(names: list[str], timeout: float = 5.0):
    reg = discover_checkers([_ep(n) for n in names])
    spec = eg.parse_egress_url("http://127.0.0.1:9")
    return asyncio.run(run_check(spec, reg, CheckContext(None, timeout)))


def test_stages_run_in_order_and_a_failure_ends_the_check():
    r = _run(["stage2", "stage2_early", "passes", "sees_earlier"])
    assert [x.name for x in r.ran] == ["passes", "stage2_early", "stage2", "sees_earlier"]
    assert r.passed and r.stage == 3
    assert r.ran[-1].outcome.detail == "saw 3"
    assert (r.latency_ms, r.exit_ip, r.country) == (12.0, "192.0.2.7", "FR")
    r = _run(["stage2", "passes", "fails_stage1"])
    assert [x.name for x in r.ran] == ["passes", "fails_stage1"]
    assert not r.passed and r.detail == "fails_stage1: refused"


def test_a_skipped_checker_counts_neither_way():
    r = _run(["passes", "skips"])
    assert r.passed and r.stage == 1
    assert not _run(["skips"]).passed  # nothing applied: not a pass


def test_a_broken_checker_fails_the_check_and_ends_it():
    r = _run(["passes", "raises", "stage2"])
    assert not r.passed  # what a stage could not verify never passes
    assert [x.name for x in r.ran] == ["passes", "raises"]  # a failure ends the check
    assert r.ran[-1].error == "RuntimeError: plugin bug"
    assert r.detail == "raises: checker error: RuntimeError: plugin bug"
    r = _run(["passes", "answers_nothing"])
    assert not r.passed and "no CheckOutcome" in (r.ran[-1].error or "")


def test_a_hung_checker_is_stopped_and_failed():
    r = _run(["hangs", "stage2"], timeout=0.05)
    assert not r.passed and [x.name for x in r.ran] == ["hangs"]
    assert "no answer within" in r.detail


def test_an_outcome_grade_is_one_of_three():
    with pytest.raises(ValueError):
        CheckOutcome(True, anonymity="very")


# -- the judge ------------------------------------------------------------------------------


@given(st.floats(0, 4e9), st.text(min_size=1, max_size=20))
def test_check_tokens_hold_two_windows_and_need_the_secret(now, secret):
    token = check_token(secret, now)
    assert valid_check_token(secret, token, now)
    assert valid_check_token(secret, token, now + 600)
    assert not valid_check_token(secret, token, now + 1200)
    assert not valid_check_token(secret + "x", token, now)
    assert not valid_check_token(secret, token + "0", now)


def test_judge_answer_redacts_credentials():
    out = judge_answer(
        "127.0.0.6",
        50000,
        [("Authorization", "Bearer pp_x"), ("Cookie", "a=1"), ("X-Forwarded-For", "1.2.3.4")],
    )
    assert out["headers"] == {
        "authorization": "(redacted)",
        "cookie": "(redacted)",
        "x-forwarded-for": "1.2.3.4",
    }
    assert (out["ip"], out["port"], out["judge"]) == ("127.0.0.6", 50000, "datorus")


def test_the_default_judge_is_our_own():
    s = {"egress_check_url": "", "api_port": 8002, "api_host": "0.0.0.0"}
    assert default_judge_url(s) == "http://127.0.0.1:8002/judge"
    s["public_url"] = "https://gw.example/"
    assert default_judge_url(s, "1.ab") == "https://gw.example/judge?check=1.ab"
    assert default_judge_url({"egress_check_url": "", "api_port": 0}) is None
    assert default_judge_url({**s, "egress_check_url": "http://j.example/ip"}, "t") == (
        "http://j.example/ip"
    )


def test_a_check_token_with_a_non_ascii_mac_is_refused_not_an_error():
    # compare_digest raises TypeError on non-ASCII text: /judge answered 500 for it
    now = 1_800_000_000.0
    head = check_token("s", now).split(".")[0]
    assert not valid_check_token("s", f"{head}.é", now)


def test_what_cannot_be_said_to_a_proxy_fails_the_handshake_not_the_caller():
    import asyncio

    from datorus_core.egress import parse_egress_url
    from datorus_core.egress_io import HandshakeError, handshake

    class Sink:
        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            pass

    async def attempt(url: str, host: str) -> HandshakeError:
        reader = asyncio.StreamReader()
        reader.feed_data(b"\x05\x02\x01\x00")  # method user/pass, then "accepted"
        with pytest.raises(HandshakeError) as e:
            await handshake(parse_egress_url(url), host, 80, reader, Sink())  # type: ignore[arg-type]
        return e.value

    # a SOCKS5 user name of 256 bytes: the proxy's fault (taken out of the pool)
    long_user = asyncio.run(attempt(f"socks5://{'u' * 256}:p@127.0.0.1:1080", "example.com"))
    assert long_user.target is False
    # a target name IDNA cannot encode: the target's fault, the proxy stays
    bad_name = asyncio.run(attempt("socks4://127.0.0.1:1080", "a" * 64 + ".example"))
    assert bad_name.target is True
