"""The routing decision: which egress one request leaves by. Decided here, once.

Pure: no mitmproxy, no database handle; the clocks and the random generator are
passed in, and the state the decision reads (the pool and its block states, the
leases, the sticky sessions) comes through narrow views
(:class:`~datorus_core.egress.Pool`, :class:`~datorus_core.live.LeaseView`,
:data:`~datorus_core.live.SessionLookup`). :func:`choose` changes none of it: it
says whether the caller should pin the session (:attr:`Go.pin_session`).

Two callers: the proxy (``addons.egress.EgressRouter._route``, every request and
CONNECT) and the preview ``GET /debug/pick`` (``datorus_core.api.routes_routing``),
which passes a session lookup that keeps nothing alive and a copy of the gateway's
generator, so the preview is the draw the next request would make and the gateway's
own sequence is untouched.

The rules, in order:

1. a request naming a lease leaves by the leased egress, or is refused (404 when the
   account holds no live lease with that id, 502 when the egress cannot carry it);
2. a request the in-process API pinned to one egress (``POST /proxies/test``) leaves
   by it, or is refused (502) when it is down, of the other address family, or
   leased to someone else;
3. no pool configured: the box's default route (:func:`choose` returns None);
4. a live sticky session keeps its egress while that egress stays usable for the
   domain, matches the country and is not leased;
5. otherwise one weighted draw among the healthy egress (:meth:`Pool.pick`), leased
   egress left out; none left: 502 ``UPSTREAM_FAILED`` with ``details.reason``.
"""

from __future__ import annotations

import hmac
import random
from typing import NamedTuple

from .egress import OK, Egress, NoEgress, Pool, domain_health, source_for, weight
from .envelope import DatorusError
from .live import LeaseView, SessionLookup

__all__ = ["Ask", "Go", "chances", "choose", "vouch", "vouched"]


class Ask(NamedTuple):
    """What one request asks of routing, read from its headers and proxy username.

    (A NamedTuple, not a frozen dataclass: one is made per request, and a frozen
    dataclass costs several times as much to build.)
    """

    account_id: int
    domain: str  # the destination as the gateway keys it: lower case
    family: int | None = None  # 4 or 6: the target address's; None when not known
    session_id: str | None = None
    country: str | None = None  # lower case
    lease_id: str | None = None
    pin: int | None = None  # an egress id the in-process API vouched for


class Go(NamedTuple):
    """The decision: leave by *egress*, from *source* when it binds one."""

    egress: Egress
    source: str | None
    pinned: bool = False  # the live session's egress, kept
    pin_session: bool = False  # a fresh choice for a session: the caller pins it


def vouch(value: str, secret: str) -> str:
    """``SECRET:VALUE``: a header value only the holder of *secret* can make."""
    return f"{secret}:{value}"


def vouched(value: str | None, secret: str) -> str | None:
    """The VALUE of a ``SECRET:VALUE`` header :func:`vouch` made, else None.

    Only the REST API served by this process knows *secret* (the router's), so a proxy
    customer cannot pin an egress or stretch a timeout.

    >>> vouched(vouch("7", "s3cret"), "s3cret"), vouched("guess:7", "s3cret")
    ('7', None)
    """
    if not value:
        return None
    given, _, rest = value.partition(":")
    return rest if hmac.compare_digest(given.encode(), secret.encode()) else None


def _fits(e: Egress, family: int | None) -> bool:
    """Whether *e*'s source address (if any) can reach a target of *family*."""
    return family is None or e.family in (None, family)


