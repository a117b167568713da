"""Registrable domains (datorus_core/domains.py): what usage by destination groups by."""

from __future__ import annotations

import pytest

from datorus_core.domains import SUMMED, by_registrable, registrable


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("www.shop.example.co.uk", "example.co.uk"),
        ("Example.COM.", "example.com"),
        ("a.b.c.example.com", "example.com"),
        ("user.github.io", "user.github.io"),  # a private suffix of the list
        ("co.uk", "co.uk"),  # a public suffix alone has none: itself
        ("localhost", "localhost"),
        ("10.0.0.1", "10.0.0.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("xn--e1afmkfd.xn--p1ai", "xn--e1afmkfd.xn--p1ai"),
    ],
)
def test_registrable(host: str, domain: str) -> None:
    assert registrable(host) == domain


def row(host: str, n: int) -> dict[str, object]:
    return {"host": host, **{k: n for k in SUMMED}}


def test_hosts_fold_into_their_domain_with_exact_sums_busiest_first() -> None:
    rows = [row("a.example.com", 5), row("b.example.com", 7), row("x.example.org", 13)]
    folded = by_registrable(rows)
    assert [(d["domain"], d["hosts"], d["bytes"]) for d in folded] == [
        ("example.org", 1, 13),
        ("example.com", 2, 12),
    ]
    assert all(folded[1][k] == 12 for k in SUMMED)
    assert by_registrable(rows, limit=1) == folded[:1]


def test_equal_bytes_are_ordered_by_name() -> None:
    folded = by_registrable([row("b.example.net", 1), row("a.example.com", 1)])
    assert [d["domain"] for d in folded] == ["example.com", "example.net"]
