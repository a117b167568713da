"""What the gateway's hot state is, as one interface: :class:`HotState`.

Every limit and bound of CONTRACT section 2 that depends on more than one request is
kept here, so that one process (:mod:`.local`) and several workers sharing it
(a Redis implementation) hold the same rules:

- the request rate per credential (GCRA, :mod:`datorus_core.ratelimit`'s arithmetic)
  and the open tunnels (CONNECT and WebSocket) per account: :meth:`HotState.take`;
- failed logins per client address: :meth:`HotState.login_failed`;
- byte credit: the bytes a process may reserve for an account and a credential
  before it must ask again, so that flows on different workers cannot together run
  an account past its overdraft bound: :meth:`HotState.claim`;
- sticky sessions (account, session id -> egress): :meth:`HotState.session`;
- what one process learns that all must know at once: an egress blocked for a
  domain, a lease taken or released: :meth:`HotState.announce_block`,
  :meth:`HotState.announce_lease`.

Methods that may cross the network are coroutines. The in-process implementation
answers them without suspending, and the addons await them only where a request
waits anyway (authentication, admission, routing), never per tunnel chunk.
Decisions stay in the pure core: the implementations store and count; what a count
means (429, 402, which egress) is decided by the callers' core functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..live import Lease
from ..ratelimit import Verdict
from ..runtime import AccountState, CredentialState, Runtime


@dataclass(frozen=True, slots=True)
class Take:
    """The outcome of :meth:`HotState.take` for one request.

    *verdict* is the rate limiter's; *open_tunnels* is how many tunnels the account
    had open before this one (None when no tunnel was asked for); *tunnel* is True when
    a tunnel slot was taken for this request (it must be given back with
    :meth:`HotState.tunnel_closed`). When a sticky session was named and read in the
    same step (a shared state, the request allowed), *session_read* is True and
    *session* is the egress it is pinned to (None: not pinned), not yet kept alive
    (:meth:`HotState.touch_session` does that once the route uses it).
    """

    verdict: Verdict
    open_tunnels: int | None = None
    tunnel: bool = False
    session: int | None = None
    session_read: bool = False


@dataclass(frozen=True, slots=True)
class BlockNews:
    """An egress judged blocked (or unblocked) for a domain by one process.

    *strikes* is the egress's count of consecutive blocks for the domain and
    *seconds* how long it stays blocked from now (0: unblocked). Seconds, not a clock
    reading, so processes with different monotonic clocks agree.
    """

    egress_id: int
    domain: str
    strikes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class LeaseNews:
    """A lease taken (*lease* set) or released (*ended* set) through one process's API."""

    lease: Lease | None = None
    ended: str | None = None


class Listener(Protocol):
    """What a process does with news from the others (the egress router implements it)."""

    def on_block(self, news: BlockNews) -> None:
        """Apply another process's block judgement to the local pool."""
        ...

    def on_lease(self, news: LeaseNews) -> None:
        """Apply a lease taken or released through another process's API."""
        ...


class HotState(Protocol):
    """The hot state of one gateway, however many processes serve it."""

    shared: bool
    """True when other processes share this state (then ``claim`` may grant less
    than asked, and news arrives from elsewhere)."""

    ledger: Any
    """The gateway's ledger link once open (a shared state cleans up after dead workers)."""

    snapshot_wanted: bool
    """True when the ledger must be read again before credit can be claimed (the
    ledger task checks it every tick, besides the configuration version)."""

    refresh_wanted: bool
    """True when the ledger should be read again soon, though the snapshot still counts
    (the ledger task checks it every tick too, and clears it when it reads)."""

    async def before_snapshot(self) -> Any:
        """What the next snapshot's credit depends on, read just before the snapshot;
        hand it to :meth:`adopt`."""
        ...

    async def seen_version(self, version: int) -> None:
        """A snapshot of configuration *version* was read (before it is applied)."""
        ...

    def adopt(self, rt: Runtime, token: Any) -> None:
        """Take over the runtime's credit right after ``Runtime.apply_snapshot``."""
        ...

    async def catch_up(self, rt: Runtime) -> None:
        """Before refusing a request on *rt*'s view: read the ledger again first if
        another process has read a newer configuration."""
        ...

    def status(self) -> dict[str, Any]:
        """What ``/health`` says of the hot state."""
        ...

    def configure(self) -> None:
        """The settings changed (session TTL and size...): follow them."""
        ...

    def reachable(self) -> bool:
        """False while the shared state is out of reach (always True in one process)."""
        ...

    async def start(self, listener: Listener) -> None:
        """Connect and start receiving news; *listener* is told of others' news."""
        ...

    async def stop(self) -> None:
        """Give back what this process holds (credit, tunnel slots) and disconnect."""
        ...

    async def take(
        self,
        cred: CredentialState,
        tunnel_key: str | None,
        now: float,
        session_id: str | None = None,
    ) -> Take:
        """Count one request of *cred* against its rate limit, at *now* (monotonic).

        With *tunnel_key* (a CONNECT or an upgrade), also take one of the account's
        open-tunnel slots under that key, but only if the rate allows the request and
        fewer than ``max_tunnels`` are open: the two are decided together. With
        *session_id*, a shared state may also read the sticky session's egress in the
        same round trip (``Take.session_read``), so routing need not ask again.
        """
        ...

    def peek(self, cred: CredentialState, now: float) -> Verdict:
        """The rate limiter's state for *cred* without taking (the headers of a refusal
        decided before the limiter; a local estimate is enough)."""
        ...

    def tunnel_closed(self, account: AccountState, tunnel_key: str) -> None:
        """Give back the tunnel slot taken under *tunnel_key*."""
        ...

    async def login_failed(self, peer: str, now: float) -> float:
        """Count a failed login from *peer*; the seconds it is blocked for (0: not)."""
        ...

    async def claim(
        self, cred: CredentialState, nbytes: int, need: int = 0, trial: bool = False
    ) -> int:
        """Make room for *nbytes* more bytes of *cred*'s account in this process.

        Returns the bytes of credit this process now holds for the account beyond
        what its flows have reserved (at most what the account's allowance and the
        credential's cap leave, net of every other process's holdings), and brings
        trial credit first. When that leaves less than *need* bytes (or, with *trial*,
        no trial), credit the other processes hold idle is asked back first. The
        in-process state holds the whole allowance and claims nothing.
        """
        ...

    def credit(self, cred: CredentialState) -> int:
        """Bytes this process may still reserve for *cred* without claiming."""
        ...

    async def session(
        self, account_id: int, session_id: str, now: float, touch: bool = True
    ) -> int | None:
        """The egress a live sticky session is pinned to (kept alive when *touch*)."""
        ...

    def pin_session(self, account_id: int, session_id: str, egress_id: int, now: float) -> None:
        """Pin (or re-pin) a sticky session to *egress_id*."""
        ...

    def touch_session(self, account_id: int, session_id: str, now: float) -> None:
        """Keep alive a session whose pin ``Take.session`` read and the route used."""
        ...

    def announce_block(self, news: BlockNews) -> None:
        """Tell the other processes of a block judgement made here."""
        ...

    def announce_lease(self, news: LeaseNews) -> None:
        """Tell the other processes of a lease taken or released here."""
        ...

    def sweep(self, now: float) -> None:
        """Periodic housekeeping (expired sessions...), off the hot path."""
        ...


SessionSource = Callable[[int, str, float], "int | None"]
