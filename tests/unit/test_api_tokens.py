"""The pure parts of the REST API: signed tokens, API key format, pagination cursors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datorus_core.api import keys, tokens
from datorus_core.api.store import decode_cursor, encode_cursor
from datorus_core.envelope import DatorusError

SECRET = b"s" * 32


@given(
    purpose=st.sampled_from(["verify", "reset"]),
    token_id=st.integers(min_value=0, max_value=2**62),
    expires=st.integers(min_value=0, max_value=2**40),
)
def test_token_round_trips(purpose: str, token_id: int, expires: int) -> None:
    assert tokens.parse(SECRET, tokens.sign(SECRET, purpose, token_id, expires)) == (
        purpose,
        token_id,
        expires,
    )


@given(text=st.text(max_size=200))
def test_arbitrary_text_is_token_invalid(text: str) -> None:
    with pytest.raises(DatorusError) as e:
        tokens.parse(SECRET, text)
    assert e.value.code == "TOKEN_INVALID"


@given(flip=st.integers(min_value=0, max_value=200))
def test_any_changed_character_is_token_invalid(flip: int) -> None:
    token = tokens.sign(SECRET, "verify", 42, 1_900_000_000)
    i = flip % len(token)
    changed = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    try:
        parsed = tokens.parse(SECRET, changed)
    except DatorusError as e:
        assert e.code == "TOKEN_INVALID"
    else:  # base64 padding bits can change without changing the bytes
        assert parsed == ("verify", 42, 1_900_000_000)


def test_token_from_another_secret_is_invalid() -> None:
    with pytest.raises(DatorusError):
        tokens.parse(SECRET, tokens.sign(b"t" * 32, "verify", 1, 2))


def test_api_keys_have_the_seed_format() -> None:
    made = {keys.new_key() for _ in range(100)}
    assert len(made) == 100
    for k in made:
        assert keys.KEY_RE.fullmatch(k) and keys.key_prefix(k) == k[:8]
        assert keys.parse_bearer(f"Bearer {k}") == k
        assert keys.parse_bearer(f"bearer  {k} ") == k
    assert keys.key_hash("pp_x") != keys.key_hash("pp_y")
    for bad in (None, "", "Bearer", "Bearer pp_short", "Basic abc", "pp_" + "a" * 48):
        assert keys.parse_bearer(bad) is None


@given(st.integers(min_value=0, max_value=2**62))
def test_cursor_round_trips(after: int) -> None:
    assert decode_cursor(encode_cursor(after)) == after


@given(st.text(min_size=1, max_size=50))
def test_foreign_cursor_is_validation_error_or_ours(text: str) -> None:
    try:
        decode_cursor(text)
    except DatorusError as e:
        assert e.code == "VALIDATION_ERROR" and e.details["field"] == "cursor"
