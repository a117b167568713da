"""The egress pool: kinds of way out, health per (egress, domain), weighted choice.

Pure state and decisions: no mitmproxy, no database handle, the clock passed in.

Kinds (the URL an operator adds):

- ``direct://`` the box's default route;
- ``direct://SOURCE_IP`` bind that local address (IPv4 or IPv6);
- ``direct://PREFIX/LEN`` bind an address from a prefix, one per sticky session
  (derived from the session key), a fresh one per request otherwise;
- ``http://[user:pass@]host:port`` an upstream HTTP proxy (the gateway sends
  ``CONNECT`` to it for every connection, tunnels and plain HTTP alike);
- ``socks4://[user@]host:port`` a SOCKS4 upstream (IPv4 targets only; the user is its
  USERID, a password is ignored: SOCKS4 has none);
- ``socks5://[user:pass@]host:port`` a SOCKS5 upstream (RFC 1928/1929).

Every egress has a status (:mod:`.egress_status`): ``unchecked`` until its checks pass,
``active`` while they do, ``dead`` after ``dead_after`` checks in a row failed; only an
active egress carries customer traffic.

Health has two levels. An egress as a whole is *down* after a failed check or a
failed connection, with a back-off that doubles per consecutive failure; it is
tried again when the back-off ends (self-recovery) and is up at the first success.
Per destination domain, a response judged blocked marks (egress, domain)
``limited`` (avoided while another egress is available) and, from the third
consecutive block, ``unavailable`` (never chosen), each time for a back-off that
doubles; a response that is not blocked clears the record.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import random
import re
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from .egress_status import ACTIVE, DEFAULT_DEAD_AFTER, Health, after_check

OK, LIMITED, UNAVAILABLE = "ok", "limited", "unavailable"
KINDS = ("direct", "http", "https", "socks4", "socks5")
# a country code: two ASCII letters. The one spelling of the rule: COUNTRY_RE for
# Python (fullmatch only: "$" passes "us\n"), COUNTRY_PATTERN for pydantic fields
# (whose regex engine anchors "$" at the very end)
_COUNTRY = "[A-Za-z]{2}"
COUNTRY_RE = re.compile(_COUNTRY)
COUNTRY_PATTERN = f"^{_COUNTRY}$"

# back-off of a blocked (egress, domain): limited for BASE, 2*BASE, then unavailable
# for 4*BASE, 8*BASE ... capped at MAX
BLOCK_BASE_SECONDS = 30.0
BLOCK_MAX_SECONDS = 3600.0
UNAVAILABLE_AFTER = 3
DOWN_BASE_SECONDS = 5.0
DOWN_MAX_SECONDS = 600.0
_MAX_DOMAINS_PER_EGRESS = 10_000


@dataclass(frozen=True, slots=True)
class EgressSpec:
    """A parsed egress URL."""

    kind: str  # direct | http | https | socks4 | socks5
    url: str
    host: str | None = None  # proxy host
    port: int | None = None  # proxy port
    username: str | None = None
    password: str | None = None
    source: str | None = None  # direct: one source address
    prefix: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None  # direct: a prefix

    @property
    def is_proxy(self) -> bool:
        """True for an upstream proxy (http, https, socks4, socks5)."""
        return self.kind != "direct"

    def public_url(self) -> str:
        """The URL with any password hidden (for lists and logs)."""
        if self.password is None:
            return self.url
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.kind}://{self.username}:***@{host}:{self.port}"

    @property
    def address(self) -> str | None:
        """The proxy's host, the source address or prefix; None for the default route."""
        if self.is_proxy:
            return self.host
        return self.source or (str(self.prefix) if self.prefix else None)

    def customer_url(self) -> str:
        """The URL without any credentials (for what customers see)."""
        if not self.is_proxy:
            return self.url
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}"


