"""Whether a webhook's URL may be a delivery target: the acceptable-use policy, as for
any destination the gateway reaches (the operator's rules and settings, the built-in
ranges, the gateway's own sockets). Checked when a webhook or notifier is added; the
delivery checks again, against the live policy, at each attempt.

Blocking (it resolves the name): from a worker thread or the CLI, never an event loop.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from ..envelope import DatorusError, validation_error
from ..ledger import Ledger
from ..ledger.policy_rules import list_policy_rules
from ..listeners import gateway_sockets
from ..policy import Denial, Policy, normalize_hostname, parse_ip_literal, parse_rule


def policy_for(db: Ledger, settings: dict[str, Any], own: Iterable[tuple[str, int]] = ()) -> Policy:
    """The acceptable-use policy from *settings* and the ledger's rules; *own* are the
    gateway's proxy sockets where known, to which the settings add its other listeners
    (``listeners.gateway_sockets``): all always denied."""
    allow = [parse_rule(s, allow_domains=False) for s in settings.get("allow") or ()]
    deny = [parse_rule(s, allow_domains=True) for s in settings.get("deny") or ()]
    for r in list_policy_rules(db):
        (allow if r["action"] == "allow" else deny).append((r["target"], r["port"]))
    sockets = gateway_sockets(settings, own)
    return Policy(
        allow=allow,
        deny=deny,
        deny_ports=[int(p) for p in settings.get("deny_ports") or (25,)],
        own_sockets=sockets,
    )


def denial_of(policy: Policy, url: str) -> tuple[Denial | None, str]:
    """Why *url*'s host is denied (None: allowed), and the host."""
    try:
        u = urlsplit(url)
        host = u.hostname or ""
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError as e:
        raise validation_error("url", str(e)) from None
    ip = parse_ip_literal(host)
    if ip is not None:
        return policy.check_address(str(ip), port), host
    try:
        name = normalize_hostname(host)
    except ValueError as e:
        raise validation_error("url", f"bad host name: {e}") from None
    denial = policy.check_name(name, port)
    if denial is not None:
        return denial, host
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except OSError:
        return None, host  # not resolvable now: each delivery resolves and checks again
    return policy.check_addresses([str(i[4][0]) for i in infos], port), host


_ALLOWED = "use a public http(s) URL that the acceptable-use policy allows"


def target_hint(denial: Denial) -> str:
    """What a refused webhook target may be instead, for ``details.hint``.

    >>> hint = target_hint(Denial("link_local", "169.254.169.254"))
    >>> print(hint)  # doctest: +NORMALIZE_WHITESPACE
    Webhooks go to public http(s) destinations only: loopback, private, link-local
    (cloud metadata), CGNAT, unique-local, multicast and reserved addresses are refused
    unless the operator allows that range (datorus policy allow CIDR).
    >>> hint = target_hint(Denial("denied_port:25", "203.0.113.7"))
    >>> print(hint)  # doctest: +NORMALIZE_WHITESPACE
    Port 25 is denied by the operator; use a public http(s) URL that the acceptable-use
    policy allows.
    """
    rule = denial.rule
    if rule == "gateway_self":
        return f"A webhook cannot point at the gateway's own ports; {_ALLOWED}."
    if rule.startswith("denied_port:"):
        return f"Port {rule.partition(':')[2]} is denied by the operator; {_ALLOWED}."
    for prefix in ("denied_domain:", "denied_cidr:"):
        if rule.startswith(prefix):
            return f"The operator denies {rule[len(prefix) :]}; {_ALLOWED}."
    if rule == "invalid_port":
        return f"The port is not a valid TCP port; {_ALLOWED}."
    return (
        "Webhooks go to public http(s) destinations only: loopback, private, link-local"
        " (cloud metadata), CGNAT, unique-local, multicast and reserved addresses are"
        " refused unless the operator allows that range (datorus policy allow CIDR)."
    )


def check_target(policy: Policy, url: str) -> None:
    """403 ``AUP_VIOLATION`` (``details.rule``, ``details.host``, ``details.hint``: what
    may be a target instead) if *url* is denied."""
    denial, host = denial_of(policy, url)
    if denial is not None:
        raise DatorusError(
            "AUP_VIOLATION",
            message="This webhook URL is not an allowed destination.",
            details={
                "rule": denial.rule,
                "host": host,
                "field": "url",
                "hint": target_hint(denial),
            },
        )
