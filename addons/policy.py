"""Acceptable use: deny destinations before anything is sent upstream.

The host is judged as the gateway will connect to it: an IP literal in any
spelling is parsed to the address it means; a name is normalised, checked against
domain rules, resolved once, every address checked, and the request is then pinned
to the checked address (``request.data.host``, which leaves the Host header as the
client sent it), so DNS rebinding has no window. The gateway's own sockets are
always denied: no proxy loops. Denials are recorded in ``aup_denials``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import cast

from mitmproxy import ctx, http

from datorus_core.envelope import DatorusError
from datorus_core.listeners import gateway_sockets, proxy_addresses
from datorus_core.policy import (
    Denial,
    Policy,
    denial_hint,
    normalize_hostname,
    parse_ip_literal,
    parse_rule,
)

from .context import FlowCtx, Gateway, flow_ctx

log = logging.getLogger("datorus")

_DNS_TTL = 30.0
_DNS_MAX = 10_000


def own_sockets(settings: dict) -> list[tuple[str, int]]:
    """Every socket this gateway listens on (``datorus_core.listeners.gateway_sockets``):
    its proxy modes as mitmproxy's options give them, and the settings' SOCKS5 entry,
    REST API and ``/metrics``."""
    host, port, modes = "", None, ["regular"]
    with contextlib.suppress(Exception):  # outside a running mitmproxy (unit tests)
        host, port = ctx.options.listen_host or "", ctx.options.listen_port
        modes = list(ctx.options.mode)
    try:
        proxy = proxy_addresses(modes, host, port)
    except ValueError:  # mitmproxy refuses such a mode itself
        proxy = [(host, port or 8080)]
    return gateway_sockets(settings, proxy, host)


class AcceptableUse:
    """Apply the policy to every forward request and CONNECT."""

    name = "datorus_policy"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.policy = Policy()
        self.dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self.denials: list[tuple] = []
        self.flusher: asyncio.Task | None = None

    # -- configuration -----------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        if updated & {
            "datorus_allow",
            "datorus_deny",
            "datorus_deny_ports",
            "listen_host",
            "listen_port",
            "datorus_api_port",
            "datorus_api_host",
            "datorus_socks5_port",
            "datorus_metrics_port",
            "datorus_metrics_host",
            "mode",
        }:
            self.rebuild(self.gw.runtime)

    def rebuild(self, rt) -> None:
        """Build the policy from the settings and the ledger's rules."""
        s = self.gw.settings
        if "allow" not in s:
            return
        allow, deny = [], []
        for spec in s["allow"]:
            allow.append(parse_rule(spec, allow_domains=False))
        for spec in s["deny"]:
            deny.append(parse_rule(spec, allow_domains=True))
        for action, target, port in rt.policy_rules:
            (allow if action == "allow" else deny).append((target, port))
        own = own_sockets(s)
        local: list[str] = []
        with contextlib.suppress(OSError):
            # an IPv4/IPv6 sockaddr's first item is the address string
            local = [cast(str, ai[4][0]) for ai in socket.getaddrinfo(socket.gethostname(), None)]
        self.policy = Policy(
            allow=allow,
            deny=deny,
            deny_ports=[int(p) for p in s["deny_ports"]],
            own_sockets=own,
            local_addresses=local,
        )

    def running(self) -> None:
        self.flusher = asyncio.get_running_loop().create_task(self._flush_denials())

    async def _flush_denials(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.denials and self.gw.ledger is not None:
                rows, self.denials = self.denials, []
                try:
                    await self.gw.ledger.record_denials(rows)
                except Exception as e:  # the record is best effort; traffic is not
                    log.warning("datorus: could not record %d denials: %s", len(rows), e)

    # -- hooks -------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow):
        return self._check(flow)

    def http_connect(self, flow: http.HTTPFlow):
        return self._check(flow)

    def _check(self, flow: http.HTTPFlow):
        fc = flow_ctx(flow)
        if flow.response is not None or fc is None or fc.cred is None:
            return None
        host, port = flow.request.host, flow.request.port
        ip = parse_ip_literal(host)
        if ip is not None:
            self._judge(flow, fc, [str(ip)], port, host)
            return None
        try:
            name = normalize_hostname(host)
        except ValueError as e:
            self.gw.reject(
                flow,
                fc,
                DatorusError("VALIDATION_ERROR", details={"field": "host", "reason": str(e)}),
            )
            return None
        denial = self.policy.check_name(name, port)
        if denial is not None:
            self._deny(flow, fc, denial, host, port)
            return None
        cached = self.dns.get((name, port))
        if cached is not None and cached[0] > time.monotonic():
            self._judge(flow, fc, cached[1], port, host)
            return None
        return self._resolve_and_judge(flow, fc, name, port, host)

    async def _resolve_and_judge(self, flow, fc: FlowCtx, name: str, port: int, host: str):
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                name, port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError) as e:
            self.gw.reject(
                flow,
                fc,
                DatorusError(
                    "UPSTREAM_FAILED",
                    details={"reason": "dns_resolution_failed", "host": host, "error": str(e)},
                ),
            )
            return
        addrs = list(dict.fromkeys(cast(str, ai[4][0]) for ai in infos))
        if len(self.dns) > _DNS_MAX:
            self.dns.clear()
        self.dns[(name, port)] = (time.monotonic() + _DNS_TTL, addrs)
        self._judge(flow, fc, addrs, port, host)

    def _judge(self, flow, fc: FlowCtx, addrs: list[str], port: int, host: str) -> None:
        sockname = flow.client_conn.sockname
        for a in addrs:
            if sockname and a == sockname[0] and port == sockname[1]:
                self._deny(flow, fc, Denial("gateway_self", a), host, port)
                return
        denial = self.policy.check_addresses(addrs, port)
        if denial is not None:
            self._deny(flow, fc, denial, host, port)
            return
        flow.request.data.host = addrs[0]

    def _deny(self, flow, fc: FlowCtx, denial: Denial, host: str, port: int) -> None:
        details = {"rule": denial.rule, "host": host, "port": port}
        hint = denial_hint(denial, port)
        if hint is not None:
            details["hint"] = hint  # the operator command that would let it through
        self.gw.reject(flow, fc, DatorusError("AUP_VIOLATION", details=details))
        self.denials.append((fc.account.id if fc.account else None, host, port, denial.rule))
        if len(self.denials) > 10_000:
            del self.denials[:5_000]
