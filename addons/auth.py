"""Proxy authentication: HTTP Basic in ``Proxy-Authorization`` on every request.

The hot path pays no slow hash: a credential that verified once is remembered by
a keyed BLAKE2b digest of ``username:password`` (see ``datorus_core.hashing``)
until the ledger snapshot drops it (revoked within ``refresh_ms``). A miss runs
scrypt in a worker thread, at most two at a time, so guessing cannot stall traffic.

Wrong credentials from one client address are counted; past
``auth_fail_limit`` a minute the address is throttled: its wrong attempts get
``429`` instead of ``407``. A correct credential is still accepted from it, and a
request without credentials (browsers always try that first) is not a failure.

A ``407`` says why in ``details.reason``: ``missing`` (no ``Proxy-Authorization``),
``malformed`` (not Basic, not base64 or UTF-8, no ``:``, or a username with control
characters or whitespace), ``bad_option`` (username options that do not parse, with
``details.option``) or ``invalid`` (an unknown username and a wrong password alike, so
the answer never tells which usernames exist). The password is never repeated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import secrets
import time
from collections.abc import Awaitable

from mitmproxy import http

from datorus_core.envelope import DatorusError, new_request_id
from datorus_core.hashing import cache_key, hash_secret, verify_secret
from datorus_core.hotstate.local import LocalHotState
from datorus_core.metrics import SOCKS5 as SOCKS5_KIND
from datorus_core.runtime import CredentialState
from datorus_core.sessions import parse_username, username_problem

from .context import FlowCtx, Gateway
from .hardening import malformed
from .limits import rate_headers

log = logging.getLogger("datorus")

_MAX_TRACKED = 100_000
_NEGATIVE_TTL = 5.0

# details.reason of a 407: why the credentials were refused, never which part was wrong
# (an unknown username and a wrong password are both "invalid")
MISSING = {"reason": "missing"}
MALFORMED = {"reason": "malformed"}
INVALID = {"reason": "invalid"}


def parse_basic(value: str | None) -> tuple[str, str] | None:
    """``(username, password)`` from a ``Basic`` header value, or None if it is not one.

    The password may contain ``:`` (the split is at the first colon); both parts
    must be valid UTF-8.
    """
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    username, sep, password = text.partition(":")
    if not sep or not username:
        return None
    return username, password


@functools.cache
def _decoy_hash() -> str:
    """A stored-hash look-alike no password matches (made once, on first use)."""
    return hash_secret(secrets.token_urlsafe(24))


def _verify(password: str, cred: CredentialState | None) -> bool:
    """The slow check (in a worker thread); against the decoy for an unknown username."""
    return verify_secret(password, cred.password_hash if cred is not None else _decoy_hash())


async def _done(pending: Awaitable[None] | None) -> None:
    """Await *pending* when there is something to wait for."""
    if pending is not None:
        await pending


class ProxyAuth:
    """Authenticate every forward request and CONNECT."""

    name = "datorus_auth"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.throttled: set[str] = set()  # addresses whose throttling was logged
        # credentials that just failed the slow check: (until, ledger version); any
        # operator change (a new credential) makes them count for nothing
        self.negative: dict[bytes, tuple[float, int]] = {}
        self.sem: asyncio.Semaphore | None = None

    # -- hooks -------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow):
        return self._check(flow)

    def http_connect(self, flow: http.HTTPFlow):
        return self._check(flow)

    # -- the check ---------------------------------------------------------------------

    def _check(self, flow: http.HTTPFlow):
        gw = self.gw
        req = flow.request
        fc = FlowCtx(new_request_id(), flow.client_conn.id, req.method, req.host, req.port)
        flow.metadata["datorus"] = fc
        fc.socks = getattr(flow.client_conn.proxy_mode, "type_name", "") == "socks5"
        rt = gw.runtime
        bad = malformed(req)
        if bad is not None:
            gw.reject(
                flow,
                fc,
                DatorusError(
                    "VALIDATION_ERROR",
                    message="The request could not be parsed.",
                    details={"field": bad[0], "reason": bad[1]},
                ),
            )
            return None
        if not rt.loaded:
            return self._wait_for_ledger(flow, fc)
        err = rt.ledger_error(time.monotonic())
        if err is not None:
            gw.reject(flow, fc, err)
            return None
        return self._authenticate(flow, fc)

    async def _wait_for_ledger(self, flow: http.HTTPFlow, fc: FlowCtx) -> None:
        """A request that came while the ledger loads waits for it (``startup_wait``)."""
        gw = self.gw
        try:
            await asyncio.wait_for(gw.ready.wait(), gw.settings["startup_wait"])
        except TimeoutError:
            gw.reject(
                flow,
                fc,
                DatorusError(
                    "SERVICE_UNAVAILABLE",
                    message="The gateway is still starting; retry shortly.",
                    details={"reason": "starting"},
                    headers={"Retry-After": "1"},
                ),
            )
            return
        err = gw.runtime.ledger_error(time.monotonic())
        if err is not None:
            gw.reject(flow, fc, err)
            return
        pending = self._authenticate(flow, fc)
        if pending is not None:
            await pending

    def _authenticate(self, flow: http.HTTPFlow, fc: FlowCtx):
        """Check the credential: None when decided now, else a coroutine (a slow hash)."""
        rt = self.gw.runtime
        req = flow.request
        creds = parse_basic(req.headers.get("proxy-authorization"))
        if creds is None:
            if "proxy-authorization" in req.headers:
                return self._fail(flow, fc, MALFORMED)
            if rt.allowlist:
                # an allow-listed client address runs as its credential
                peer = flow.client_conn.peername
                allowed = rt.allowed_credential(peer[0] if peer else None)
                if allowed is not None:
                    return self._accept(flow, fc, allowed)
            # a stopping gateway says so before it asks for credentials: a balancer's
            # health check (a request without them) takes the node out while it drains
            missing = DatorusError("INVALID_CREDENTIAL", details=MISSING)
            self.gw.reject(flow, fc, rt.drain_error() or missing)
            return None
        key = cache_key(*creds)
        cred = rt.verified.get(key)
        if cred is not None:
            return self._accept(flow, fc, cred)
        return self._verify(flow, fc, creds, key)

    async def _verify(self, flow: http.HTTPFlow, fc: FlowCtx, creds: tuple[str, str], key: bytes):
        found = await self._login(creds, key)
        if isinstance(found, dict):
            await _done(self._fail(flow, fc, found))
            return
        self._accept(flow, fc, found)

    async def _login(self, creds: tuple[str, str], key: bytes) -> CredentialState | dict[str, str]:
        """The live credential *creds* (username, password) name, or why not (``details``
        of the 407): the slow check, for a login the cache does not know."""
        rt = self.gw.runtime
        username, password = creds
        cred = rt.by_username.get(username)
        now, seen = time.monotonic(), rt.version
        until, version = self.negative.get(key, (0.0, -1))
        if until > now and version == seen:
            return username_problem(username) or INVALID
        if cred is None and (problem := username_problem(username)) is not None:
            return problem  # decided by the spelling alone
        if self.sem is None:
            self.sem = asyncio.Semaphore(2)
        async with self.sem:
            # an unknown username costs the same slow hash as a wrong password, so the
            # answer's timing does not tell which usernames exist
            ok = await asyncio.to_thread(_verify, password, cred)
        if not ok or cred is None:
            if len(self.negative) > _MAX_TRACKED:
                self.negative.clear()
            self.negative[key] = (time.monotonic() + _NEGATIVE_TTL, seen)
            return INVALID
        # the snapshot may have changed while we hashed: only a live credential counts
        live = rt.by_username.get(username)
        if live is None or live.password_hash != cred.password_hash:
            return INVALID
        rt.verified[key] = live
        return live

    # -- the SOCKS5 entry (RFC 1929) ---------------------------------------------------

    async def socks5_auth(self, data) -> None:
        """A SOCKS5 client's username and password: the same credentials, the same
        username options, the same cache, slow check and failed-login count as
        ``Proxy-Authorization``. Valid or not is all RFC 1929 can say (status 0x01 on a
        failure); the CONNECT the entry then makes carries the same credentials and is
        judged like any other (``addons/socks.py``)."""
        gw = self.gw
        if not gw.runtime.loaded:
            try:
                await asyncio.wait_for(gw.ready.wait(), gw.settings["startup_wait"])
            except TimeoutError:
                return  # not valid: the client may retry once the gateway runs
        username, password = data.username, data.password
        problem = username_problem(username) if username else MALFORMED
        base = username
        if problem is None and "-" in username:
            opts = parse_username(username)  # parses: username_problem said so
            base = opts.username if opts is not None else username
        found: CredentialState | dict[str, str]
        if problem is not None:
            found = problem
        else:
            key = cache_key(base, password)
            cached = gw.runtime.verified.get(key)
            found = cached if cached is not None else await self._login((base, password), key)
        if isinstance(found, dict):
            # counted like a 407; logged, as for HTTP, once an address is throttled
            peer = data.client_conn.peername[0] if data.client_conn.peername else "?"
            blocked = await gw.hot.login_failed(peer, time.monotonic())
            # the answer a CONNECT would get (RFC 1929 can only say 0x01), counted as one
            if blocked > 0:
                gw.metrics.answered(SOCKS5_KIND, 429, "RATE_LIMITED")
            else:
                gw.metrics.answered(SOCKS5_KIND, 407, "INVALID_CREDENTIAL")
            if blocked > 0 and peer not in self.throttled:
                if len(self.throttled) > _MAX_TRACKED:
                    self.throttled.clear()
                self.throttled.add(peer)
                log.warning(
                    "datorus: throttling %s after %d failed logins in a minute (SOCKS5)",
                    peer,
                    gw.settings["auth_fail_limit"],
                )
            return
        data.valid = True

    def _accept(self, flow: http.HTTPFlow, fc: FlowCtx, cred: CredentialState) -> None:
        fc.cred = cred
        fc.account = cred.account
        if cred.account.status != "active":
            # the credential is known: its rate-limit state goes on the answer (not spent)
            fc.rl_headers = rate_headers(cred, self.gw.hot.peek(cred, time.monotonic()))
            self.gw.reject(flow, fc, DatorusError("ACCOUNT_SUSPENDED"))

    def _fail(self, flow: http.HTTPFlow, fc: FlowCtx, why: dict[str, str]):
        """A failed login: ``407`` saying *why* (``details``), or ``429`` once throttled.

        The failures are counted by the hot state (shared between workers); a
        coroutine when that count crosses the network.
        """
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else "?"
        hot = self.gw.hot
        if isinstance(hot, LocalHotState):
            self._answer_failure(flow, fc, why, peer, hot.login_failed_now(peer, time.monotonic()))
            return None
        return self._fail_shared(flow, fc, why, peer)

    async def _fail_shared(
        self, flow: http.HTTPFlow, fc: FlowCtx, why: dict[str, str], peer: str
    ) -> None:
        blocked = await self.gw.hot.login_failed(peer, time.monotonic())
        self._answer_failure(flow, fc, why, peer, blocked)

    def _answer_failure(
        self, flow: http.HTTPFlow, fc: FlowCtx, why: dict[str, str], peer: str, blocked: float
    ) -> None:
        if blocked > 0:
            if peer not in self.throttled:
                if len(self.throttled) > _MAX_TRACKED:
                    self.throttled.clear()
                self.throttled.add(peer)
                log.warning(
                    "datorus: throttling %s after %d failed logins in a minute",
                    peer,
                    self.gw.settings["auth_fail_limit"],
                )
            retry = max(1, int(blocked + 0.999))
            self.gw.reject(
                flow,
                fc,
                DatorusError(
                    "RATE_LIMITED",
                    message="Too many failed logins from this address.",
                    details={"limit": "auth_failures", "retryAfterSeconds": retry},
                    headers={"Retry-After": str(retry)},
                ),
            )
            return
        self.throttled.discard(peer)
        self.gw.reject(flow, fc, DatorusError("INVALID_CREDENTIAL", details=dict(why)))
