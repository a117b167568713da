"""The gateway runs with the lean hook dispatch (addons/lean.py), and without it on request.

The behaviour on the wire is what tests/e2e/test_gateway_core.py checks with lean on;
these tests check that the real gateway installs it, and that ``datorus_lean=false``
gives mitmproxy's own dispatch and still forwards.
"""

from __future__ import annotations

import requests
from support.waiting import wait_until

LEAN_LINE = "datorus: lean dispatch on;"


def test_gateway_leaves_idle_mitmproxy_addons_out(gateway, customer, origin):
    _, user, pw = customer
    r = requests.get(origin.url("/hello"), proxies={"http": gateway.proxy(user, pw)}, timeout=10)
    assert r.status_code == 200
    assert r.text == "hello from origin"
    line = wait_until(
        lambda: next((x for x in gateway.log.read_text().splitlines() if LEAN_LINE in x), None),
        what="the lean dispatch log line",
    )
    for dropped in ("ProxyAuth", "Onboarding", "MapLocal", "Save"):
        assert dropped in line
    for kept in ("Proxyserver", "NextLayer", "TlsConfig", "ScriptLoader"):
        assert kept not in line


def test_lean_false_keeps_mitmproxy_dispatch_and_forwards(make_gateway, origin):
    gw = make_gateway(lean="false")
    _, user, pw = gw.customer(trial_bytes=10**9)
    r = requests.get(origin.url("/hello"), proxies={"http": gw.proxy(user, pw)}, timeout=10)
    assert r.status_code == 200
    assert r.text == "hello from origin"
    assert LEAN_LINE not in gw.log.read_text()