def choose(
    ask: Ask,
    pool: Pool,
    leases: LeaseView,
    now: float,
    wall: float,
    rng: random.Random,
    session: SessionLookup | None = None,
) -> Go | None:
    """The egress *ask* leaves by (see the module's rules); None for the default route.

    *now* is the monotonic clock (health, blocks, sessions), *wall* Unix seconds
    (leases); *rng* is drawn from for the weighted choice and a prefix's per-request
    source address; *session* reads a live session's egress (None: sessions are not
    kept). Raises :class:`~datorus_core.envelope.DatorusError` for a refusal.
    """
    if ask.lease_id is not None:
        return _leased(ask, ask.lease_id, pool, leases, now, wall, rng)
    if ask.pin is not None:
        return _pinned_by_api(ask, ask.pin, pool, leases, now, wall, rng)
    if not pool.by_id:
        # no pool configured: the box's default route for everything (targeting is
        # not enforced: there is nothing to choose from)
        return None
    exclude = leases.leased_now(wall)
    sid = ask.session_id
    key = f"{ask.account_id}/{sid}" if sid else None
    if sid and session is not None:
        eid = session(ask.account_id, sid, now)
        e = pool.by_id.get(eid) if eid is not None else None
        if (
            e is not None
            and pool.usable(e, ask.domain, now, ask.family)
            and (ask.country is None or e.country == ask.country)
            and e.id not in exclude
        ):
            return Go(e, source_for(e.spec, key, rng), pinned=True)
        # no session, or its egress is unhealthy, leased or no longer matching: it moves
    try:
        e = pool.pick(ask.domain, ask.country, now, rng, family=ask.family, exclude=exclude)
    except NoEgress as x:
        details = {"reason": x.reason, **x.details}
        if x.reason == "no_healthy_egress":
            # seed 001's retry guidance: when the first excluded egress comes back
            health = domain_health(pool, ask.domain, now, exclude)
            details["retryAfterSeconds"] = health["retryAfterSeconds"]
        raise DatorusError(
            "UPSTREAM_FAILED",
            message="No healthy egress can reach this destination right now.",
            details=details,
        ) from None
    return Go(e, source_for(e.spec, key, rng), pin_session=bool(sid and session is not None))


def _leased(
    ask: Ask,
    lease_id: str,
    pool: Pool,
    leases: LeaseView,
    now: float,
    wall: float,
    rng: random.Random,
) -> Go:
    """A request naming a lease leaves by the leased egress, or is refused."""
    lease = leases.get(lease_id)
    if lease is None or lease.account_id != ask.account_id or not lease.live(wall):
        raise DatorusError(
            "RESOURCE_NOT_FOUND",
            message="This account holds no live lease with this id.",
            details={"lease": lease_id[:64]},
        )
    e = pool.by_id.get(lease.egress_id)
    if e is None or not e.up(now) or not _fits(e, ask.family):
        raise DatorusError(
            "UPSTREAM_FAILED",
            message="The leased egress cannot carry this request right now.",
            details={"reason": "leased_egress_unavailable", "lease": lease_id},
        )
    return Go(e, source_for(e.spec, f"lease/{lease_id}", rng))


def _pinned_by_api(
    ask: Ask,
    eid: int,
    pool: Pool,
    leases: LeaseView,
    now: float,
    wall: float,
    rng: random.Random,
) -> Go:
    """A request the in-process API pinned to one egress (``POST /proxies/test``)."""
    e = pool.by_id.get(eid)
    lease = leases.holder(eid)
    if (
        e is None
        or not e.up(now)
        or not _fits(e, ask.family)
        or (lease is not None and lease.live(wall) and lease.account_id != ask.account_id)
    ):
        raise DatorusError(
            "UPSTREAM_FAILED",
            message="This egress cannot carry the request right now.",
            details={"reason": "egress_unavailable", "egress": eid},
        )
    return Go(e, source_for(e.spec, None, rng))


def chances(
    pool: Pool,
    domain: str,
    country: str | None,
    now: float,
    family: int | None,
    exclude: frozenset[int],
) -> dict[int, float]:
    """Each candidate egress's chance (0 to 1) of a fresh weighted draw for *domain*.

    Those usable and not leased share the odds by :func:`~datorus_core.egress.weight`,
    the ones not limited for *domain* first (as :meth:`Pool.pick` prefers them).
    """
    candidates = pool.candidates(country)
    ok = [e for e in candidates if pool.usable(e, domain, now, family) and e.id not in exclude]
    fine = [e for e in ok if e.state_for(domain, now) == OK] or ok
    weights = {e.id: weight(e) for e in fine}
    total = sum(weights.values()) or 1.0
    return {e.id: weights.get(e.id, 0.0) / total for e in candidates}
