"""Allow-listed client addresses and the SOCKS5 entry's decisions: the pure core."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datorus_core import socks
from datorus_core.allowlist import AllowList, normalize_cidr

nets4 = st.builds(
    lambda addr, length: str(ipaddress.ip_network(f"{addr}/{length}", strict=False)),
    st.ip_addresses(v=4),
    st.integers(0, 32),
)


@given(st.dictionaries(nets4, st.integers(1, 50), max_size=12), st.ip_addresses(v=4))
def test_the_most_specific_cidr_wins(entries: dict[str, int], client) -> None:
    """Whatever the entries, the match is the longest prefix that contains the client."""
    table = AllowList((cid, cidr) for cidr, cid in entries.items())
    containing = [
        (ipaddress.ip_network(cidr).prefixlen, cid)
        for cidr, cid in entries.items()
        if client in ipaddress.ip_network(cidr)
    ]
    expected = max(containing)[1] if containing else None
    assert table.match(str(client)) == expected
    assert table.match(f"::ffff:{client}") == expected  # a dual-stack socket's spelling


def test_families_never_match_each_other() -> None:
    table = AllowList([(1, "0.0.0.0/0")])
    assert table.match("2001:db8::1") is None and table.match("192.0.2.1") == 1
    assert AllowList([(2, "::/0")]).match("192.0.2.1") is None
    assert AllowList().match("192.0.2.1") is None and not AllowList()
    assert table.match("not an address") is None and table.match(None) is None


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("203.0.113.7", "203.0.113.7/32"),
        ("203.0.113.0/24", "203.0.113.0/24"),
        ("2001:DB8::/48", "2001:db8::/48"),
        ("::1", "::1/128"),
        ("::ffff:203.0.113.0/120", "203.0.113.0/24"),
    ],
)
def test_a_cidr_has_one_spelling(text: str, canonical: str) -> None:
    assert normalize_cidr(text) == canonical


@pytest.mark.parametrize(
    "text", ["203.0.113.7/24", "", " 10.0.0.0/8", "10.0.0.0/33", "example.com", "10.0.0.0/8 x"]
)
def test_what_is_no_cidr_is_refused_saying_why(text: str) -> None:
    with pytest.raises(ValueError, match="CIDR|host bits"):
        normalize_cidr(text)


def test_the_method_a_client_gets() -> None:
    assert socks.choose_method(b"\x00\x02", allow_listed=False) == socks.USER_PASSWORD
    assert socks.choose_method(b"\x00\x02", allow_listed=True) == socks.USER_PASSWORD
    assert socks.choose_method(b"\x00", allow_listed=True) == socks.NO_AUTH
    assert socks.choose_method(b"\x00", allow_listed=False) == socks.NO_ACCEPTABLE
    assert socks.choose_method(b"\x01", allow_listed=True) == socks.NO_ACCEPTABLE  # GSSAPI


@pytest.mark.parametrize(
    ("status", "code", "reason", "reply"),
    [
        (200, "", "", socks.SUCCEEDED),
        (407, "INVALID_CREDENTIAL", "missing", socks.NOT_ALLOWED),
        (403, "AUP_VIOLATION", "", socks.NOT_ALLOWED),
        (403, "ACCOUNT_SUSPENDED", "", socks.NOT_ALLOWED),
        (429, "RATE_LIMITED", "", socks.NOT_ALLOWED),
        (402, "TRIAL_EXHAUSTED", "", socks.NOT_ALLOWED),
        (402, "INSUFFICIENT_BALANCE", "", socks.NOT_ALLOWED),
        (404, "RESOURCE_NOT_FOUND", "", socks.NOT_ALLOWED),
        (502, "UPSTREAM_FAILED", "[Errno 111] Connect call failed", socks.CONNECTION_REFUSED),
        (502, "UPSTREAM_FAILED", "dns_resolution_failed", socks.HOST_UNREACHABLE),
        (502, "UPSTREAM_FAILED", "no_healthy_egress", socks.HOST_UNREACHABLE),
        (504, "GATEWAY_TIMEOUT", "", socks.TTL_EXPIRED),
        (503, "SERVICE_UNAVAILABLE", "draining", socks.GENERAL_FAILURE),
        (400, "VALIDATION_ERROR", "", socks.GENERAL_FAILURE),
        (0, "", "", socks.GENERAL_FAILURE),  # closed without an answer
    ],
)
def test_each_answer_maps_to_the_contracts_reply(
    status: int, code: str, reason: str, reply: int
) -> None:
    assert socks.reply_for(status, code, reason) == reply


@given(st.text(max_size=300))
def test_no_domain_name_breaks_the_connect_request_line(name: str) -> None:
    target = socks.authority(socks.ATYP_DOMAIN, name, 443)
    if target is not None:
        head = socks.connect_head(target, "u", "p")
        first = head.split(b"\r\n", 1)[0]
        assert first == f"CONNECT {name}:443 HTTP/1.1".encode()
        assert head.count(b"\r\n\r\n") == 1 and head.endswith(b"\r\n\r\n")