def parse_egress_url(url: str) -> EgressSpec:
    """Parse and validate an egress URL; raises ValueError saying what is wrong."""
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in KINDS:
        raise ValueError("must start with direct://, http://, https://, socks4:// or socks5://")
    if scheme == "direct":
        rest = rest[:-1] if rest.endswith("/") else rest
        if not rest:
            return EgressSpec("direct", "direct://")
        addr = rest.strip("[]")
        if "/" in addr:
            try:
                net = ipaddress.ip_network(addr, strict=False)
            except ValueError as e:
                raise ValueError(f"{rest!r} is not an address prefix") from e
            if net.num_addresses == 1:
                return EgressSpec("direct", f"direct://{net.network_address}", source=str(net[0]))
            return EgressSpec("direct", f"direct://{net}", prefix=net)
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError as e:
            raise ValueError(f"{rest!r} is not an IP address") from e
        return EgressSpec("direct", f"direct://{ip}", source=str(ip))
    u = urlsplit(url)
    if u.path not in ("", "/") or u.query or u.fragment:
        raise ValueError("a proxy URL is scheme://[user:pass@]host:port with nothing after")
    try:
        port = u.port
    except ValueError as e:
        raise ValueError("the port must be 1-65535") from e
    if not u.hostname or not port:
        raise ValueError("a proxy URL needs a host and a port")
    user = unquote(u.username) if u.username is not None else None
    pw = unquote(u.password) if u.password is not None else None
    if user is not None and pw is None:
        pw = ""
    if scheme == "socks4":  # a user id and no password: SOCKS4 has none
        pw = None
    host = u.hostname
    shown = f"[{host}]" if ":" in host else host
    auth = f"{u.username}:{u.password or ''}@" if user is not None else ""
    if scheme == "socks4" and user is not None:
        auth = f"{u.username}@"
    return EgressSpec(
        scheme, f"{scheme}://{auth}{shown}:{port}", host=host, port=port, username=user, password=pw
    )


def source_for(spec: EgressSpec, key: str | None, rng: random.Random | None = None) -> str | None:
    """The local address to bind for *spec*: fixed, derived from *key* in a prefix, or None."""
    if spec.source is not None:
        return spec.source
    if spec.prefix is None:
        return None
    net = spec.prefix
    size = net.num_addresses
    if key is not None:
        n = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    else:
        n = (rng or random).getrandbits(64)
    # skip the network (and, for IPv4, the broadcast) address when the prefix is wide
    usable = size - 2 if net.version == 4 and size > 2 else size
    offset = n % usable + (1 if net.version == 4 and size > 2 else 0)
    return str(net.network_address + offset)


@dataclass(slots=True)
class DomainHealth:
    """What one egress knows about one destination domain."""

    strikes: int = 0
    until: float = 0.0

    def state(self, now: float) -> str:
        """ok, limited or unavailable at *now* (a lapsed back-off recovers by itself)."""
        if now >= self.until:
            return OK
        return UNAVAILABLE if self.strikes >= UNAVAILABLE_AFTER else LIMITED


