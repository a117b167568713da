"""The gateway's live routing state: leases as typed records, and what others may read.

Pure: no mitmproxy, no database handle, the clock passed in.

- :class:`Lease` is one live lease (``POST /proxies/acquire``), one record with named
  fields wherever a lease is held (the ledger's ``ledger.leases.ACTIVE_SQL`` row has the same
  field order, see :meth:`Lease.from_row`).
- :class:`LeaseView` is what a routing decision reads of the leases;
  :class:`LeaseBook` is the in-process implementation the gateway keeps (a shared
  one, for several workers, would be another implementation of the same protocol).
- :data:`SessionLookup` is how a routing decision reads a sticky session: the proxy
  passes ``SessionTable.get`` (using a session keeps it alive), a preview passes
  ``SessionTable.peek`` (it does not).
- :class:`LiveRouting` names exactly what the REST API served by the gateway may read
  of the gateway's routing state, and the two things it may tell it (a lease taken or
  released through the API). ``addons.egress.EgressRouter`` implements it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .egress import Pool

SessionLookup = Callable[[int, str, float], "int | None"]
"""``(account_id, session_id, now) -> egress id`` of a live sticky session, or None."""


@dataclass(frozen=True, slots=True)
class Lease:
    """One lease: *account_id* holds *egress_id* to itself until *until* (Unix seconds)."""

    id: str
    account_id: int
    egress_id: int
    until: int

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Lease:
        """A lease from a ``(id, account_id, egress_id, expires_at)`` ledger row.

        >>> Lease.from_row(("ls1", 7, 3, 1700000000))
        Lease(id='ls1', account_id=7, egress_id=3, until=1700000000)
        """
        lid, aid, eid, until = row
        return cls(lid, aid, eid, until)

    def live(self, now: float) -> bool:
        """True while the lease holds at *now* (Unix seconds)."""
        return self.until > now


class LeaseView(Protocol):
    """What a routing decision reads of the leases."""

    def get(self, lease_id: str) -> Lease | None:
        """The lease with this id (live or lapsed since the last load), or None."""
        ...

    def holder(self, egress_id: int) -> Lease | None:
        """The lease on this egress (live or lapsed since the last load), or None."""
        ...

    def leased_now(self, now: float) -> frozenset[int]:
        """The egress ids under a live lease at *now* (Unix seconds)."""
        ...

    def of_account(self, account_id: int) -> list[Lease]:
        """The account's leases (live or lapsed since the last load)."""
        ...


class LeaseBook:
    """The leases the gateway knows of, by lease id and by egress (in process).

    Loaded from the ledger, and told at once of a lease taken or released through
    the API this process serves. A lapsed lease frees its egress by itself:
    :meth:`leased_now` is rebuilt only when the leases change or the first of them
    lapses, not per request.

    >>> book = LeaseBook([Lease("ls1", 7, 3, 100)])
    >>> book.leased_now(50.0), book.leased_now(100.0)
    (frozenset({3}), frozenset())
    >>> book.end("ls1"); book.holder(3) is None
    True
    """

    __slots__ = ("_by_egress", "_by_id", "_excl", "_excl_until")

    def __init__(self, leases: Iterable[Lease] = ()) -> None:
        self._by_id: dict[str, Lease] = {}
        self._by_egress: dict[int, Lease] = {}
        self._excl: frozenset[int] = frozenset()
        self._excl_until = 0.0
        self.replace(leases)

    def __len__(self) -> int:
        return len(self._by_id)

    def replace(self, leases: Iterable[Lease]) -> None:
        """Hold exactly *leases* (a fresh load from the ledger)."""
        items = list(leases)
        self._by_id = {lease.id: lease for lease in items}
        self._by_egress = {lease.egress_id: lease for lease in items}
        self._excl_until = 0.0

    def add(self, lease: Lease) -> None:
        """A lease taken: in force at once."""
        self._by_id[lease.id] = lease
        self._by_egress[lease.egress_id] = lease
        self._excl_until = 0.0

    def end(self, lease_id: str) -> None:
        """A lease released: over at once."""
        lease = self._by_id.pop(lease_id, None)
        if lease is not None:
            held = self._by_egress.get(lease.egress_id)
            if held is not None and held.id == lease_id:
                del self._by_egress[lease.egress_id]
        self._excl_until = 0.0

    def get(self, lease_id: str) -> Lease | None:
        """The lease with this id, or None."""
        return self._by_id.get(lease_id)

    def holder(self, egress_id: int) -> Lease | None:
        """The lease on this egress, or None."""
        return self._by_egress.get(egress_id)

    def leased_now(self, now: float) -> frozenset[int]:
        """The egress ids under a live lease at *now* (Unix seconds)."""
        if now >= self._excl_until:
            live = {e: lease.until for e, lease in self._by_egress.items() if lease.until > now}
            self._excl = frozenset(live)
            self._excl_until = min(live.values(), default=float("inf"))
        return self._excl

    def of_account(self, account_id: int) -> list[Lease]:
        """The account's leases."""
        return [lease for lease in self._by_id.values() if lease.account_id == account_id]


class LiveRouting(Protocol):
    """What the REST API served by the gateway may read of its routing state, and tell it.

    Reads happen in the gateway's event loop, where the gateway changes this state.
    """

    @property
    def pool(self) -> Pool:
        """The live pool: every egress, its health and its block states."""
        ...

    @property
    def leases(self) -> LeaseView:
        """The live leases."""
        ...

    def peek_session(self, account_id: int, session_id: str, now: float) -> int | None:
        """The egress a live sticky session is pinned to, without keeping it alive."""
        ...

    async def pinned_session(self, account_id: int, session_id: str, now: float) -> int | None:
        """Like :meth:`peek_session`, from the state every worker shares (a preview
        served by one worker sees the sessions the others pinned)."""
        ...

    def preview_rng(self) -> random.Random:
        """A copy of the generator the next request's choice draws from (drawing from
        the copy leaves the gateway's own sequence untouched)."""
        ...

    def vouch(self, value: str) -> str:
        """*value* vouched for by this process (``X-Datorus-Egress-Pin``,
        ``X-Datorus-Timeout``): only the in-process API can make such a header."""
        ...

    def add_lease(self, lease: Lease) -> None:
        """A lease taken through the API: in force at once."""
        ...

    def end_lease(self, lease_id: str) -> None:
        """A lease released through the API: over at once."""
        ...
