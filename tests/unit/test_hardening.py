"""The request-head checks mitmproxy's parser leaves to us."""

from __future__ import annotations

import pytest
from mitmproxy.test import tutils

from addons.hardening import MAX_HEADERS, malformed


def req(fields: list[tuple[bytes, bytes]], version: str = "HTTP/1.1"):
    r = tutils.treq(http_version=version.encode())
    r.headers.fields = tuple(fields)
    return r


def test_ordinary_heads_pass():
    assert malformed(req([(b"Host", b"x"), (b"User-Agent", b"curl/8\tok"), (b"X-E", b"")])) is None
    assert malformed(req([])) is None
    assert malformed(req([(b"A", b"1")] * MAX_HEADERS)) is None


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ([(b"Host", b"x"), (b"X-A", b"a\x00b")], "X-A"),
        ([(b"X-B", b"a\rb"), (b"Host", b"x")], "X-B"),
        ([(b"X-C", b"\x7f")], "X-C"),
        ([(b"Bad Name", b"1")], "Bad Name"),
        ([(b"Host", b"x"), (b"", b"1")], ""),
        ([(b"N\x00", b"1")], "N\x00"),
    ],
)
def test_control_characters_and_bad_names_are_named(fields, bad):
    assert malformed(req(fields)) == ("headers", f"invalid header field {bad!r}")


def test_too_many_fields_and_unknown_versions():
    assert malformed(req([(b"A", b"1")] * (MAX_HEADERS + 1))) == (
        "headers",
        f"more than {MAX_HEADERS} fields",
    )
    assert malformed(req([], "HTTP/0.9"))[0] == "version"
    assert malformed(req([], "HTTP/2.0")) is None
