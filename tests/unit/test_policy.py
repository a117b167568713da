"""The acceptable-use policy: IP literal parsing, host names, rules and destination checks."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datorus_core.policy import (
    Denial,
    Policy,
    classify_host,
    denial_hint,
    normalize_hostname,
    parse_ip_literal,
    parse_rule,
)

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
METADATA = ipaddress.IPv4Address("169.254.169.254")


def rule_of(denial: Denial | None) -> str | None:
    return None if denial is None else denial.rule


# ----------------------------------------------------------------------- parse_ip_literal


@pytest.mark.parametrize(
    "spelling",
    [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "0177.0.0.1",
        "0177.0.0.01",
        "017700000001",
        "0x7f.0.0.1",
        "0x7f.1",
        "127.1",
        "127.0.1",
        "127.0.0.1.",
        "0x7F.0x00.0x00.0x01",
    ],
)
def test_every_ipv4_spelling_of_loopback_parses_to_127_0_0_1(spelling: str) -> None:
    assert parse_ip_literal(spelling) == LOOPBACK


@pytest.mark.parametrize(
    "spelling", ["169.254.169.254", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376"]
)
def test_metadata_address_spellings_parse_to_169_254_169_254(spelling: str) -> None:
    assert parse_ip_literal(spelling) == METADATA


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [("10.1", "10.0.0.1"), ("10.1.2", "10.1.0.2"), ("1.65535", "1.0.255.255"), ("0", "0.0.0.0")],
)
def test_short_ipv4_forms_fill_the_last_part_like_inet_aton(spelling: str, expected: str) -> None:
    assert parse_ip_literal(spelling) == ipaddress.IPv4Address(expected)


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("::ffff:7f00:1", "::ffff:7f00:1"),
        ("[2606:4700::1111]", "2606:4700::1111"),
    ],
)
def test_ipv6_literals_parse_bare_or_bracketed(spelling: str, expected: str) -> None:
    assert parse_ip_literal(spelling) == ipaddress.IPv6Address(expected)


@pytest.mark.parametrize("spelling", ["fe80::1%eth0", "[fe80::1%eth0]", "[fe80::1%25eth0]"])
def test_ipv6_zone_id_is_stripped(spelling: str) -> None:
    ip = parse_ip_literal(spelling)
    assert ip == ipaddress.IPv6Address("fe80::1")
    assert str(ip) == "fe80::1"


@pytest.mark.parametrize("spelling", [" 127.0.0.1", "127.0.0.1 ", "127.0.0.1\n", "\t::1", "[::1] "])
def test_surrounding_whitespace_is_not_an_ip_literal(spelling: str) -> None:
    assert parse_ip_literal(spelling) is None


@pytest.mark.parametrize(
    "spelling",
    [
        "256.0.0.1",
        "1.2.3.256",
        "0x1ffffffff",
        "4294967296",
        "0x100.0.0.1",
        "1.16777216",
        "1.2.65536",
        "0400.0.0.1",
        "9" * 5000,
    ],
)
def test_out_of_range_literals_are_none(spelling: str) -> None:
    assert parse_ip_literal(spelling) is None


@pytest.mark.parametrize(
    "spelling",
    [
        "",
        "example.com",
        "1.2.3.4.5",
        "1..2",
        "127.0.0.1..",
        ".",
        "08.0.0.1",
        "0x7g.0.0.1",
        "+1",
        "-1",
        "1_000",
        "\u0661\u0662\u0667.0.0.1",  # Arabic-Indic digits, which int() would take
        "[127.0.0.1]",
        "[::1",
        "::ffff:0177.0.0.1",
        "fe80::1%",
        "fe80::1%eth 0",
        "1::2::3",
    ],
)
def test_non_literals_are_none(spelling: str) -> None:
    assert parse_ip_literal(spelling) is None


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_decimal_and_hex_spellings_of_any_ipv4_integer_agree(n: int) -> None:
    assert parse_ip_literal(str(n)) == parse_ip_literal(hex(n)) == ipaddress.IPv4Address(n)


@given(st.ip_addresses(v=4))
def test_octal_dotted_spelling_of_any_ipv4_address_agrees(addr: ipaddress.IPv4Address) -> None:
    spelling = ".".join(f"0{int(octet):o}" for octet in str(addr).split("."))
    assert parse_ip_literal(spelling) == addr


# -------------------------------------------------------------------- normalize_hostname


def test_normalize_lowercases_and_strips_one_trailing_dot() -> None:
    assert normalize_hostname("WWW.Example.COM.") == "www.example.com"


def test_normalize_idna_encodes_unicode_labels() -> None:
    assert normalize_hostname("Bücher.example") == "xn--bcher-kva.example"


def test_normalize_keeps_underscores_and_hyphens() -> None:
    assert normalize_hostname("_dmarc.my-host.example") == "_dmarc.my-host.example"


@pytest.mark.parametrize(
    "host",
    [
        "",
        ".",
        "example.com..",
        "a..b",
        ".example.com",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4),  # 255 characters
        "exa mple.com",
        "exa$mple.com",
        "example.com:80",
        "[::1]",
        "xn--\u00e9.com",
    ],
)
def test_normalize_rejects_invalid_names(host: str) -> None:
    with pytest.raises(ValueError):
        normalize_hostname(host)


@pytest.mark.parametrize("host", ["256.0.0.1", "1.2.3.4", "foo.123", "foo.0x1f", "08.0.0.1"])
def test_normalize_rejects_names_ending_in_a_number(host: str) -> None:
    with pytest.raises(ValueError, match="ends in a number"):
        normalize_hostname(host)


def test_normalize_accepts_the_longest_valid_name() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
    assert normalize_hostname(name + ".") == name


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LABEL = st.text(_LETTERS + "0123456789-_", min_size=1, max_size=20)
_TLD = st.text(_LETTERS, min_size=1, max_size=10)  # a top-level domain is never numeric


@given(st.lists(_LABEL, max_size=4), _TLD, st.booleans())
def test_normalize_is_idempotent_on_valid_hostnames(
    labels: list[str], tld: str, trailing_dot: bool
) -> None:
    host = ".".join([*labels, tld]) + ("." if trailing_dot else "")
    once = normalize_hostname(host)
    assert normalize_hostname(once) == once


# ---------------------------------------------------------------------------- classify_host


def test_classify_host_returns_ip_for_literals_and_name_otherwise() -> None:
    assert classify_host("0x7f.1") == LOOPBACK
    assert classify_host("[::1]") == ipaddress.IPv6Address("::1")
    assert classify_host("Example.COM.") == "example.com"


def test_classify_host_reads_fullwidth_digits_as_the_ip_they_map_to() -> None:
    assert classify_host("\uff11\uff12\uff17\u3002\uff10\u3002\uff10\u3002\uff11") == LOOPBACK


def test_classify_host_rejects_out_of_range_numbers() -> None:
    with pytest.raises(ValueError):
        classify_host("256.0.0.1")


# ------------------------------------------------------------------------------ parse_rule


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("10.0.0.0/8", ("10.0.0.0/8", None)),
        ("10.1.2.3/8", ("10.0.0.0/8", None)),
        ("10.0.0.0/8:443", ("10.0.0.0/8", 443)),
        ("203.0.113.7", ("203.0.113.7/32", None)),
        ("203.0.113.7:22", ("203.0.113.7/32", 22)),
        ("fd00::/8", ("fd00::/8", None)),
        ("fd00::1", ("fd00::1/128", None)),
        ("fd00::1:80", ("fd00::1:80/128", None)),  # parses as IPv6, so no port
        ("[fd00::/8]", ("fd00::/8", None)),
        ("[fd00::/8]:8443", ("fd00::/8", 8443)),
        ("  10.0.0.0/8  ", ("10.0.0.0/8", None)),
    ],
)
def test_parse_rule_accepts_cidr_forms(spec: str, expected: tuple[str, int | None]) -> None:
    assert parse_rule(spec, allow_domains=False) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("Example.COM", ("example.com", None)),
        ("example.com.", ("example.com", None)),
        ("example.com:8080", ("example.com", 8080)),
        ("*.Example.com", ("*.example.com", None)),
        ("*.example.com:443", ("*.example.com", 443)),
        ("bücher.example", ("xn--bcher-kva.example", None)),
    ],
)
def test_parse_rule_accepts_domains_when_allowed(
    spec: str, expected: tuple[str, int | None]
) -> None:
    assert parse_rule(spec, allow_domains=True) == expected


def test_parse_rule_refuses_domains_when_not_allowed() -> None:
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        parse_rule("example.com", allow_domains=False)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "10.0.0.0/8:0",
        "10.0.0.0/8:65536",
        "10.0.0.0/8:http",
        "10.0.0.0/8:-1",
        "10.0.0.0/33",
        ":443",
        "fd00::/8:443",  # an IPv6 target with a port needs brackets
        "[fd00::/8",
        "[fd00::/8]443",
        "[10.0.0.0/8]:443",
        "[fd00::/8]:0",
        "*",
        "*.",
        "foo.*.example.com",
        "example..com",
        "256.0.0.1",
        "fe80::1%eth0",
    ],
)
def test_parse_rule_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_rule(spec, allow_domains=True)


# -------------------------------------------------------------------- built-in denials


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link_local"),
        ("fe80::1", "link_local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.255", "cgnat"),
        ("fc00::1", "unique_local"),
        ("fd12:3456::1", "unique_local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
    ],
)
def test_builtin_ranges_are_denied_with_their_rule_name(address: str, rule: str) -> None:
    assert Policy().check_address(address, 443) == Denial(rule, address)


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:7f00:1", "loopback"),
        ("::ffff:169.254.169.254", "link_local"),
        ("::7f00:1", "loopback"),  # IPv4-compatible
        ("::a00:1", "private"),
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::", "private"),  # 6to4 of 192.168.1.1
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link_local"),
    ],
)
def test_ipv6_embedding_a_denied_ipv4_is_judged_by_the_ipv4(address: str, rule: str) -> None:
    assert rule_of(Policy().check_address(address, 443)) == rule


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "2606:4700::1111",
        "1.1.1.1",
        "172.32.0.1",
        "100.128.0.1",
        "192.0.2.1",  # documentation ranges are left alone
        "198.18.0.1",
        "192.0.0.8",
        "::ffff:93.184.216.34",
        "2002:5db8:d822::1",  # 6to4 of 93.184.216.34
        "64:ff9b::5db8:d822",
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert Policy().check_address(address, 443) is None


def test_check_address_accepts_any_literal_spelling_and_address_objects() -> None:
    policy = Policy()
    assert rule_of(policy.check_address("0x7f.1", 80)) == "loopback"
    assert rule_of(policy.check_address("2852039166", 80)) == "link_local"
    assert rule_of(policy.check_address(METADATA, 80)) == "link_local"
    assert rule_of(policy.check_address("fe80::1%eth0", 80)) == "link_local"


def test_check_address_raises_on_a_non_address() -> None:
    with pytest.raises(ValueError):
        Policy().check_address("example.com", 80)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_out_of_range_ports_are_denied(port: int) -> None:
    assert rule_of(Policy().check_address("93.184.216.34", port)) == "invalid_port"
    assert rule_of(Policy().check_name("example.com", port)) == "invalid_port"


# ---------------------------------------------------------------------------- allow rules


def test_allow_rule_without_port_allows_every_port() -> None:
    policy = Policy(allow=[parse_rule("10.0.0.0/8", False)])
    assert policy.check_address("10.1.2.3", 80) is None
    assert policy.check_address("10.1.2.3", 8080) is None
    assert rule_of(policy.check_address("192.168.0.1", 80)) == "private"


def test_allow_rule_with_port_allows_only_that_port() -> None:
    policy = Policy(allow=[parse_rule("10.0.0.0/8:443", False)])
    assert policy.check_address("10.1.2.3", 443) is None
    assert rule_of(policy.check_address("10.1.2.3", 80)) == "private"


def test_ipv6_allow_rule_allows_its_range() -> None:
    policy = Policy(allow=[parse_rule("[fd00::/8]:443", False)])
    assert policy.check_address("fd00::5", 443) is None
    assert rule_of(policy.check_address("fd00::5", 80)) == "unique_local"


def test_allow_rule_covers_the_ipv4_mapped_form() -> None:
    policy = Policy(allow=[parse_rule("10.0.0.0/8", False)])
    assert policy.check_address("::ffff:10.1.2.3", 80) is None


def test_mapped_ipv6_allow_rule_is_read_as_the_ipv4_rule() -> None:
    policy = Policy(allow=[parse_rule("::ffff:10.0.0.0/104", False)])
    assert policy.check_address("10.1.2.3", 80) is None


def test_allow_rules_must_be_cidrs() -> None:
    with pytest.raises(ValueError, match="CIDR"):
        Policy(allow=[("example.com", None)])


# ----------------------------------------------------------------------------- deny rules


def test_deny_cidr_rule_denies_every_port() -> None:
    policy = Policy(deny=[parse_rule("203.0.113.0/24", True)])
    assert policy.check_address("203.0.113.9", 443) == Denial(
        "denied_cidr:203.0.113.0/24", "203.0.113.9"
    )
    assert policy.check_address("203.0.114.9", 443) is None


def test_deny_cidr_rule_with_port_denies_only_that_port() -> None:
    policy = Policy(deny=[parse_rule("203.0.113.0/24:22", True)])
    assert rule_of(policy.check_address("203.0.113.9", 22)) == "denied_cidr:203.0.113.0/24:22"
    assert policy.check_address("203.0.113.9", 443) is None


def test_ipv6_deny_cidr_rule_with_port_is_labelled_in_brackets() -> None:
    policy = Policy(deny=[parse_rule("[2001:db8::/32]:22", True)])
    assert rule_of(policy.check_address("2001:db8::1", 22)) == "denied_cidr:[2001:db8::/32]:22"
    assert policy.check_address("2001:db8::1", 443) is None


def test_deny_cidr_rule_beats_an_allow_rule() -> None:
    policy = Policy(allow=[("10.0.0.0/8", None)], deny=[("10.9.0.0/16", None)])
    assert rule_of(policy.check_address("10.9.1.1", 80)) == "denied_cidr:10.9.0.0/16"
    assert policy.check_address("10.8.1.1", 80) is None


def test_deny_cidr_rule_covers_embedded_ipv4_forms() -> None:
    policy = Policy(deny=[("203.0.113.0/24", None)])
    assert rule_of(policy.check_address("::ffff:203.0.113.9", 80)) == "denied_cidr:203.0.113.0/24"
    assert rule_of(policy.check_address("64:ff9b::cb00:7109", 80)) == "denied_cidr:203.0.113.0/24"


def test_ipv6_deny_rule_matches_the_ipv6_form_of_an_embedding_address() -> None:
    policy = Policy(deny=[("64:ff9b::/96", None)])
    assert rule_of(policy.check_address("64:ff9b::5db8:d822", 80)) == "denied_cidr:64:ff9b::/96"
    assert policy.check_address("93.184.216.34", 80) is None


def test_deny_domain_rule_denies_the_name_and_its_subdomains() -> None:
    policy = Policy(deny=[parse_rule("example.com", True)])
    assert policy.check_name("example.com", 443) == Denial("denied_domain:example.com", None)
    assert rule_of(policy.check_name("a.b.example.com", 443)) == "denied_domain:example.com"
    assert policy.check_name("notexample.com", 443) is None
    assert policy.check_name("example.com.evil", 443) is None


def test_wildcard_deny_rule_denies_subdomains_but_not_the_apex() -> None:
    policy = Policy(deny=[parse_rule("*.example.com", True)])
    assert rule_of(policy.check_name("www.example.com", 443)) == "denied_domain:*.example.com"
    assert policy.check_name("example.com", 443) is None


def test_deny_domain_rule_with_port_denies_only_that_port() -> None:
    policy = Policy(deny=[parse_rule("example.com:8080", True)])
    assert rule_of(policy.check_name("example.com", 8080)) == "denied_domain:example.com:8080"
    assert policy.check_name("example.com", 443) is None


def test_check_name_tolerates_case_and_a_trailing_dot() -> None:
    policy = Policy(deny=[("example.com", None)])
    assert rule_of(policy.check_name("WWW.Example.com.", 443)) == "denied_domain:example.com"


# ------------------------------------------------------------------------------ deny ports


def test_port_25_is_denied_by_default() -> None:
    assert Policy().check_address("93.184.216.34", 25) == Denial("denied_port:25", "93.184.216.34")
    assert Policy().check_name("mail.example.com", 25) == Denial("denied_port:25", None)


def test_custom_deny_ports_replace_the_default() -> None:
    policy = Policy(deny_ports=[6379])
    assert rule_of(policy.check_address("93.184.216.34", 6379)) == "denied_port:6379"
    assert policy.check_address("93.184.216.34", 25) is None


def test_allow_rule_naming_the_port_lifts_a_port_denial() -> None:
    policy = Policy(allow=[parse_rule("198.51.100.0/24:25", False)])
    assert policy.check_address("198.51.100.7", 25) is None
    assert rule_of(policy.check_address("93.184.216.34", 25)) == "denied_port:25"
    assert policy.check_name("mail.example.com", 25) is None  # the addresses decide


def test_allow_rule_without_port_does_not_lift_a_port_denial() -> None:
    policy = Policy(allow=[parse_rule("198.51.100.0/24", False)])
    assert rule_of(policy.check_address("198.51.100.7", 25)) == "denied_port:25"
    assert rule_of(policy.check_name("mail.example.com", 25)) == "denied_port:25"


# -------------------------------------------------------------------------- gateway_self


@pytest.mark.parametrize("listen_host", ["", "0.0.0.0", "::", "127.0.0.1"])
def test_gateway_self_is_denied_even_when_loopback_is_allowed(listen_host: str) -> None:
    policy = Policy(
        allow=[("127.0.0.0/8", None), ("::1/128", None)], own_sockets=[(listen_host, 8080)]
    )
    for address in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:7f00:1", "0.0.0.0"):
        assert policy.check_address(address, 8080) == Denial(
            "gateway_self", str(ipaddress.ip_address(address))
        )
    assert policy.check_address("127.0.0.1", 8081) is None


def test_wildcard_listener_covers_the_local_addresses() -> None:
    policy = Policy(own_sockets=[("", 8080)], local_addresses=["203.0.113.5", "2001:db8::5"])
    assert rule_of(policy.check_address("203.0.113.5", 8080)) == "gateway_self"
    assert rule_of(policy.check_address("2001:db8::5", 8080)) == "gateway_self"
    assert policy.check_address("203.0.113.6", 8080) is None
    assert policy.check_address("203.0.113.5", 8081) is None


def test_specific_listener_covers_only_its_address() -> None:
    policy = Policy(own_sockets=[("203.0.113.5", 8080)], local_addresses=["203.0.113.6"])
    assert rule_of(policy.check_address("203.0.113.5", 8080)) == "gateway_self"
    assert policy.check_address("203.0.113.6", 8080) is None


# ------------------------------------------------------------------------------ check_name


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST.", "foo.localhost"])
def test_localhost_names_are_denied_as_loopback(name: str) -> None:
    assert Policy().check_name(name, 80) == Denial("loopback", None)


def test_localhost_is_allowed_when_an_allow_rule_covers_127_0_0_1_on_that_port() -> None:
    policy = Policy(allow=[parse_rule("127.0.0.0/8:3000", False)])
    assert policy.check_name("localhost", 3000) is None
    assert rule_of(policy.check_name("localhost", 80)) == "loopback"


def test_check_name_judges_an_ip_literal_as_an_address() -> None:
    assert rule_of(Policy().check_name("127.1", 80)) == "loopback"


def test_ordinary_names_pass_check_name() -> None:
    assert Policy().check_name("www.example.com", 443) is None


# ------------------------------------------------------------------------- check_addresses


def test_check_addresses_denies_when_any_one_address_is_denied() -> None:
    denial = Policy().check_addresses(["93.184.216.34", "10.0.0.1", "127.0.0.1"], 443)
    assert denial == Denial("private", "10.0.0.1")


def test_check_addresses_allows_when_every_address_is_allowed() -> None:
    assert Policy().check_addresses(["93.184.216.34", "2606:4700::1111"], 443) is None


def test_check_addresses_of_nothing_is_none() -> None:
    assert Policy().check_addresses([], 443) is None


# ------------------------------------------------------------------------------ properties

_PROPERTY_POLICY = Policy(
    allow=[("10.0.0.0/8", 443), ("192.168.7.0/24", None)],
    deny=[("203.0.113.0/24", None), ("1.0.0.0/8", 80)],
    own_sockets=[("", 8080)],
    local_addresses=["198.51.100.1"],
)


@given(st.ip_addresses(v=4), st.sampled_from([25, 80, 443, 8080]))
def test_dotted_and_mapped_forms_get_the_same_verdict(
    addr: ipaddress.IPv4Address, port: int
) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{addr}")
    dotted_verdict = _PROPERTY_POLICY.check_address(addr, port)
    mapped_verdict = _PROPERTY_POLICY.check_address(mapped, port)
    assert rule_of(dotted_verdict) == rule_of(mapped_verdict)


# ----------------------------------------------------------------------- denial hints


@pytest.mark.parametrize(
    ("host", "port", "hint"),
    [
        ("127.0.0.1", 8080, "datorus policy allow 127.0.0.1/32"),
        ("localhost", 8080, "datorus policy allow 127.0.0.1/32"),
        ("::1", 80, "datorus policy allow ::1/128"),
        ("::ffff:127.0.0.2", 80, "datorus policy allow 127.0.0.2/32"),
        ("10.1.2.3", 80, "datorus policy allow 10.1.2.3/32"),
        ("169.254.169.254", 80, "datorus policy allow 169.254.169.254/32"),
        ("100.64.0.1", 80, "datorus policy allow 100.64.0.1/32"),
        ("fd00::1", 80, "datorus policy allow fd00::1/128"),
        ("8.8.8.8", 25, "datorus policy allow 8.8.8.8/32:25"),
        ("2001:db8::1", 25, "datorus policy allow [2001:db8::1/128]:25"),
        ("blocked.example", 80, "datorus policy remove deny blocked.example"),
        ("9.9.9.9", 53, "datorus policy remove deny 9.9.9.0/24:53"),
    ],
)
def test_a_denial_names_the_command_that_lets_it_through(host: str, port: int, hint: str) -> None:
    deny = [parse_rule("blocked.example", True), parse_rule("9.9.9.0/24:53", True)]
    policy = Policy(deny=deny, deny_ports=[25])
    denial = (
        policy.check_name(host, port)
        if parse_ip_literal(host) is None
        else policy.check_address(host, port)
    )
    assert denial is not None
    assert denial_hint(denial, port) == hint
    verb, _, arg = hint.removeprefix("datorus policy ").partition(" ")
    if verb == "allow":  # following the hint lets exactly that destination through
        opened = Policy(deny=deny, deny_ports=[25], allow=[parse_rule(arg, False)])
        assert opened.check_address(denial.address or "127.0.0.1", port) is None
        if parse_ip_literal(host) is None:
            assert opened.check_name(host, port) is None


@pytest.mark.parametrize(
    ("host", "rule"),
    [("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified")],
)
def test_no_hint_where_no_rule_helps(host: str, rule: str) -> None:
    denial = Policy().check_address(host, 80)
    assert denial is not None and denial.rule == rule
    assert denial_hint(denial, 80) is None
    assert denial_hint(Denial("gateway_self", "127.0.0.1"), 8001) is None
