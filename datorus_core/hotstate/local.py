"""The hot state held in one process: the embedded default (no Redis, nothing shared).

Each concern keeps the structure it always had: a :class:`~..ratelimit.Gcra` per
credential, the account's open tunnels, a :class:`~..sessions.SessionTable`, failed
logins per address. Every coroutine here returns without suspending.
"""

from __future__ import annotations

from typing import Any

from ..ratelimit import Gcra, Verdict
from ..runtime import AccountState, CredentialState, Runtime
from ..sessions import SessionTable
from .base import BlockNews, LeaseNews, Listener, Take

_MAX_TRACKED = 100_000  # client addresses whose failed logins are counted at once
_WINDOW = 60.0  # failed logins are counted per minute
_UNLIMITED = 1 << 62


class LoginFailures:
    """Failed logins per client address in one-minute windows, and who is blocked.

    Past *limit* failures in a window, the address is blocked for *block_seconds*::

        >>> f = LoginFailures()
        >>> [f.record("10.0.0.1", 0.0, limit=2, block_seconds=30) for _ in range(3)]
        [0.0, 0.0, 30.0]
        >>> f.record("10.0.0.1", 10.0, limit=2, block_seconds=30)
        20.0
    """

    __slots__ = ("table",)

    def __init__(self) -> None:
        self.table: dict[str, list[float]] = {}  # peer -> [window start, count, blocked until]

    def record(self, peer: str, now: float, limit: int, block_seconds: float) -> float:
        """Count one failure of *peer* at *now*; the seconds it stays blocked (0: not)."""
        f = self.table.get(peer)
        if f is None:
            if len(self.table) > _MAX_TRACKED:
                self.table.clear()
            f = self.table[peer] = [now, 0, 0.0]
        if now - f[0] > _WINDOW:
            f[0], f[1] = now, 0
        f[1] += 1
        if f[1] == limit + 1:
            f[2] = now + block_seconds
        return max(0.0, f[2] - now)


class LocalHotState:
    """:class:`~.base.HotState` kept in this process."""

    shared = False
    snapshot_wanted = False
    refresh_wanted = False

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.ledger: Any = None
        self.logins = LoginFailures()
        self.sessions = SessionTable(3600.0, 100_000)

    def configure(self) -> None:
        """Follow the settings' session TTL and size, keeping the live sessions."""
        self.sessions = self.sessions.follow(self.settings)

    async def before_snapshot(self) -> None:
        """Nothing: one process's credit is its whole allowance."""
        return None

    async def seen_version(self, version: int) -> None:
        """Nothing to tell: one process reads every version itself."""

    def adopt(self, rt: Runtime, token: Any) -> None:
        """Nothing to take over."""

    async def catch_up(self, rt: Runtime) -> None:
        """Nothing: this process's view is the gateway's."""

    def status(self) -> dict[str, Any]:
        """In this process."""
        return {"state": "in-process"}

    def reachable(self) -> bool:
        """Always: nothing to reach."""
        return True

    async def start(self, listener: Listener) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to give back."""

    async def take(
        self,
        cred: CredentialState,
        tunnel_key: str | None,
        now: float,
        session_id: str | None = None,
    ) -> Take:
        """The credential's own limiter, and the account's open tunnels (the session is
        routing's to read: the table is at hand)."""
        return self.take_now(cred, tunnel_key, now)

    def take_now(self, cred: CredentialState, tunnel_key: str | None, now: float) -> Take:
        """:meth:`take` without a coroutine (the in-process hot path calls this)."""
        limiter = cred.limiter
        assert limiter is not None  # every credential gets one when a snapshot loads it
        v = limiter.take(now)
        if tunnel_key is None:
            return Take(v)
        acc = cred.account
        n = len(acc.tunnels)
        if not v.allowed or n >= acc.max_tunnels:
            return Take(v, n, False)
        acc.tunnels[tunnel_key] = None  # the flow's context replaces this when admitted
        return Take(v, n, True)

    def peek(self, cred: CredentialState, now: float) -> Verdict:
        """The credential's limiter at *now*, nothing taken."""
        limiter = cred.limiter or Gcra(cred.account.rps, cred.account.burst)
        return limiter.peek(now)

    def tunnel_closed(self, account: AccountState, tunnel_key: str) -> None:
        """Forget the tunnel."""
        account.tunnels.pop(tunnel_key, None)

    async def login_failed(self, peer: str, now: float) -> float:
        """Count the failure here."""
        return self.login_failed_now(peer, now)

    def login_failed_now(self, peer: str, now: float) -> float:
        """:meth:`login_failed` without a coroutine."""
        s = self.settings
        return self.logins.record(peer, now, s["auth_fail_limit"], s["auth_block_seconds"])

    async def claim(
        self, cred: CredentialState, nbytes: int, need: int = 0, trial: bool = False
    ) -> int:
        """One process holds the whole allowance: nothing to claim."""
        return _UNLIMITED

    def credit(self, cred: CredentialState) -> int:
        """Unlimited: the runtime's allowance is the only bound."""
        return _UNLIMITED

    async def session(
        self, account_id: int, session_id: str, now: float, touch: bool = True
    ) -> int | None:
        """The session table's entry."""
        t = self.sessions
        return t.get(account_id, session_id, now) if touch else t.peek(account_id, session_id, now)

    def pin_session(self, account_id: int, session_id: str, egress_id: int, now: float) -> None:
        """Pin in the session table."""
        self.sessions.put(account_id, session_id, egress_id, now)

    def touch_session(self, account_id: int, session_id: str, now: float) -> None:
        """Keep the session alive in the table (routing reads it with ``get``, which does)."""
        self.sessions.get(account_id, session_id, now)

    def announce_block(self, news: BlockNews) -> None:
        """No one else to tell."""

    def announce_lease(self, news: LeaseNews) -> None:
        """No one else to tell."""

    def sweep(self, now: float) -> None:
        """Drop idle sessions."""
        self.sessions.sweep(now)