@dataclass(slots=True, eq=False)
class Egress:
    """One egress as the gateway sees it."""

    id: int
    spec: EgressSpec
    country: str | None = None
    weight: int = 1
    enabled: bool = True
    score: float = 0.5
    failures: int = 0  # consecutive failed checks or connections
    down_until: float = 0.0
    domains: dict[str, DomainHealth] = field(default_factory=dict)
    checks: int = 0
    passed: int = 0
    latency_ms: float | None = None
    exit_ip: str | None = None
    health: Health = field(default_factory=Health)  # unchecked / active / dead, by checks

    @property
    def status(self) -> str:
        """``unchecked``, ``active`` or ``dead`` (:mod:`.egress_status`)."""
        return self.health.status

    @property
    def family(self) -> int | None:
        """4 or 6 for a source address or prefix (it can only reach that family), 4 for a
        SOCKS4 upstream (its requests carry IPv4 addresses only), else None."""
        if self.spec.kind == "socks4":
            return 4
        if self.spec.source is not None:
            return 6 if ":" in self.spec.source else 4
        if self.spec.prefix is not None:
            return self.spec.prefix.version
        return None

    # -- whole-egress health -----------------------------------------------------------

    def up(self, now: float) -> bool:
        """Usable at *now*: enabled, active (its checks passed) and not within a back-off."""
        return self.enabled and self.health.status == ACTIVE and now >= self.down_until

    def failed(self, now: float) -> None:
        """A check or a connection through this egress failed: back off, doubling."""
        self.failures += 1
        delay = min(DOWN_BASE_SECONDS * 2 ** (self.failures - 1), DOWN_MAX_SECONDS)
        self.down_until = now + delay

    def succeeded(self) -> None:
        """A check or connection succeeded: up again at once."""
        self.failures = 0
        self.down_until = 0.0

    def record_check(
        self,
        ok: bool,
        latency_ms: float | None,
        now: float,
        dead_after: int = DEFAULT_DEAD_AFTER,
    ) -> Health:
        """Feed one background check into status, uptime, latency and score; returns the
        health it had before."""
        before = self.health
        self.health = after_check(before, ok, dead_after)
        self.checks += 1
        if ok:
            self.passed += 1
            self.succeeded()
            if latency_ms is not None:
                prev = self.latency_ms
                self.latency_ms = latency_ms if prev is None else 0.7 * prev + 0.3 * latency_ms
        else:
            self.failed(now)
        self.score = compute_score(self.uptime, self.latency_ms, ok)
        return before

    @property
    def uptime(self) -> float:
        """Share of passed checks in [0, 1] (1 before the first check)."""
        return self.passed / self.checks if self.checks else 1.0

    # -- per-domain health -------------------------------------------------------------

    def state_for(self, domain: str, now: float) -> str:
        """ok, limited or unavailable for *domain*."""
        h = self.domains.get(domain)
        return OK if h is None else h.state(now)

    def blocked(self, domain: str, now: float, base: float = BLOCK_BASE_SECONDS) -> str:
        """A response from *domain* through this egress looked blocked; returns the new state."""
        h = self.domains.get(domain)
        if h is None:
            if len(self.domains) >= _MAX_DOMAINS_PER_EGRESS:
                self._prune(now)
            h = self.domains[domain] = DomainHealth()
        h.strikes += 1
        delay = min(base * 2 ** (h.strikes - 1), max(BLOCK_MAX_SECONDS, base))
        h.until = now + delay
        return h.state(now)

    def adopt(self, domain: str, strikes: int, seconds: float, now: float) -> None:
        """Take another process's judgement of *domain*: blocked *strikes* times, for
        *seconds* from *now*; no strikes means unblocked."""
        if strikes <= 0:
            self.unblocked(domain)
            return
        h = self.domains.get(domain)
        if h is None:
            if len(self.domains) >= _MAX_DOMAINS_PER_EGRESS:
                self._prune(now)
            h = self.domains[domain] = DomainHealth()
        h.strikes = strikes
        h.until = now + seconds

    def unblocked(self, domain: str) -> None:
        """A normal response from *domain*: forget earlier blocks."""
        if domain in self.domains:
            del self.domains[domain]

    def _prune(self, now: float) -> None:
        for d in [d for d, h in self.domains.items() if h.until <= now]:
            del self.domains[d]
        if len(self.domains) >= _MAX_DOMAINS_PER_EGRESS:
            self.domains.clear()


def egress_from_row(row: tuple[Any, ...], spec: EgressSpec | None = None) -> Egress:
    """An :class:`Egress` from a ledger row ``(id, url, country, weight, enabled, score,
    status, streak)``; raises ValueError for a bad URL or status. *spec*: the row's URL
    already parsed (a reload of a big pool parses only the URLs it has not seen)."""
    eid, url, country, weight, enabled, score, status, streak = row
    if spec is None or spec.url != url:
        spec = parse_egress_url(url)
    return Egress(
        eid,
        spec,
        country,
        int(weight),
        bool(enabled),
        0.5 if score is None else score,
        health=Health(status or "unchecked", int(streak or 0)),
    )


