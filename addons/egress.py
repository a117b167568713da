"""Egress: each request leaves by the right way out, and keeps leaving by it per session.

Two addons:

- :class:`RouteOptions` runs *before* auth. It reads the routing options a client
  sent (``X-Datorus-Session-Id``, ``X-Datorus-Country``, seed 001's ``X-Geo``, and
  the same in the proxy username, ``USER[-country-CC][-session-ID]``), rewrites
  ``Proxy-Authorization`` to the bare credential for auth, and removes ``X-Geo``.
- :class:`EgressRouter` runs last. Per forward request and CONNECT it picks the
  egress (the session's, or a healthy one weighted by score: the decision is
  ``datorus_core.routing.choose``, the same the API's preview makes), binds the source
  address or opens the tunnel through the upstream proxy when mitmproxy opens the
  server connection, and judges responses for blocks. The egress checks run in the pool
  worker, a process of its own (``datorus_core.pool_worker``); the router's tick reads
  what they changed from the ledger (``LedgerLink.checked_since``, every
  :data:`CHECKED_SECONDS`) and applies it to the live pool.

Mechanism (*internal*, mitmproxy 12.2.3): ``server_connect`` gets no flow, so the
choice is kept per client connection (one request at a time on HTTP/1). A source
address is bound by setting ``server.sockname``. An upstream proxy is reached by
pointing ``server.address`` at the proxy and running the CONNECT (or SOCKS5)
handshake in ``server_connected``, before mitmproxy uses the connection, so tunnels
and plain HTTP go the same way and the customer's ``Proxy-Authorization`` never
leaves. mitmproxy reuses server connections per client connection by address, not
by egress: before a request whose egress differs, the old ones are closed. The
internals are touched in ``addons/patches.py`` (``server_streams``,
``restore_server_address``, ``close_server_connections``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from datorus_core import egress as eg
from datorus_core.billing import allowance_covers
from datorus_core.egress_io import HandshakeError, handshake
from datorus_core.egress_status import ACTIVE, Health
from datorus_core.envelope import DatorusError
from datorus_core.hotstate.base import BlockNews, LeaseNews
from datorus_core.hotstate.local import LocalHotState
from datorus_core.ledger.gateway import CHECKED_ROWS_MAX
from datorus_core.live import Lease, LeaseBook, SessionLookup
from datorus_core.routing import Ask, choose, vouch, vouched
from datorus_core.sessions import SessionTable, parse_username, valid_session_id
from datorus_core.workers import serve_secret

from . import patches
from .auth import parse_basic
from .context import ROUTE, TUNNEL, FlowCtx, Gateway, flow_ctx

log = logging.getLogger("datorus")

_REBUILD_ON_LOOP = 500  # a bigger pool is rebuilt off the event loop (~25-50 us an egress)
CHECKED_SECONDS = 0.5  # how often the results of the pool worker's checks are read
_REWEIGH_SECONDS = 2.0  # scores alone moved: the weights are rebuilt at most this often
_SEEN_SESSIONS = 10_000  # sessions a worker remembers for previews (shared hot state)

# how old a sticky session's pin read by the rate limit's round trip may be for routing to
# use it: older means the request waited in between (a claim, a DNS answer), and another
# worker may have re-pinned the session meanwhile, so it is read again
PIN_FRESH_SECONDS = 0.005
_SNIFF = 65536  # bytes of a body searched for block-page markers
_BUFFER_MAX = 262144  # small text bodies are held back so the verdict can be a header


@dataclass(slots=True)
class Route:
    """What the client asked for: a session and a country."""

    session_id: str | None = None
    country: str | None = None
    bad_country: str | None = None
    lease_id: str | None = None
    report: bool = False  # X-Datorus-Egress-Report: name the egress on the response
    pin: str | None = None  # X-Datorus-Egress-Pin: SECRET:ID, from the in-process API only
    timeout: str | None = None  # X-Datorus-Timeout: SECRET:SECONDS, idem (POST /fetch)


@dataclass(slots=True, eq=False)
class Choice:
    """The egress of a client connection's current request."""

    egress: eg.Egress
    source: str | None
    fc: FlowCtx
    failed: str | None = None  # why the tunnel through the upstream proxy was not set up

    @property
    def key(self) -> tuple[int, str | None]:
        return (self.egress.id, self.source)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _family(flow: http.HTTPFlow) -> int:
    """4 or 6: the family of the target address the acceptable-use check pinned."""
    return 6 if ":" in flow.request.host else 4


