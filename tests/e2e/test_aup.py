"""Acceptable use on the wire: every spelling of a denied destination is refused, unsent.

This module's gateway allows only 127.0.0.2 (where a control origin listens), so the
origin on 127.0.0.1 stands for "the operator's own network": no spelling of it may
reach it, through a forward request or a CONNECT.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
from checks import assert_envelope
from support.clients import basic, raw_connection, read_response
from support.ledger import LedgerTarget, cli, ledger_rows
from support.origins import Origin
from support.processes import GatewaySetup
from support.waiting import wait_until


def _only_127_0_0_2(db: LedgerTarget) -> None:
    cli(db, "init")
    cli(db, "policy", "allow", "127.0.0.2/32")
    cli(db, "policy", "deny", "blocked.example")


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    return GatewaySetup(api=True, ledger=_only_127_0_0_2)


@pytest.fixture(scope="module")
def cust(gw) -> tuple[int, str, str]:
    return gw.customer(trial_bytes=10**12)


@pytest.fixture(scope="module")
def victim() -> Iterator[Origin]:
    o = Origin(host="127.0.0.1")
    yield o
    o.close()


@pytest.fixture(scope="module")
def allowed() -> Iterator[Origin]:
    o = Origin(host="127.0.0.2")
    yield o
    o.close()


def spellings(port: int) -> dict[str, str]:
    """host[:port] authorities that all mean a denied address."""
    return {
        "dotted": f"127.0.0.1:{port}",
        "decimal": f"2130706433:{port}",
        "hex": f"0x7f000001:{port}",
        "octal": f"0177.0.0.1:{port}",
        "short": f"127.1:{port}",
        "trailing_dot": f"127.0.0.1.:{port}",
        "localhost": f"localhost:{port}",
        "localhost_mixed_case_dot": f"LocalHost.:{port}",
        "sub_localhost": f"api.localhost:{port}",
        "ipv6_loopback": f"[::1]:{port}",
        "ipv4_mapped_ipv6": f"[::ffff:127.0.0.1]:{port}",
        "ipv4_mapped_hex": f"[::ffff:7f00:1]:{port}",
        "unspecified": f"0.0.0.0:{port}",
        "metadata": "169.254.169.254:80",
        "metadata_decimal": "2852039166:80",
        "metadata_mapped": "[::ffff:169.254.169.254]:80",
        "private_10": "10.0.0.1:80",
        "private_172": "172.16.5.4:80",
        "private_192": "192.168.1.1:80",
        "cgnat": "100.64.0.1:80",
        "unique_local": "[fd00::1]:80",
        "link_local_v6": "[fe80::1]:80",
        "multicast": "224.0.0.1:80",
        "multicast_v6": "[ff02::1]:80",
        "denied_domain": "www.blocked.example:80",
        "denied_domain_mixed_case": "WWW.Blocked.Example.:80",
        "smtp_port": "127.0.0.2:25",
    }


CASES = list(spellings(1))


@pytest.mark.parametrize("case", CASES)
def test_forward_request_to_denied_destination_is_403_and_never_sent(gw, cust, victim, case):
    authority = spellings(victim.port)[case]
    seen = len(victim.seen)
    raw = (
        f"GET http://{authority}/secret HTTP/1.1\r\nHost: {authority}\r\n"
        f"Proxy-Authorization: {basic(cust[1], cust[2])}\r\n\r\n"
    )
    with raw_connection(gw.port) as s:
        s.sendall(raw.encode())
        status, headers, body = read_response(s)
    err = assert_envelope(status, headers, body, "AUP_VIOLATION", 403)
    assert err["details"]["rule"]
    assert headers["x-datorus-ratelimit-limit"]
    assert len(victim.seen) == seen


@pytest.mark.parametrize("case", CASES)
def test_connect_to_denied_destination_is_403_and_never_sent(gw, cust, victim, case):
    authority = spellings(victim.port)[case]
    seen = len(victim.seen)
    with raw_connection(gw.port) as s:
        s.sendall(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: {basic(cust[1], cust[2])}\r\n\r\n".encode()
        )
        status, headers, body = read_response(s)
    err = assert_envelope(status, headers, body, "AUP_VIOLATION", 403)
    assert err["details"]["rule"]
    assert len(victim.seen) == seen


def test_rules_name_what_was_hit(gw, cust, victim):
    expect = {
        f"127.0.0.1:{victim.port}": "loopback",
        "169.254.169.254:80": "link_local",
        "10.0.0.1:80": "private",
        "100.64.0.1:80": "cgnat",
        "[fd00::1]:80": "unique_local",
        "[ff02::1]:80": "multicast",
        "127.0.0.2:25": "denied_port:25",
    }
    for authority, rule in expect.items():
        r = requests.get(
            f"http://{authority}/",
            proxies={"http": gw.proxy(cust[1], cust[2])},
            timeout=10,
        )
        assert r.status_code == 403 and r.json()["error"]["details"]["rule"] == rule, authority


def test_allowed_destination_still_works_and_denials_are_recorded(gw, cust, allowed):
    r = requests.get(allowed.url("/ok"), proxies={"http": gw.proxy(cust[1], cust[2])}, timeout=10)
    assert r.status_code == 200 and allowed.seen[-1]["path"] == "/ok"
    r = requests.get("http://10.1.2.3/", proxies={"http": gw.proxy(cust[1], cust[2])}, timeout=10)
    assert r.status_code == 403

    def recorded() -> list:
        return ledger_rows(
            gw.db, "SELECT host, port, rule FROM aup_denials WHERE host = '10.1.2.3'"
        )

    # this test's one denial (no other test asks for 10.1.2.3), recorded once
    assert wait_until(recorded, 5, 0.05, "denial recorded") == [("10.1.2.3", 80, "private")]


def test_gateway_own_sockets_are_denied_even_when_loopback_is_allowed(gateway, customer):
    """The shared gateway allows 127.0.0.0/8: its own ports must still be refused (no loops)."""
    _, user, pw = customer
    api_port = gateway.settings.get("api_port") or 0
    targets = [
        f"127.0.0.1:{gateway.port}",
        f"localhost:{gateway.port}",
        f"2130706433:{gateway.port}",
    ]
    if api_port:
        targets.append(f"127.0.0.1:{api_port}")
    for authority in targets:
        with raw_connection(gateway.port) as s:
            s.sendall(
                f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n"
                f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
            )
            status, headers, body = read_response(s)
        err = assert_envelope(status, headers, body, "AUP_VIOLATION", 403)
        assert err["details"]["rule"] == "gateway_self", authority
        with raw_connection(gateway.port) as s:
            s.sendall(
                f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                f"Proxy-Authorization: {basic(user, pw)}\r\n\r\n".encode()
            )
            status, headers, body = read_response(s)
        assert status == 403 and json.loads(body)["error"]["details"]["rule"] == "gateway_self"


def test_operator_policy_change_is_live(gw, cust, allowed):
    def status() -> requests.Response:
        return requests.get(
            allowed.url("/"), proxies={"http": gw.proxy(cust[1], cust[2])}, timeout=10
        )

    cli(gw.db, "policy", "deny", "127.0.0.2/32")
    try:
        (r,) = wait_until(
            lambda: [r] if (r := status()).status_code == 403 else None, 3, 0.1, "deny live"
        )
        assert r.json()["error"]["code"] == "AUP_VIOLATION"
    finally:
        cli(gw.db, "policy", "remove", "deny", "127.0.0.2/32")
    # and its removal: the gateway is left as the other tests expect it
    wait_until(lambda: status().status_code == 200, 3, 0.1, "deny removed")


def test_rules_come_with_the_command_that_changes_them(gw, cust, victim):
    """details keep rule/host/port and add ``hint``: the operator's way to let it through."""
    expect = {
        f"127.0.0.1:{victim.port}": ("loopback", "datorus policy allow 127.0.0.1/32"),
        f"localhost:{victim.port}": ("loopback", "datorus policy allow 127.0.0.1/32"),
        f"[::1]:{victim.port}": ("loopback", "datorus policy allow ::1/128"),
        "10.0.0.1:80": ("private", "datorus policy allow 10.0.0.1/32"),
        "127.0.0.2:25": ("denied_port:25", "datorus policy allow 127.0.0.2/32:25"),
        "www.blocked.example:80": (
            "denied_domain:blocked.example",
            "datorus policy remove deny blocked.example",
        ),
        "[ff02::1]:80": ("multicast", None),
    }
    for authority, (rule, hint) in expect.items():
        for method in ("GET", "CONNECT"):
            target = f"http://{authority}/" if method == "GET" else authority
            with raw_connection(gw.port) as s:
                s.sendall(
                    f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n"
                    f"Proxy-Authorization: {basic(cust[1], cust[2])}\r\n\r\n".encode()
                )
                status, headers, body = read_response(s)
            err = assert_envelope(status, headers, body, "AUP_VIOLATION", 403)
            host, _, port = authority.rpartition(":")
            want = {"rule": rule, "host": host.strip("[]"), "port": int(port)}
            if hint is not None:
                want["hint"] = hint
            assert err["details"] == want, (authority, method)


def test_following_the_loopback_hint_lets_a_local_origin_through(gw, cust):
    """The README's local case: an origin on 127.0.0.3 is refused, the hint's command is
    run as written, and the same request then reaches it."""
    local = Origin(host="127.0.0.3")
    proxies = {"http": gw.proxy(cust[1], cust[2])}
    try:
        r = requests.get(local.url("/hello"), proxies=proxies, timeout=10)
        assert r.status_code == 403
        hint = r.json()["error"]["details"]["hint"]
        assert hint == "datorus policy allow 127.0.0.3/32"
        cmd = hint.split()
        assert cmd[0] == "datorus"
        cli(gw.db, *cmd[1:])
        r = wait_until(
            lambda: (
                (x := requests.get(local.url("/hello"), proxies=proxies, timeout=10)).status_code
                == 200
                and x
            ),
            5,
            0.1,
            "the allow rule live",
        )
        assert r.text == "hello from origin"
        assert local.seen[-1]["path"] == "/hello"
    finally:
        cli(gw.db, "policy", "remove", "allow", "127.0.0.3/32", check=False)
        local.close()
