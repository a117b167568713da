"""Allow-listed client addresses: in without credentials, as a credential (CONTRACT section 2).

``datorus credential allow-ip USERNAME CIDR`` (and the API's
``/account/credentials/{id}/allowed-ips``) lets requests from those client addresses in
without ``Proxy-Authorization``, or with the SOCKS5 "no authentication" method, as that
credential; a request that carries credentials is judged by them; the most specific CIDR
wins; an exact duplicate is ``400 VALIDATION_ERROR`` on ``cidr``. The clients bind
addresses of 127.0.1.0/24 so that the tests' own probes from 127.0.0.1 stay unlisted.

The gateway tells clients apart by their address: behind the test balancer
(``DATORUS_GATEWAY_NODES``) every client is the balancer, so these tests hold for one node.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from api_helpers import assert_api_error, bearer
from checks import assert_envelope
from support.clients import basic, read_response
from support.ledger import cli
from support.processes import GatewaySetup
from support.socks5 import http_get_through, socks5_connect
from support.waiting import free_port, wait_until

from datorus_core import socks

pytestmark = pytest.mark.one_node


@pytest.fixture(scope="module")
def gw_setup() -> GatewaySetup:
    return GatewaySetup({"socks5_port": free_port()}, api=True)


def forward_from(gw, source: str, url: str, auth: str | None = None) -> tuple[int, dict, bytes]:
    """A forward GET of *url* from client address *source*, with or without credentials."""
    host = url.split("/")[2]
    with socket.create_connection(("127.0.0.1", gw.port), 10, source_address=(source, 0)) as s:
        extra = f"Proxy-Authorization: {auth}\r\n" if auth else ""
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        return read_response(s)


# a request no one is billed for: refused by acceptable use (port 25) once authenticated
_PROBE = b"GET http://127.0.0.1:25/ HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n"


def wait_listed(gw, source: str, listed: bool = True) -> None:
    """Wait until every process serving the port lets *source* in (403 to the probe) or
    not (407): each ``datorus serve`` worker reads operator changes itself."""
    want = 403 if listed else 407
    gw.each_worker(_PROBE, lambda answer: answer[0] == want, 10, source=source)


def test_allow_ip_lets_a_forward_request_in_without_credentials(gw, origin):
    acc, user, _ = gw.customer(trial_bytes=10**12)
    url = origin.url("/allow-forward")
    status, headers, body = forward_from(gw, "127.0.1.2", url)
    err = assert_envelope(status, headers, body, "INVALID_CREDENTIAL", 407)
    assert err["details"]["reason"] == "missing"
    entry = gw.cli("credential", "allow-ip", user, "127.0.1.2/32")
    assert entry["cidr"] == "127.0.1.2/32" and entry["username"] == user
    # operator changes reach the running gateway within 2 s (refresh_ms 200 here)
    wait_listed(gw, "127.0.1.2")
    status, headers, body = forward_from(gw, "127.0.1.2", url)
    assert body == b"hello from origin" and "x-datorus-ratelimit-limit" in headers
    # another address is still refused; the entry shows in credential list
    assert forward_from(gw, "127.0.1.3", url)[0] == 407
    listed = gw.cli("credential", "list", str(acc))["items"]
    assert listed[0]["allowedIps"] == ["127.0.1.2/32"]
    # billed to the credential's account
    wait_until(lambda: gw.cli("usage", str(acc))["requests"] == 1, 5, 0.05, "billed to it")
    # deny-ip takes it back
    gw.cli("credential", "deny-ip", user, "127.0.1.2/32")
    wait_listed(gw, "127.0.1.2", listed=False)


def test_curl_without_credentials_from_an_allow_listed_address(gw, origin, tls_origin, ca_file):
    acc, user, _ = gw.customer(trial_bytes=10**12)
    gw.cli("credential", "allow-ip", user, "127.0.1.4/32")

    def curl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--interface", "127.0.1.4", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    wait_listed(gw, "127.0.1.4")
    r = curl("-x", gw.url, origin.url("/"))
    assert r.stdout == "hello from origin", r.stderr
    # a CONNECT tunnel, and the SOCKS5 entry with no credentials at all
    r = curl("-x", gw.url, "--cacert", ca_file, f"https://127.0.0.1:{tls_origin.port}/")
    assert r.stdout == "hello from origin", r.stderr
    r = curl("--socks5-hostname", f"127.0.0.1:{gw.socks_port}", origin.url("/"))
    assert r.stdout == "hello from origin", r.stderr


def test_socks5_no_auth_from_a_listed_address_runs_as_the_credential(gw, origin):
    acc, user, pw = gw.customer(trial_bytes=10**12)
    gw.cli("credential", "allow-ip", user, "127.0.1.6/32")
    wait_listed(gw, "127.0.1.6")
    a = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, source="127.0.1.6")
    assert (a.method, a.reply) == (socks.NO_AUTH, socks.SUCCEEDED)
    assert http_get_through(a, "127.0.0.1", "/socks-allowed")[0] == 200
    a.close()
    wait_until(lambda: gw.cli("usage", str(acc))["requests"] == 1, 5, 0.05, "billed to it")
    # an unlisted address offering only "no authentication": 0xFF
    a = socks5_connect(gw.socks_port, "127.0.0.1", origin.port, source="127.0.1.7")
    assert a.method == socks.NO_ACCEPTABLE
    # a listed client that offers credentials too is judged by them
    a = socks5_connect(
        gw.socks_port, "127.0.0.1", origin.port, user, pw + "x", b"\x00\x02", source="127.0.1.6"
    )
    assert (a.method, a.auth_status) == (socks.USER_PASSWORD, 0x01)


def test_credentials_from_a_listed_address_are_judged_by_them(gw, origin):
    _, user_a, _ = gw.customer(trial_bytes=10**12)
    acc_b, user_b, pw_b = gw.customer(trial_bytes=10**12)
    gw.cli("credential", "allow-ip", user_a, "127.0.1.8/32")
    url = origin.url("/judged")
    wait_listed(gw, "127.0.1.8")
    status, headers, body = forward_from(gw, "127.0.1.8", url, basic(user_a, "wrong"))
    err = assert_envelope(status, headers, body, "INVALID_CREDENTIAL", 407)
    assert err["details"]["reason"] == "invalid"
    before = gw.cli("usage", str(acc_b))["requests"]
    assert forward_from(gw, "127.0.1.8", url, basic(user_b, pw_b))[0] == 200
    wait_until(
        lambda: gw.cli("usage", str(acc_b))["requests"] == before + 1 or None, 5, 0.05, "B billed"
    )


def test_the_most_specific_cidr_wins(gw, origin):
    acc_wide, wide, _ = gw.customer(trial_bytes=10**12)
    acc_narrow, narrow, _ = gw.customer(trial_bytes=10**12)
    gw.cli("credential", "allow-ip", narrow, "127.0.2.8/29")
    gw.cli("credential", "allow-ip", wide, "127.0.2.0/24")
    url = origin.url("/specific")
    # the /24 live means the /29, added first, is live too
    wait_listed(gw, "127.0.2.20")
    for source in ("127.0.2.9", "127.0.2.15", "127.0.2.20", "127.0.2.30"):
        assert forward_from(gw, source, url)[0] == 200

    def billed() -> bool:
        narrow_n = gw.cli("usage", str(acc_narrow))["requests"]
        wide_n = gw.cli("usage", str(acc_wide))["requests"]
        return (narrow_n, wide_n) == (2, 2)

    wait_until(billed, 10, 0.05, ".9 and .15 billed to the /29, .20 and .30 to the /24")


def test_suspended_or_revoked_allow_listed_credentials(gw, origin):
    acc, user, _ = gw.customer(trial_bytes=10**12)
    gw.cli("credential", "allow-ip", user, "127.0.1.10/32")
    url = origin.url("/suspended")
    wait_listed(gw, "127.0.1.10")
    assert forward_from(gw, "127.0.1.10", url)[0] == 200
    gw.cli("account", "suspend", str(acc))
    gw.each_worker(
        f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        lambda answer: b"ACCOUNT_SUSPENDED" in answer[2],
        10,
        source="127.0.1.10",
    )
    status, headers, body = forward_from(gw, "127.0.1.10", url)
    assert_envelope(status, headers, body, "ACCOUNT_SUSPENDED", 403)
    gw.cli("account", "unsuspend", str(acc))
    gw.cli("credential", "revoke", user)
    wait_listed(gw, "127.0.1.10", listed=False)


# -- the CLI --------------------------------------------------------------------------------


def test_cli_refuses_duplicates_bad_cidrs_and_unknown_credentials(gw):
    _, user_a, _ = gw.customer(trial_bytes=10**9)
    _, user_b, _ = gw.customer(trial_bytes=10**9)
    gw.cli("credential", "allow-ip", user_a, "198.51.100.0/24")
    for who, cidr, field_or_code in (
        (user_b, "198.51.100.0/24", "cidr"),  # listed already, by another account
        (user_a, "198.51.100.7/24", "cidr"),  # host bits set
        (user_a, "not-a-cidr", "cidr"),
        ("dtnosuchuser9", "192.0.2.0/24", "RESOURCE_NOT_FOUND"),
    ):
        p = subprocess.run(
            [*_cli_base(gw), "credential", "allow-ip", who, cidr],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 1 and not p.stdout
        err = json.loads(p.stderr)["error"]
        if field_or_code == "cidr":
            assert err["code"] == "VALIDATION_ERROR" and err["details"]["field"] == "cidr", err
        else:
            assert err["code"] == field_or_code
    p = subprocess.run(
        [*_cli_base(gw), "credential", "deny-ip", user_a, "203.0.113.0/24"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and json.loads(p.stderr)["error"]["code"] == "RESOURCE_NOT_FOUND"
    out = gw.cli("credential", "deny-ip", user_a, "198.51.100.0/24")
    assert out == {"username": user_a, "cidr": "198.51.100.0/24", "removed": True}


def _cli_base(gw) -> list[str]:
    from support.paths import DATORUS

    return [DATORUS, "--db", str(gw.db), "--json"]


# -- the REST API ---------------------------------------------------------------------------


def test_api_allowed_ips_crud(gw, origin):
    acc, user, _ = gw.customer(trial_bytes=10**12)
    key = cli(gw.db, "key", "create", str(acc))["key"]
    cred_id = gw.cli("credential", "list", str(acc))["items"][0]["id"]
    base = f"{gw.api_url}/account/credentials/{cred_id}/allowed-ips"
    h = bearer(key)
    r = httpx.post(base, json={"cidr": "127.0.1.12"}, headers=h, timeout=30)
    assert r.status_code == 201, r.text
    entry = r.json()
    assert entry["cidr"] == "127.0.1.12/32" and entry["username"] == user
    assert entry["credential_id"] == cred_id
    url = origin.url("/api-allowed")
    wait_listed(gw, "127.0.1.12")
    assert forward_from(gw, "127.0.1.12", url)[0] == 200
    # the same CIDR again, from any account: 400 on cidr
    err = assert_api_error(
        httpx.post(base, json={"cidr": "127.0.1.12/32"}, headers=h, timeout=30),
        400,
        "VALIDATION_ERROR",
    )
    assert err["details"]["field"] == "cidr"
    err = assert_api_error(
        httpx.post(base, json={"cidr": "127.0.1.999"}, headers=h, timeout=30),
        400,
        "VALIDATION_ERROR",
    )
    assert err["details"]["field"] == "cidr"
    listed = httpx.get(base, headers=h, timeout=30).json()
    assert [i["cidr"] for i in listed["items"]] == ["127.0.1.12/32"]
    assert listed["total_count"] == 1 and listed["next_cursor"] is None
    # another account's credential does not exist for this key
    other_acc, other_user, _ = gw.customer(trial_bytes=10**9)
    other = f"{gw.api_url}/account/credentials/{other_user}/allowed-ips"
    assert_api_error(
        httpx.post(other, json={"cidr": "192.0.2.0/24"}, headers=h, timeout=30),
        404,
        "RESOURCE_NOT_FOUND",
    )
    r = httpx.delete(f"{base}/{entry['id']}", headers=h, timeout=30)
    assert r.status_code == 200 and r.json() == {"id": entry["id"], "removed": True}
    wait_listed(gw, "127.0.1.12", listed=False)
    assert_api_error(
        httpx.delete(f"{base}/{entry['id']}", headers=h, timeout=30), 404, "RESOURCE_NOT_FOUND"
    )
    # by username and ?cidr= as well
    byname = f"{gw.api_url}/account/credentials/{user}/allowed-ips"
    assert httpx.post(byname, json={"cidr": "2001:db8::/48"}, headers=h, timeout=30).is_success
    r = httpx.delete(byname, params={"cidr": "2001:db8::/48"}, headers=h, timeout=30)
    assert r.status_code == 200 and r.json()["removed"] is True
    assert httpx.get(byname, headers=h, timeout=30).json()["items"] == []


def test_a_revoked_credentials_cidr_is_free_again(gw, origin):
    """Revoking a credential removes its allow-listed addresses with it: the CIDR (unique
    across credentials) can be listed for another credential at once, by the CLI and by
    the API of another account (probe 8, item 2)."""
    acc, user, _ = gw.customer(trial_bytes=10**12)
    gw.cli("credential", "allow-ip", user, "127.0.1.20/32")
    wait_listed(gw, "127.0.1.20")
    out = gw.cli("credential", "revoke", user)
    assert out == {"username": user, "revoked": True}
    wait_listed(gw, "127.0.1.20", listed=False)
    # deny-ip on the revoked credential: there is nothing left to remove
    p = subprocess.run(
        [*_cli_base(gw), "credential", "deny-ip", user, "127.0.1.20/32"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and json.loads(p.stderr)["error"]["code"] == "RESOURCE_NOT_FOUND"
    other = gw.cli("credential", "create", str(acc))["username"]
    entry = gw.cli("credential", "allow-ip", other, "127.0.1.20/32")
    assert entry["username"] == other and entry["cidr"] == "127.0.1.20/32"
    wait_listed(gw, "127.0.1.20")
    assert forward_from(gw, "127.0.1.20", origin.url("/freed"))[2] == b"hello from origin"
    gw.cli("credential", "deny-ip", other, "127.0.1.20/32")
    wait_listed(gw, "127.0.1.20", listed=False)
    # the API's revocation frees a CIDR for another account's credential the same way
    key = cli(gw.db, "key", "create", str(acc))["key"]
    r = httpx.post(
        f"{gw.api_url}/account/credentials/{other}/allowed-ips",
        json={"cidr": "198.51.100.64/26"},
        headers=bearer(key),
        timeout=30,
    )
    assert r.status_code == 201, r.text
    r = httpx.delete(f"{gw.api_url}/account/credentials/{other}", headers=bearer(key), timeout=30)
    assert r.status_code == 200 and r.json()["revoked"] is True
    _, third, _ = gw.customer(trial_bytes=10**9)
    assert gw.cli("credential", "allow-ip", third, "198.51.100.64/26")["username"] == third


def test_allowed_ip_entry_ids_are_never_reused(gw):
    """Deleting the newest entry does not hand its id to the next one: a replayed DELETE by
    id is a 404, not the removal of another range (probe 8, item 18)."""
    acc, user, _ = gw.customer(trial_bytes=10**9)
    key = cli(gw.db, "key", "create", str(acc))["key"]
    base = f"{gw.api_url}/account/credentials/{user}/allowed-ips"
    h = bearer(key)
    first = httpx.post(base, json={"cidr": "203.0.113.8/29"}, headers=h, timeout=30).json()
    newest = httpx.post(base, json={"cidr": "203.0.113.16/29"}, headers=h, timeout=30).json()
    r = httpx.delete(f"{base}/{newest['id']}", headers=h, timeout=30)
    assert r.status_code == 200 and r.json() == {"id": newest["id"], "removed": True}
    r = httpx.post(base, json={"cidr": "203.0.113.24/29"}, headers=h, timeout=30)
    assert r.status_code == 201 and r.json()["id"] > newest["id"] > first["id"]
    err = assert_api_error(
        httpx.delete(f"{base}/{newest['id']}", headers=h, timeout=30), 404, "RESOURCE_NOT_FOUND"
    )
    assert err["details"] == {"allowedIpId": newest["id"]}
    listed = httpx.get(base, headers=h, timeout=30).json()["items"]
    assert [i["cidr"] for i in listed] == ["203.0.113.8/29", "203.0.113.24/29"]


# -- a browser: Chromium sends no SOCKS5 credentials ---------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="chromium is not installed (scripts/test installs it)"
)
def test_chromium_through_the_socks5_entry_from_an_allow_listed_address(make_gateway, origin):
    from playwright.sync_api import sync_playwright

    g = make_gateway(socks5_port=free_port())
    acc, user, _ = g.customer(trial_bytes=10**12)
    g.cli("credential", "allow-ip", user, "127.0.0.1/32")  # the browser's address
    g.each_worker(_PROBE, lambda answer: answer[0] == 403, 10)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            # Chromium never sends loopback through a proxy unless told to
            proxy={"server": f"socks5://127.0.0.1:{g.socks_port}", "bypass": "<-loopback>"},
        )
        try:
            page = browser.new_page()
            r = page.goto(origin.url("/through-chromium"), timeout=20_000)
            assert r is not None and r.status == 200
            assert "hello from origin" in page.content()
        finally:
            browser.close()
    assert any(s["path"] == "/through-chromium" for s in origin.seen)
    wait_until(lambda: g.cli("usage", str(acc))["requests"] >= 1, 5, 0.05, "billed to it")
