"""The web console's signed session cookie and form tokens (datorus_core.api.console_session)."""

from __future__ import annotations

import pytest

from datorus_core.api import console_session as cs

SECRET = b"s" * 32


def test_a_session_reads_back_only_under_its_own_secret_and_unaltered() -> None:
    s = cs.new_session("operator", now=100, key_id=3)
    cookie = cs.sign(SECRET, s)
    assert cs.read(SECRET, cookie, now=101) == s
    assert cs.read(b"t" * 32, cookie, now=101) is None
    payload, mac = cookie.split(".")
    forged = cs.sign(b"t" * 32, {**s, "kind": "operator", "key": 1}).split(".")[0]
    assert cs.read(SECRET, f"{forged}.{mac}", now=101) is None
    for junk in ("", ".", "a.b.c", "x" * 5000, payload, f"{payload}.", "é.é"):
        assert cs.read(SECRET, junk, now=101) is None


def test_sessions_expire_and_a_visitors_sooner() -> None:
    signed_in = cs.new_session("customer", now=0, account_id=1)
    visitor = cs.new_session("anon", now=0)
    assert cs.read(SECRET, cs.sign(SECRET, visitor), now=cs.ANON_SECONDS) is None
    assert cs.read(SECRET, cs.sign(SECRET, signed_in), now=cs.ANON_SECONDS) is not None
    assert cs.read(SECRET, cs.sign(SECRET, signed_in), now=cs.SESSION_SECONDS) is None


def test_every_new_session_has_its_own_form_token() -> None:
    a, b = cs.new_session("anon", now=0), cs.new_session("anon", now=0)
    assert a["csrf"] != b["csrf"] and len(a["csrf"]) >= 32
    assert cs.form_token_ok(a, a["csrf"]) and not cs.form_token_ok(a, b["csrf"])
    assert not cs.form_token_ok(a, "") and not cs.form_token_ok(None, a["csrf"])


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        cs.new_session("admin", now=0)
    cookie = cs.sign(SECRET, {**cs.new_session("anon", now=0), "kind": "admin"})
    assert cs.read(SECRET, cookie, now=1) is None