def _from_rows(rows: list[tuple[Any, ...]], known: dict[str, eg.EgressSpec]) -> list[eg.Egress]:
    """The egress of pool rows, reusing the parsed URLs of *known* (a bad one is skipped)."""
    items = []
    for row in rows:
        try:
            items.append(eg.egress_from_row(row, known.get(row[1])))
        except ValueError as e:
            log.warning("datorus: egress %s has a bad URL (%s): skipped", row[0], e)
    return items


class RouteOptions:
    """Read routing options from headers and username (before auth)."""

    name = "datorus_route_options"

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._read(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._read(flow)

    @staticmethod
    def _read(flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        headers = flow.request.headers
        route = Route()
        creds = parse_basic(headers.get("proxy-authorization"))
        if creds is not None and "-" in creds[0]:
            try:
                opts = parse_username(creds[0])
            except ValueError:
                opts = None  # not a Datorus username: auth refuses it as it stands
            if opts is not None:
                headers["proxy-authorization"] = _basic(opts.username, creds[1])
                route.session_id, route.country = opts.session_id, opts.country
                route.lease_id = opts.lease_id
        sid = headers.get("x-datorus-session-id")
        if sid is not None and valid_session_id(sid):
            route.session_id = sid
        for name in ("x-datorus-country", "x-geo"):
            value = headers.get(name)
            if value is not None:
                if eg.valid_country(value.strip()):
                    route.country = value.strip().lower()
                else:
                    route.bad_country = name
        if "x-datorus-egress-report" in headers:
            route.report = True
            route.pin = headers.get("x-datorus-egress-pin")
            route.timeout = headers.get("x-datorus-timeout")
        lease = headers.get("x-datorus-lease-id")
        if lease is not None:
            route.lease_id = lease.strip()
        if "x-geo" in headers:
            del headers["x-geo"]
        flow.metadata[ROUTE] = route


class EgressRouter:
    """Choose (``datorus_core.routing.choose``), apply and judge the egress of every
    request and tunnel.

    It keeps the live routing state (pool, leases, sessions) and implements
    ``datorus_core.live.LiveRouting``, all the REST API served by this process reads.
    """

    name = "datorus_egress"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        gw.router = self  # the REST API's routing insight reads the live pool and sessions
        # POST /proxies/test pins a request to one egress with this secret; it never
        # leaves the process (or, under datorus serve, its workers: a request made by
        # one worker's API may reach another), so a customer cannot forge a pin
        self.pin_secret = serve_secret() or secrets.token_hex(16)
        self.pool = eg.Pool()
        # shared hot state: the sessions this worker last saw, for previews only
        self.seen = SessionTable(3600.0, _SEEN_SESSIONS)
        self.current: dict[str, Choice] = {}  # client id -> choice of its current request
        self.conn_key: dict[str, tuple[int, str | None] | None] = {}  # server conn id -> key
        self.via: dict[str, tuple[Choice, tuple[str, int]]] = {}  # server conn id -> target
        self.dirty = True
        self.task: asyncio.Task | None = None
        self.check_seq = 0  # the last batch of checks applied (``ledger.gateway``)
        self.checked_at = 0.0  # when the checks' results were last read
        self.rescored = False  # scores moved since the weights were built
        self.weighed_at = 0.0
        self.rng = random.Random()  # picks and per-request prefix addresses (router_seed)
        self.leases = LeaseBook()
        self.block_statuses: frozenset[int] = frozenset({403, 429})
        self.markers: tuple[bytes, ...] = ()

    # -- settings and the pool ---------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        s = self.gw.settings
        if "datorus_router_seed" in updated:
            self.reseed(s["router_seed"])
        if "session_ttl" in s:
            self.gw.hot.configure()
            if self.seen.ttl != s["session_ttl"]:
                self.seen = SessionTable(s["session_ttl"], _SEEN_SESSIONS)
        if "block_statuses" in s:
            self.block_statuses = frozenset(int(x) for x in s["block_statuses"])
            self.markers = tuple(m.lower().encode() for m in s["block_markers"] if m)

    def reseed(self, seed: int) -> None:
        """Seed the random choices: 0 draws from the system, any other value repeats a run."""
        self.rng = random.Random(seed) if seed else random.Random()

    def on_snapshot(self, rt: Any) -> None:
        """The ledger changed: reload the pool at the next tick."""
        self.dirty = True

    def running(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="datorus egress")

    async def done(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            try:
                if self.dirty and self.gw.runtime.loaded:
                    self.dirty = False
                    await self._load()
                await self._read_checks()
                self.gw.hot.sweep(time.monotonic())
                self.seen.sweep(time.monotonic())
            except Exception as e:  # never let the loop die: routing depends on it
                self.dirty = True
                log.warning("datorus: egress refresh failed: %s", e)

    async def _load(self) -> None:
        link = self.gw.ledger
        if link is None:
            self.dirty = True
            return
        seq = await link.check_seq()  # read first: the rows are at least this new
        rows, live = await link.pool(int(time.time()))
        self.leases.replace(Lease.from_row(row) for row in live)
        if len(rows) > _REBUILD_ON_LOOP:
            # a pool of thousands (a source's) is rebuilt in a thread: the loop goes on
            # routing with the old pool's records until the new ones are swapped in
            changed, items = await asyncio.to_thread(self._rebuild, rows)
        else:
            changed, items = self._rebuild(rows)
        self.check_seq = max(self.check_seq, seq)
        self.weighed_at = time.monotonic()
        if changed:
            enabled = sum(e.enabled for e in items)
            log.info("datorus: egress pool: %d (%d enabled)", len(items), enabled)

    def _rebuild(self, rows: list[tuple[Any, ...]]) -> tuple[bool, list[eg.Egress]]:
        """Replace the pool's records by *rows* (URLs parsed once); whether the operator's
        part of it (URL, country, weight, enabled) changed, and the new records."""
        old = list(self.pool.by_id.values())
        known = {e.spec.url: e.spec for e in old}
        items = _from_rows(rows, known)
        self.pool.replace(items)  # each swap (records, then weights) is one assignment
        before = {(e.id, e.spec.url, e.country, e.weight, e.enabled) for e in old}
        after = {(e.id, e.spec.url, e.country, e.weight, e.enabled) for e in items}
        return before != after, items

    # -- the checks' results ------------------------------------------------------------

    async def _read_checks(self) -> None:
        """Apply what the pool worker's checks changed since the last read; reweigh at
        once when a status or country moved, else at most every few seconds."""
        now = time.monotonic()
        link = self.gw.ledger
        if link is None or now - self.checked_at < CHECKED_SECONDS:
            return
        self.checked_at = now
        rows = await link.checked_since(self.check_seq)
        moved = self.apply_checked(rows, now)
        if len(rows) >= CHECKED_ROWS_MAX:  # cut short, maybe inside a batch: read it again
            self.check_seq = int(rows[-1][7]) - 1
        if moved or (self.rescored and now - self.weighed_at >= _REWEIGH_SECONDS):
            self.rescored = False
            self.weighed_at = now
            self.pool.reweigh()

    def apply_checked(self, rows: list[tuple[Any, ...]], now: float) -> bool:
        """Apply checked rows ``(id, status, fail_streak, score, latency_ms, exit_ip,
        country, check_seq)`` to the live pool; whether a status or country moved (the
        weights must be rebuilt now). A failed check takes an egress out of the choice
        for a short, doubling back-off, as it did when each gateway checked."""
        moved = False
        for eid, status, streak, score, latency, exit_ip, country, seq in rows:
            self.check_seq = max(self.check_seq, int(seq))
            e = self.pool.by_id.get(eid)
            if e is None:
                continue  # new since the last reload: the next reload brings it
            try:
                health = Health(status, int(streak))
            except ValueError:
                continue
            was, now_active = e.health.status == ACTIVE, health.status == ACTIVE
            # only active egress are weighed: unchecked -> dead moves no weight
            if was != now_active or (now_active and country and country != e.country):
                moved = True
            elif now_active and score != e.score:
                self.rescored = True
            if health.streak > e.health.streak:
                e.failed(now)
            elif health.streak == 0:
                e.succeeded()
            e.health = health
            e.score = float(score) if score is not None else e.score
            e.latency_ms = latency
            e.exit_ip = exit_ip or e.exit_ip
            if country:
                e.country = country
        return moved

    # -- choosing ----------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow):
        return self._route(flow, tunnel=False)

    def http_connect(self, flow: http.HTTPFlow):
        return self._route(flow, tunnel=True)

    def _route(self, flow: http.HTTPFlow, tunnel: bool):
        fc = flow_ctx(flow)
        route: Route | None = flow.metadata.get(ROUTE)
        if route is None:
            return
        if route.session_id:
            if fc is not None:
                fc.session_id = route.session_id
            if flow.response is not None:
                flow.response.headers["X-Datorus-Session-Id"] = route.session_id
        if flow.response is not None or fc is None or fc.cred is None:
            return None
        if route.bad_country:
            self.gw.reject(
                flow,
                fc,
                DatorusError(
                    "VALIDATION_ERROR",
                    message="The country must be a two-letter code.",
                    details={"field": route.bad_country, "reason": "must be two letters"},
                ),
            )
            return None
        pin = vouched(route.pin, self.pin_secret)
        ask = Ask(
            fc.account.id,
            fc.host.lower(),
            _family(flow),
            route.session_id,
            route.country,
            route.lease_id,
            int(pin) if pin is not None and pin.isdigit() else None,  # not ours: no pin
        )
        now = time.monotonic()
        hot = self.gw.hot
        if isinstance(hot, LocalHotState):
            self._go(flow, fc, ask, tunnel, now, hot.sessions.get)
            return None
        hint, fc.session_pin = fc.session_pin, None
        if ask.session_id and hint is not None:
            sid, pinned, at = hint
            if sid == ask.session_id and now - at <= PIN_FRESH_SECONDS:
                # the rate limit's round trip read the pin just now: no second one
                self._go_pinned(flow, fc, ask, tunnel, now, pinned)
                return None
        return self._route_shared(flow, fc, ask, tunnel, now)

    async def _route_shared(
        self, flow: http.HTTPFlow, fc: FlowCtx, ask: Ask, tunnel: bool, now: float
    ) -> None:
        """Routing with the sticky session read from the shared hot state first."""
        pinned = None
        if ask.session_id:
            pinned = await self.gw.hot.session(ask.account_id, ask.session_id, now)
            if pinned is not None:
                self.seen.put(ask.account_id, ask.session_id, pinned, now)
        self._go(flow, fc, ask, tunnel, now, lambda _a, _s, _n: pinned)

    def _go_pinned(
        self,
        flow: http.HTTPFlow,
        fc: FlowCtx,
        ask: Ask,
        tunnel: bool,
        now: float,
        pinned: int | None,
    ) -> None:
        """Routing with the sticky session's pin the rate limit's take read (not yet kept
        alive: it is once the pin is used or replaced, as ``hot.session`` would have)."""
        assert ask.session_id is not None
        if pinned is not None:
            self.seen.put(ask.account_id, ask.session_id, pinned, now)
            self.gw.hot.touch_session(ask.account_id, ask.session_id, now)
        self._go(flow, fc, ask, tunnel, now, lambda _a, _s, _n: pinned)

    def _go(
        self,
        flow: http.HTTPFlow,
        fc: FlowCtx,
        ask: Ask,
        tunnel: bool,
        now: float,
        session: SessionLookup,
    ) -> None:
        """Choose the egress for *ask* (``routing.choose``) and send *flow* through it."""
        cid = flow.client_conn.id
        try:
            go = choose(ask, self.pool, self.leases, now, time.time(), self.rng, session)
        except DatorusError as err:
            self.gw.reject(flow, fc, err)
            return
        if go is None:  # no pool: the box's default route
            self.current.pop(cid, None)
            if not tunnel:
                self._close_stale(cid, None)
            return
        if go.pin_session and ask.session_id:
            self.gw.hot.pin_session(ask.account_id, ask.session_id, go.egress.id, now)
            if self.gw.hot.shared:
                self.seen.put(ask.account_id, ask.session_id, go.egress.id, now)
        self._use(flow, fc, go.egress, go.source, tunnel)

    # -- what the REST API served by this process reads (datorus_core.live.LiveRouting) --

    def peek_session(self, account_id: int, session_id: str, now: float) -> int | None:
        """The egress a live session is pinned to, without keeping the session alive.

        Shared between workers, this is what this worker last saw of the session (a
        preview must not wait on the network).
        """
        hot = self.gw.hot
        if isinstance(hot, LocalHotState):
            return hot.sessions.peek(account_id, session_id, now)
        return self.seen.peek(account_id, session_id, now)

    async def pinned_session(self, account_id: int, session_id: str, now: float) -> int | None:
        """The egress a live session is pinned to, read from the shared hot state (not
        kept alive); the same as :meth:`peek_session` in one process."""
        hot = self.gw.hot
        if isinstance(hot, LocalHotState):
            return hot.sessions.peek(account_id, session_id, now)
        return await hot.session(account_id, session_id, now, touch=False)

    def preview_rng(self) -> random.Random:
        """A copy of the generator the next request's choice draws from."""
        rng = random.Random()
        rng.setstate(self.rng.getstate())
        return rng

    def vouch(self, value: str) -> str:
        """*value* as a header only this process can make (see ``routing.vouched``)."""
        return vouch(value, self.pin_secret)

    def add_lease(self, lease: Lease) -> None:
        """A lease taken through the API this gateway serves: in force at once, everywhere."""
        self.leases.add(lease)
        self.gw.hot.announce_lease(LeaseNews(lease=lease))

    def end_lease(self, lease_id: str) -> None:
        """A lease released through the API this gateway serves: over at once, everywhere."""
        self.leases.end(lease_id)
        self.gw.hot.announce_lease(LeaseNews(ended=lease_id))

    # -- news from the other workers (datorus_core.hotstate.base.Listener) --------------

    def on_lease(self, news: LeaseNews) -> None:
        """A lease taken or released through another worker's API."""
        if news.lease is not None:
            self.leases.add(news.lease)
        if news.ended is not None:
            self.leases.end(news.ended)

    def on_block(self, news: BlockNews) -> None:
        """Another worker judged an egress blocked (or unblocked) for a domain."""
        e = self.pool.by_id.get(news.egress_id)
        if e is not None:
            e.adopt(news.domain, news.strikes, news.seconds, time.monotonic())

    def _use(
        self, flow: http.HTTPFlow, fc: FlowCtx, e: eg.Egress, source: str | None, tunnel: bool
    ) -> None:
        """Send this request (or tunnel) out by *e*, from *source* when it binds one."""
        fc.egress = e
        choice = Choice(e, source, fc)
        self.current[flow.client_conn.id] = choice
        if not tunnel:
            self._close_stale(flow.client_conn.id, choice.key)

    def _close_stale(self, client_id: str, key: tuple[int, str | None] | None) -> None:
        """Close this client's server connections that belong to another egress (*internal*)."""
        patches.close_server_connections(client_id, lambda conn: self.conn_key.get(conn.id) != key)

    # -- applying ----------------------------------------------------------------------

    def server_connect(self, data) -> None:
        choice = self.current.get(data.client.id)
        server = data.server
        self.conn_key[server.id] = choice.key if choice is not None else None
        if choice is None:
            return
        spec = choice.egress.spec
        if spec.is_proxy:
            self.via[server.id] = (choice, server.address)
            server.address = (spec.host, spec.port)
        elif choice.source is not None:
            server.sockname = (choice.source, 0)

    async def server_connected(self, data) -> None:
        entry = self.via.pop(data.server.id, None)
        if entry is None:
            return
        choice, target = entry
        streams = patches.server_streams(data.client.id, data.server)
        # the connection is open: mitmproxy guards address changes, but its reuse check
        # must see the target again (*internal*)
        patches.restore_server_address(data.server, target)
        if streams is None:
            return
        reader = getattr(streams[0], "inner", streams[0])
        writer = getattr(streams[1], "inner", streams[1])
        timeout = self.gw.settings.get("upstream_timeout", 30)
        try:
            await asyncio.wait_for(handshake(choice.egress.spec, *target, reader, writer), timeout)
        except (HandshakeError, OSError, TimeoutError) as e:
            why = str(e) or type(e).__name__
            if not getattr(e, "target", False):
                log.info("datorus: egress %s failed: %s", choice.egress.id, why)
                choice.egress.failed(time.monotonic())
            choice.failed = why
            writer.close()
        else:
            choice.egress.succeeded()

    def server_connect_error(self, data) -> None:
        entry = self.via.pop(data.server.id, None)
        choice = self.current.get(data.client.id)
        if entry is not None:
            choice = entry[0]
            data.server.address = entry[1]
        if choice is None:
            return
        why = str(data.server.error or "")
        # a proxy that cannot be reached is down; for a direct egress a refused or
        # unreachable target is the target's fault, only a failed bind is the egress's
        if entry is not None or (choice.source and "assign requested address" in why.lower()):
            log.info("datorus: egress %s could not connect: %s", choice.egress.id, why)
            choice.egress.failed(time.monotonic())

    def server_disconnected(self, data) -> None:
        self.conn_key.pop(data.server.id, None)
        self.via.pop(data.server.id, None)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        choice = self.current.get(flow.client_conn.id)
        fc = flow_ctx(flow)
        if choice is None or choice.failed is None or fc is None or choice.fc is not fc:
            return
        why = choice.failed
        flow.response = self.gw.error_response(
            fc, DatorusError("UPSTREAM_FAILED", details={"reason": why, "egress": fc.egress.id})
        )

    def client_disconnected(self, client) -> None:
        self.current.pop(client.id, None)

    # -- judging -----------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is None or fc.answered or fc.egress is None or fc.kind == TUNNEL:
            return
        e: eg.Egress = fc.egress
        route = flow.metadata.get(ROUTE)
        if route is not None and route.report:
            flow.response.headers["X-Datorus-Egress-Id"] = str(e.id)
        resp = flow.response
        domain = fc.host.lower()
        if resp.status_code < 200 or resp.status_code in (204, 304):
            return  # upgrades (WebSocket) and bodiless answers: nothing to judge
        if resp.status_code in self.block_statuses:
            self._blocked(fc, resp, f"status {resp.status_code}")
            return
        if not self.markers:
            self._unblocked(e, domain)
            return
        ctype = resp.headers.get("content-type", "").lower()
        if ctype and "html" not in ctype and "text" not in ctype and "json" not in ctype:
            self._unblocked(e, domain)
            return
        length = resp.headers.get("content-length")
        if (
            length is not None
            and length.isdigit()
            and int(length) <= _BUFFER_MAX
            and allowance_covers(fc, int(length))
        ):
            resp.stream = False  # small: judge it whole, then the verdict can be a header
            return
        seen = bytearray()
        markers = self.markers

        def sniff(chunk: bytes) -> bytes:
            if len(seen) < _SNIFF and chunk:
                seen.extend(chunk[: _SNIFF - len(seen)])
                if eg.find_marker(bytes(seen), markers):
                    self._blocked(fc, None, "block-page marker")
                    seen.extend(b"\0" * _SNIFF)  # judged: stop looking
            return chunk

        resp.stream = sniff

    def response(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is None or fc.answered or fc.egress is None or fc.kind == TUNNEL:
            return
        resp = flow.response
        if resp.stream or resp.status_code in self.block_statuses or resp.status_code < 200:
            return
        marker = eg.find_marker((resp.raw_content or b"")[:_SNIFF], self.markers)
        if marker:
            self._blocked(fc, resp, f"marker {marker.decode(errors='replace')}")
        else:
            self._unblocked(fc.egress, fc.host.lower())

    def error(self, flow: http.HTTPFlow) -> None:
        fc = flow_ctx(flow)
        if fc is None or fc.egress is None or fc.answered or fc.cut:
            return  # the gateway's own cut (money, suspension) says nothing of the target
        choice = self.current.get(flow.client_conn.id)
        if choice is not None and choice.fc is fc and choice.failed is not None:
            return  # the upstream proxy failed us, not the target: counted as a failure
        msg = (flow.error.msg if flow.error else "").lower()
        if fc.timed_out:
            self._blocked(fc, None, "timeout")
        elif not fc.status and "client" not in msg and ("reset" in msg or "server" in msg):
            # the target dropped the connection before any answer: a reset-style block
            self._blocked(fc, None, msg[:60])

    def _unblocked(self, e: eg.Egress, domain: str) -> None:
        """A normal answer from *domain* through *e*: forget its blocks, here and everywhere."""
        if domain in e.domains:
            e.unblocked(domain)
            self.gw.hot.announce_block(BlockNews(e.id, domain, 0, 0.0))

    def _blocked(self, fc: FlowCtx, resp: http.Response | None, why: str) -> None:
        e: eg.Egress = fc.egress
        now = time.monotonic()
        domain = fc.host.lower()
        state = e.blocked(domain, now, self.gw.settings["block_seconds"])
        h = e.domains.get(domain)
        if h is not None:
            self.gw.hot.announce_block(BlockNews(e.id, domain, h.strikes, h.until - now))
        if resp is not None:
            resp.headers["X-Datorus-Blocked"] = "1"
        log.info("datorus: egress %s blocked by %s (%s): now %s", e.id, fc.host, why, state)