def compute_score(uptime: float, latency_ms: float | None, last_ok: bool) -> float:
    """A score in [0, 1]: uptime weighted by latency (1 s halves it), 0 while failing."""
    if not last_ok:
        return 0.0
    speed = 1.0 if latency_ms is None else 1.0 / (1.0 + max(latency_ms, 0.0) / 1000.0)
    return max(0.0, min(1.0, uptime * (0.5 + 0.5 * speed)))


def weight(e: Egress) -> float:
    """An egress's share of the choice: its score (at least 0.02) times its weight.

    The one formula: the pool's sampling and the odds ``GET /debug/pick`` shows use it.

    >>> weight(Egress(1, parse_egress_url("direct://"), weight=3, score=0.5))
    1.5
    """
    return max(e.score, 0.02) * max(e.weight, 1)


class NoEgress(Exception):
    """No egress can carry the request; ``reason`` is a stable machine word."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


class Pool:
    """Every egress, and the weighted choice among the healthy ones.

    Choice is by score times weight, sampled with a binary search over cumulative
    weights (O(log n)); a sample that is down or excluded for the domain is drawn
    again a few times before a linear fallback, so a mostly healthy pool stays
    O(log n) per request.
    """

    def __init__(self, egress: list[Egress] | None = None) -> None:
        self.by_id: dict[int, Egress] = {}
        self._groups: dict[str | None, tuple[list[Egress], list[float]]] = {}
        self._enabled: dict[str | None, int] = {}  # enabled egress by country, any status
        self.replace(egress or [])

    def __len__(self) -> int:
        return len(self.by_id)

    def replace(self, egress: list[Egress]) -> None:
        """Load a new set of egress, keeping the health of those that stay."""
        old = self.by_id
        new: dict[int, Egress] = {}
        for e in egress:
            prev = old.get(e.id)
            if prev is not None and prev.spec == e.spec:
                for name in ("failures", "down_until", "domains", "checks", "passed"):
                    setattr(e, name, getattr(prev, name))
                e.latency_ms, e.exit_ip = prev.latency_ms, prev.exit_ip
                if prev.checks:  # this process checked it since: its own view is newer
                    e.score, e.health = prev.score, prev.health
            new[e.id] = e
        self.by_id = new
        self.reweigh()

    def reweigh(self) -> None:
        """Rebuild the cumulative weights (after a snapshot or a round of checks).

        Only enabled, active egress are weighed: a pool of thousands of unchecked or
        dead proxies costs a request nothing.
        """
        groups: dict[str | None, list[Egress]] = {None: []}
        enabled: dict[str | None, int] = {None: 0}
        for e in self.by_id.values():
            if not e.enabled:
                continue
            enabled[None] += 1
            if e.country:
                enabled[e.country] = enabled.get(e.country, 0) + 1
            if e.status != ACTIVE:
                continue
            groups[None].append(e)
            if e.country:
                groups.setdefault(e.country, []).append(e)
        self._enabled = enabled
        self._groups = {}
        for key, items in groups.items():
            cum: list[float] = []
            total = 0.0
            for e in items:
                total += weight(e)
                cum.append(total)
            self._groups[key] = (items, cum)

    def candidates(self, country: str | None) -> list[Egress]:
        """The enabled, active egress that match *country* (all of them for None)."""
        return self._groups.get(country.lower() if country else None, ([], []))[0]

    def usable(self, e: Egress, domain: str, now: float, family: int | None = None) -> bool:
        """True when *e* may carry a request for *domain* now (limited counts as usable)."""
        return (
            e.up(now)
            and e.state_for(domain, now) != UNAVAILABLE
            and (family is None or e.family in (None, family))
        )

    def pick(
        self,
        domain: str,
        country: str | None,
        now: float,
        rng: random.Random | None = None,
        avoid: int | None = None,
        family: int | None = None,
        exclude: Container[int] = (),
    ) -> Egress:
        """A healthy egress for *domain* and *country*, weighted by score; raises NoEgress.

        *family* (4 or 6, the target address's) leaves out source addresses of the other;
        *exclude* leaves out egress ids (those leased to someone).
        """
        chooser = rng or random  # no rng: the random module's shared generator
        key = country.lower() if country else None
        items, cum = self._groups.get(key, ([], []))
        if not items:
            if self._enabled.get(key):  # there are some, none active (unchecked or dead)
                raise NoEgress(
                    "no_healthy_egress",
                    domain=domain,
                    country=country,
                    family=family,
                    egress=self._enabled[key],
                )
            if country:
                raise NoEgress("no_egress_for_country", country=key)
            raise NoEgress("no_egress_enabled")
        total = cum[-1]

        def fine(e: Egress) -> bool:
            return self.usable(e, domain, now, family) and e.state_for(domain, now) == OK

        for _ in range(8):
            e = items[min(bisect.bisect_right(cum, chooser.random() * total), len(items) - 1)]
            if e.id != avoid and fine(e) and e.id not in exclude:
                return e
        items = [e for e in items if e.id not in exclude] if exclude else items
        ok = [e for e in items if fine(e) and e.id != avoid]
        if not ok:
            ok = [e for e in items if self.usable(e, domain, now, family) and e.id != avoid]
        if not ok:
            ok = [e for e in items if self.usable(e, domain, now, family)]
        if not ok:
            raise NoEgress(
                "no_healthy_egress",
                domain=domain,
                country=country,
                family=family,
                egress=len(items),
            )
        return chooser.choices(ok, [weight(e) for e in ok])[0]


def domain_health(
    pool: Pool, domain: str, now: float, leased: Container[int] = ()
) -> dict[str, Any]:
    """Seed 001's network health of *domain*: each egress's state for it, and a summary.

    The shape a ``GET /network/health/{domain}`` answer needs; ``retryAfterSeconds`` is
    when the first excluded egress comes back (None when one is available now).
    """
    rows: list[dict[str, Any]] = []
    for e in pool.by_id.values():
        h = e.domains.get(domain)
        state = OK if h is None else h.state(now)
        if e.status != ACTIVE:
            state = e.status  # unchecked or dead: its checks decide, no back-off to wait
        elif not e.up(now):
            state = UNAVAILABLE
        elif e.id in leased:
            state = "leased"  # exclusive to one account for now
        rows.append(
            {
                "id": e.id,
                "url": e.spec.customer_url(),
                "country": e.country,
                "enabled": e.enabled,
                "state": state if e.enabled else "disabled",
                "score": round(e.score, 3),
                "recoversInSeconds": (
                    round(max(h.until if h else 0.0, e.down_until) - now, 1)
                    if state in (LIMITED, UNAVAILABLE) and e.enabled
                    else None
                ),
            }
        )
    available = [r for r in rows if r["state"] == OK]
    waits = [r["recoversInSeconds"] for r in rows if r["recoversInSeconds"] is not None]
    return {
        "domain": domain,
        "available": len(available),
        "limited": sum(r["state"] == LIMITED for r in rows),
        "unavailable": sum(r["state"] == UNAVAILABLE for r in rows),
        "leased": sum(r["state"] == "leased" for r in rows),
        "retryAfterSeconds": None if available or not waits else max(1, int(min(waits) + 0.999)),
        "egress": rows,
    }


def find_marker(body: bytes, markers: tuple[bytes, ...]) -> bytes | None:
    """The first block-page marker found in *body* (case-insensitive), or None."""
    if not markers or not body:
        return None
    low = body.lower()
    for m in markers:
        if m in low:
            return m
    return None


def valid_country(value: str | None) -> bool:
    """A two-letter country code (the whole value: no trailing newline)."""
    if not value:
        return False
    return COUNTRY_RE.fullmatch(value) is not None
