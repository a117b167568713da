"""Which found proxies the pool may take: the acceptable-use policy's address denials.

A list is written by someone else. A proxy it names at a loopback, private, link-local
or cloud-metadata address would make the gateway (its checks, then customer traffic)
connect inside the operator's own network: server-side request forgery by list. So a
scrape judges every found proxy's address with the built-in denials of
``datorus_core.policy`` before it is imported, and skips (and counts) those denied.

The operator may allow ranges with the ``source_proxy_allow`` setting (CIDR[:PORT]
each, e.g. ``10.8.0.0/16`` for a provider reached over a VPN, or ``127.0.0.0/8`` for
local test proxies); the gateway's destination ``allow`` rules do not apply here. A
proxy named by host name is resolved (every address must pass); one that does not
resolve is skipped too, as denied.

>>> p = found_proxy_policy({})
>>> denial(p, "127.0.0.1", 8080), denial(p, "169.254.169.254", 80), denial(p, "192.0.2.1", 80)
('loopback', 'link_local', None)
>>> denial(found_proxy_policy({"source_proxy_allow": ["127.0.0.0/8"]}), "127.0.0.1", 8080)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..policy import Policy, classify_host, parse_rule
from .found import FoundProxy

SETTING = "source_proxy_allow"
RESOLVE_AT_ONCE = 16  # host names resolved at once
RESOLVE_SECONDS = 5.0  # a name that takes longer is skipped


def allow_rules(values: Iterable[str]) -> list[tuple[str, int | None]]:
    """The ``source_proxy_allow`` values as policy rules; ValueError for one that is no
    CIDR[:PORT] (the setting's check uses it: a bad value stops the start)."""
    return [parse_rule(v, allow_domains=False) for v in values]


def found_proxy_policy(settings: Mapping[str, Any]) -> Policy:
    """The policy found proxies are judged by: the built-in denials, with the operator's
    ``source_proxy_allow`` ranges allowed; no port is denied (a proxy port is no mail)."""
    return Policy(allow_rules(settings.get(SETTING) or ()), deny_ports=())


def denial(policy: Policy, host: str, port: int) -> str | None:
    """Why a proxy at the IP literal or name *host* is denied before resolving it (the
    rule's label), or None."""
    h = classify_host(host)
    found = policy.check_name(h, port) if isinstance(h, str) else policy.check_address(h, port)
    return None if found is None else found.rule


async def _resolved_denial(policy: Policy, host: str, port: int, gate: asyncio.Semaphore) -> bool:
    async with gate:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
                RESOLVE_SECONDS,
            )
        except (OSError, TimeoutError, UnicodeError):
            return True  # unresolvable now: not taken
    addresses = {str(info[4][0]).split("%", 1)[0] for info in infos}
    return not addresses or policy.check_addresses(addresses, port) is not None


def _judge_literals(
    proxies: Sequence[FoundProxy], policy: Policy
) -> tuple[dict[int, bool], list[int]]:
    """Denied or not (by index) for every proxy the policy can judge before resolving;
    the indexes of the names left to resolve."""
    verdict: dict[int, bool] = {}
    names: list[int] = []
    for i, p in enumerate(proxies):
        h = classify_host(p.host)
        if isinstance(h, str):
            if policy.check_name(h, p.port) is not None:
                verdict[i] = True
            else:
                names.append(i)
        else:
            verdict[i] = policy.check_address(h, p.port) is not None
    return verdict, names


async def screen(proxies: Sequence[FoundProxy], policy: Policy) -> tuple[list[FoundProxy], int]:
    """The proxies the pool may take, in their order, and how many were denied (the
    addresses judged in a worker thread: a list of 10,000 keeps the event loop free)."""
    verdict, names = await asyncio.to_thread(_judge_literals, proxies, policy)
    if names:
        gate = asyncio.Semaphore(RESOLVE_AT_ONCE)
        found = await asyncio.gather(
            *(_resolved_denial(policy, proxies[i].host, proxies[i].port, gate) for i in names)
        )
        verdict.update(zip(names, found, strict=True))
    kept = [p for i, p in enumerate(proxies) if not verdict[i]]
    return kept, len(proxies) - len(kept)
