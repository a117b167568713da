"""Proxy-list parsers (issue 17): what each shipped parser reads, skips and refuses.

The pure core, called directly: ``FoundProxy`` validation, ``plaintext``, ``json`` and
``csv``, and hypothesis round trips (a proxy written in any list form reads back as
itself) over hostnames, IPv4 and IPv6 literals, ports and credentials.
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datorus_core.sources.found import FoundProxy, InvalidEntry, normalize_host
from datorus_core.sources.parsers import (
    CsvParser,
    JsonParser,
    ParseDefaults,
    ParseError,
    PlaintextParser,
    parse_line,
)

D = ParseDefaults()
plaintext, jsonp, csvp = PlaintextParser(), JsonParser(), CsvParser()


# -- FoundProxy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("Proxy-1.Example.COM", "proxy-1.example.com"),
        ("localhost", "localhost"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("[::1]", "::1"),
    ],
)
def test_hosts_are_normalised(host, normal):
    assert normalize_host(host) == normal


@pytest.mark.parametrize(
    "host",
    [
        "",
        "256.1.1.1",
        "10.0.0",
        "010.0.0.1",  # a leading zero: octal to some resolvers
        "1.2.3.4.5",
        "-bad.example",
        "bad-.example",
        "under_score.example",
        "a" * 64 + ".example",
        ("a" * 60 + ".") * 5 + "com",
        "fe80::1%eth0",
        "2001:db8::g",
        "exa mple.com",
        "example.123",
        "xn--\u00e9.example",
    ],
)
def test_bad_hosts_are_refused(host):
    with pytest.raises(InvalidEntry):
        normalize_host(host)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"protocol": "ftp"}, "protocol"),
        ({"protocol": "socks4a"}, "protocol"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": True}, "port"),
        ({"port": "80"}, "port"),
        ({"username": "", "password": "x"}, "username is empty"),
        ({"password": "secret"}, "needs a username"),
        ({"username": "u", "password": "pa\r\nss"}, "control character"),
        ({"username": "u\n", "password": "p"}, "control character"),
        ({"username": "u", "password": "p" * 256}, "longer"),
        ({"country": "USA"}, "country"),
        ({"country": "1A"}, "country"),
    ],
)
def test_found_proxy_refuses_bad_fields_without_repeating_them(kwargs, reason):
    args = {"protocol": "http", "host": "10.0.0.1", "port": 8080, **kwargs}
    with pytest.raises(InvalidEntry) as e:
        FoundProxy(**args)
    assert reason in str(e.value)
    assert "secret" not in str(e.value) and "pa\r\nss" not in str(e.value)


def test_credentials_stay_out_of_repr_and_public_url():
    p = FoundProxy("socks5", "10.0.0.1", 1080, "alice", "hunter2", "nl")
    assert "hunter2" not in repr(p) and "alice" not in repr(p)
    assert p.public_url() == "socks5://alice:***@10.0.0.1:1080"
    assert p.url() == "socks5://alice:hunter2@10.0.0.1:1080"
    assert (
        FoundProxy("http", "::1", 80, "a b", "p@ss:/").url() == "http://a%20b:p%40ss%3A%2F@[::1]:80"
    )


# -- plaintext ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "url"),
    [
        ("10.0.0.1:3128", "http://10.0.0.1:3128"),
        ("  10.0.0.1:3128\t", "http://10.0.0.1:3128"),
        ("proxy.example:8080:bob:s3cr3t", "http://bob:s3cr3t@proxy.example:8080"),
        ("proxy.example:8080:bob:pa:ss", "http://bob:pa%3Ass@proxy.example:8080"),
        ("proxy.example:8080:bob:p@ss", "http://bob:p%40ss@proxy.example:8080"),
        ("proxy.example:8080:bob:pa://ss", "http://bob:pa%3A%2F%2Fss@proxy.example:8080"),
        ("bob:s3cr3t@proxy.example:8080", "http://bob:s3cr3t@proxy.example:8080"),
        ("bob@proxy.example:8080", "http://bob:@proxy.example:8080"),
        ("socks5://10.0.0.1:1080", "socks5://10.0.0.1:1080"),
        ("SOCKS4://10.0.0.1:1080/", "socks4://10.0.0.1:1080"),
        ("https://bob:p%40ss@proxy.example:443", "https://bob:p%40ss@proxy.example:443"),
        ("socks5://proxy.example:1080:bob:pw", "socks5://bob:pw@proxy.example:1080"),
        ("[2001:db8::1]:8080", "http://[2001:db8::1]:8080"),
        ("[2001:db8::1]:8080:bob:pw", "http://bob:pw@[2001:db8::1]:8080"),
        ("socks5://bob:pw@[2001:db8::1]:1080", "socks5://bob:pw@[2001:db8::1]:1080"),
    ],
)
def test_plaintext_reads_every_form(line, url):
    assert parse_line(line, D).url() == url


@pytest.mark.parametrize(
    "line",
    [
        "10.0.0.1",
        "10.0.0.1:",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:80x",
        "10.0.0.1:８０",  # fullwidth digits
        "10.0.0.1:8080:bob",
        "2001:db8::1:8080",  # IPv6 without brackets
        "[2001:db8::1:8080",
        "[2001:db8::1]8080",
        "ftp://10.0.0.1:21",
        "http://bob:p%0D%0Ass@10.0.0.1:80",  # CR LF smuggled in percent-encoding
        "http://10.0.0.1:80/path",
        "10.0.0.1:8080 US",
        "<html><body>Service Unavailable</body></html>",
    ],
)
def test_plaintext_bad_lines_are_refused(line):
    with pytest.raises(InvalidEntry):
        parse_line(line, D)


def test_plaintext_skips_comments_blanks_and_counts_bad_lines():
    text = (
        "\ufeff# provider: example\r\n"
        "\r\n"
        "10.0.0.1:3128\r\n"
        "   # indented comment\n"
        "10.0.0.2:99999\n"
        "proxy.example:8080:bob:topsecret\n"
        "10.0.0.3:8080:bob:top\rsecret\n"  # a lone CR ends a line: it never reaches a password
        "\n"
    )
    out = plaintext.parse(text.encode(), D)
    assert [p.public_url() for p in out] == [
        "http://10.0.0.1:3128",
        "http://bob:***@proxy.example:8080",
        "http://bob:***@10.0.0.3:8080",
    ]
    assert out[2].password == "top"
    assert out.skipped == 2
    assert out.problems == ["line 5: the port must be 1-65535", "line 8: the port is missing"]


def test_plaintext_defaults_fill_protocol_and_country():
    out = plaintext.parse("10.0.0.1:1080\nhttp://10.0.0.2:80\n", ParseDefaults("socks5", "se"))
    assert [(p.protocol, p.country) for p in out] == [("socks5", "SE"), ("http", "SE")]


def test_bad_bytes_make_a_bad_line_not_a_failed_list():
    out = plaintext.parse(b"10.0.0.1:3128\nprox\xffy.example:80\n", D)
    assert len(out) == 1 and out.skipped == 1


def test_plaintext_supports_lists_not_pages_nor_other_formats():
    assert plaintext.supports(b"# list\n\n10.0.0.1:3128\n", None)
    assert plaintext.supports(b"[::1]:8080\n", "text/plain; charset=utf-8")
    assert not plaintext.supports(b"10.0.0.1:3128\n", "application/json")
    assert not plaintext.supports(b"<html><title>502</title></html>", "text/html")
    assert not plaintext.supports(b'["10.0.0.1:3128"]', None)
    assert not plaintext.supports(b"ip,port\n10.0.0.1,3128\n", None)
    assert not plaintext.supports(b"", None)


# -- json ---------------------------------------------------------------------------------


def test_json_reads_strings_and_objects():
    doc = [
        "10.0.0.1:3128",
        "socks5://u:p@10.0.0.2:1080",
        {"ip": "10.0.0.3", "port": 8080},
        {"host": "proxy.example", "port": "3128", "protocol": "https", "country": "de"},
        {"ip": "10.0.0.4", "port": 1080, "user": "bob", "pass": "pw", "protocol": "socks4"},
        {"ip": "10.0.0.5", "port": 80, "username": "al", "password": "pw2", "country": ""},
    ]
    out = jsonp.parse(json.dumps(doc), ParseDefaults(country="fr"))
    assert [(p.public_url(), p.country) for p in out] == [
        ("http://10.0.0.1:3128", "FR"),
        ("socks5://u:***@10.0.0.2:1080", "FR"),
        ("http://10.0.0.3:8080", "FR"),
        ("https://proxy.example:3128", "DE"),
        ("socks4://bob:***@10.0.0.4:1080", "FR"),
        ("http://al:***@10.0.0.5:80", "FR"),
    ]
    assert out.skipped == 0


def test_json_counts_bad_entries_and_reads_a_wrapped_list():
    doc = {
        "proxies": [
            "10.0.0.1:3128",
            42,
            None,
            ["10.0.0.2", 80],
            {"ip": "10.0.0.3"},
            {"port": 80},
            {"ip": "10.0.0.4", "port": 80, "protocol": "gopher"},
            {"ip": 167772161, "port": 80},
            {"ip": "10.0.0.5", "port": 80.5},
            {"ip": "10.0.0.6", "port": 80, "password": "lonely"},
        ]
    }
    out = jsonp.parse(json.dumps(doc).encode(), D)
    assert [p.host for p in out] == ["10.0.0.1"]
    assert out.skipped == 9
    assert out.problems[0] == "entry 1: an entry must be a string or an object"
    assert "lonely" not in " ".join(out.problems)


@pytest.mark.parametrize(
    "content", [b"", b"{", b"[1, 2", b'{"other": []}', b'"10.0.0.1:80"', b"\xff\xfe[]"]
)
def test_json_that_is_no_list_is_a_parse_error(content):
    with pytest.raises(ParseError):
        jsonp.parse(content, D)


def test_json_supports():
    assert jsonp.supports(b"anything", "application/json; charset=utf-8")
    assert jsonp.supports(b"  \n[]", None)
    assert jsonp.supports(b'{"items": [{"ip": "10.0.0.1", "port": 80}]}', "text/plain")
    assert not jsonp.supports(b"[::1]:8080\n[::2]:8080\n", None)  # plaintext IPv6
    assert not jsonp.supports(b'{"error": "rate limited"}', None)
    assert not jsonp.supports(b"10.0.0.1:80", None)


# -- csv ----------------------------------------------------------------------------------


def test_csv_reads_its_header_with_any_column_order_and_delimiter():
    text = (
        "Country,Port,IP,Protocol,Username,Password,Latency\n"
        "us,3128,10.0.0.1,http,,,12\n"
        'de,1080,10.0.0.2,socks5,bob,"p,w",30\n'
    )
    out = csvp.parse(text, D)
    assert [(p.public_url(), p.country, p.password) for p in out] == [
        ("http://10.0.0.1:3128", "US", None),
        ("socks5://bob:***@10.0.0.2:1080", "DE", "p,w"),
    ]
    semi = csvp.parse(b"\n\nhost;port\nproxy.example;8080\n", ParseDefaults("https"))
    assert [p.url() for p in semi] == ["https://proxy.example:8080"]
    tabs = csvp.parse("ip\tport\tuser\tpass\n2001:db8::1\t80\tu\tp\n", D)
    assert [p.url() for p in tabs] == ["http://u:p@[2001:db8::1]:80"]


def test_csv_counts_bad_rows_by_line():
    text = "ip,port\n10.0.0.1,80\n10.0.0.2\n\n10.0.0.3,http\n10.0.0.4,80,extra\n10.0.0.5,81\n"
    out = csvp.parse(text, D)
    assert [p.host for p in out] == ["10.0.0.1", "10.0.0.5"]
    assert out.skipped == 3
    assert out.problems == [
        "line 3: 1 columns where the header has 2",
        "line 5: the port must be 1-65535",
        "line 6: 3 columns where the header has 2",
    ]


@pytest.mark.parametrize("content", ["", "\n\n", "name,address\nx,y\n", "10.0.0.1,80\n"])
def test_csv_without_a_host_and_port_header_is_a_parse_error(content):
    with pytest.raises(ParseError):
        csvp.parse(content, D)
    assert not csvp.supports(content, None)


def test_csv_supports():
    assert csvp.supports(b"ip,port\n", "text/csv")
    assert csvp.supports(b"\xef\xbb\xbfHOST ; PORT\n", None)
    assert not csvp.supports(b"ip,port\n", "application/json")
    assert not csvp.supports(b"10.0.0.1:3128\n", "text/plain")


# -- round trips (hypothesis) -------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
hostnames = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(_label, min_size=0, max_size=3),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
hosts = st.one_of(hostnames, ipv4, ipv6)
ports = st.integers(1, 65535)
protocols = st.sampled_from(["http", "https", "socks4", "socks5"])
countries = st.none() | st.from_regex(r"[A-Z]{2}", fullmatch=True)
# printable, no whitespace at either end (a list's lines are stripped)
_printable = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp", "Zs")),
    min_size=1,
    max_size=40,
)
usernames = _printable.filter(lambda u: ":" not in u and "@" not in u)
passwords = _printable.filter(lambda p: "@" not in p)


@st.composite
def found_proxies(draw, with_country=True):
    user = draw(st.none() | usernames)
    pw = draw(passwords) if user is not None else None
    country = draw(countries) if with_country else None
    return FoundProxy(draw(protocols), draw(hosts), draw(ports), user, pw, country)


def _netloc(p: FoundProxy) -> str:
    return f"[{p.host}]:{p.port}" if ":" in p.host else f"{p.host}:{p.port}"


@given(found_proxies(with_country=False))
def test_url_form_round_trips(p):
    assert parse_line(p.url(), D) == p


@given(found_proxies(with_country=False))
def test_colon_form_round_trips(p):
    line = _netloc(p) + (f":{p.username}:{p.password}" if p.username is not None else "")
    assert parse_line(line, ParseDefaults(p.protocol)) == p


@given(st.lists(found_proxies(with_country=False), max_size=20), st.lists(st.text(), max_size=5))
def test_plaintext_list_round_trips_with_noise(items, noise):
    lines = [p.url() for p in items] + [f"# {' '.join(n.splitlines())}" for n in noise]
    out = plaintext.parse("\n".join(lines).encode(), D)
    assert list(out) == items and out.skipped == 0


@given(st.lists(found_proxies(), max_size=20))
def test_json_objects_round_trip(items):
    doc = [
        {
            "ip": p.host,
            "port": p.port,
            "protocol": p.protocol,
            "username": p.username,
            "password": p.password,
            "country": p.country,
        }
        for p in items
    ]
    assert list(jsonp.parse(json.dumps(doc), D)) == items


@given(st.lists(found_proxies(), max_size=20))
def test_csv_round_trips(items):
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["protocol", "host", "port", "user", "pass", "country"])
    for p in items:
        w.writerow(
            [p.protocol, p.host, p.port, p.username or "", p.password or "", p.country or ""]
        )
    assert list(csvp.parse(buf.getvalue(), D)) == items


@given(st.binary(max_size=2000))
def test_no_input_crashes_a_parser(data):
    for parser in (plaintext, jsonp, csvp):
        parser.supports(data, None)
        try:
            out = parser.parse(data, D)
        except ParseError:
            continue
        assert all(isinstance(p, FoundProxy) for p in out)
        assert out.skipped >= 0


@given(st.text(alphabet=string.printable, max_size=200))
def test_a_line_is_a_proxy_or_an_invalid_entry(line):
    try:
        p = parse_line(line, D)
    except InvalidEntry:
        return
    assert 1 <= p.port <= 65535 and p.host == normalize_host(p.host)
    for cred in (p.username, p.password):
        assert cred is None or ("\r" not in cred and "\n" not in cred)


def test_credentials_refuse_exactly_the_envelopes_control_characters():
    from datorus_core.envelope import has_control

    for code in range(0x200):
        c = chr(code)
        refused = False
        try:
            FoundProxy("http", "10.0.0.1", 80, "u", f"a{c}b")
        except InvalidEntry:
            refused = True
        assert refused == has_control(c), hex(code)


def test_credentials_are_capped_in_bytes_as_socks5_counts_them():
    FoundProxy("socks5", "10.0.0.1", 1080, "é" * 127, "p")  # 254 bytes
    with pytest.raises(InvalidEntry, match="255 bytes"):
        FoundProxy("socks5", "10.0.0.1", 1080, "é" * 128, "p")  # 128 characters, 256 bytes
