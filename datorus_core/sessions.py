"""Sticky sessions: (account, session id) pinned to one egress while the session lives.

Also the routing options a client can put in its proxy username, for clients that
cannot add headers to CONNECT (browsers, most scraping tools)::

    USERNAME[-country-CC][-lease-LEASEID][-session-SESSIONID]

Datorus usernames are lowercase letters and digits, never ``-``, so the first ``-``
ends the username. ``country-CC`` takes exactly two letters, ``lease-`` a lease id
(``ls`` + 24 hex digits, from ``POST /proxies/acquire``). ``session-`` must be
the last option: everything after it is the session id, so every valid id
(``[A-Za-z0-9_-]{1,128}``, dashes included) reads one way only.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .egress import valid_country

# used with fullmatch only: ``$`` would also match before a final newline, and an id
# ending in "\n" would reach a response head (issue 12)
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
LEASE_ID_RE = re.compile(r"ls[0-9a-f]{24}")


def valid_session_id(value: str | None) -> bool:
    """True for a valid ``X-Datorus-Session-Id`` (the whole value, nothing after it)."""
    return value is not None and SESSION_ID_RE.fullmatch(value) is not None


def valid_lease_id(value: str | None) -> bool:
    """True for a well-formed lease id (``ls`` + 24 hex digits, nothing after it)."""
    return value is not None and LEASE_ID_RE.fullmatch(value) is not None


class UsernameOptionError(ValueError):
    """A proxy username whose options do not parse; ``option`` is the part at fault.

    ``option`` is that option as the username spelled it (``-country-usa``,
    ``-bogus``, ``-`` for a dangling dash), so an answer can name it; it is part of the
    username, never of the password.
    """

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True, slots=True)
class UsernameOptions:
    """A proxy username split into the credential and its routing options."""

    username: str
    session_id: str | None = None
    country: str | None = None
    lease_id: str | None = None


def parse_username(raw: str) -> UsernameOptions | None:
    """Split ``USER[-country-CC][-lease-ID][-session-ID]``; None when *raw* has no options.

    Raises :class:`UsernameOptionError` (a ValueError) naming the option at fault when
    options are present but malformed (an unknown option, a country that is not two
    letters, an invalid session or lease id): such a username is not a Datorus
    username and must not authenticate.
    """
    base, sep, rest = raw.partition("-")
    if not sep:
        return None
    if not base:
        raise UsernameOptionError("empty username", raw)
    if not rest:
        raise UsernameOptionError("dangling '-'", "-")
    country = None
    session = None
    lease = None
    while rest:
        key, _, value = rest.partition("-")
        if key == "session":
            if not valid_session_id(value):
                raise UsernameOptionError("invalid session id", f"-session-{value}")
            session = value
            break
        if key == "country" and country is None:
            cc, dash, rest = value.partition("-")
            if not valid_country(cc):
                raise UsernameOptionError("country must be two letters", f"-country-{cc}")
            country = cc.lower()
            if dash and not rest:
                raise UsernameOptionError("dangling '-'", "-")
            continue
        if key == "lease" and lease is None:
            lid, dash, rest = value.partition("-")
            if not valid_lease_id(lid):
                raise UsernameOptionError("invalid lease id", f"-lease-{lid}")
            lease = lid
            if dash and not rest:
                raise UsernameOptionError("dangling '-'", "-")
            continue
        raise UsernameOptionError(f"unknown username option {key!r}", f"-{key}")
    return UsernameOptions(base, session, country, lease)


_OPTION_SHOWN = 200  # characters of a bad option an answer repeats


def username_problem(username: str) -> dict[str, str] | None:
    """Why *username* cannot be a Datorus username as written (407 details), or None.

    Decided by its spelling alone, so the answer says nothing about which usernames
    exist: ``{"reason": "malformed"}`` for control characters or whitespace (a
    trailing newline included), ``{"reason": "bad_option", "option": "-country-usa"}``
    for username options that do not parse. None: it may be a username (whether it
    is one, and whether the password fits, is for the ledger to say).
    """
    if not username.isprintable() or any(c.isspace() for c in username):
        return {"reason": "malformed"}
    if "-" in username:
        try:
            parse_username(username)
        except UsernameOptionError as e:
            return {"reason": "bad_option", "option": e.option[:_OPTION_SHOWN]}
    return None


class SessionTable:
    """Live sticky sessions, least recently used first (an LRU over an OrderedDict).

    Each entry is ``(account_id, session_id) -> (egress_id, last_used)``. A session
    idle for ``ttl`` seconds is gone; past ``max_sessions`` the one idle longest is
    evicted. Every operation is O(1) (expiry is amortised: each entry is dropped once).
    """

    __slots__ = ("evicted", "expired", "max_sessions", "table", "ttl")

    def __init__(self, ttl: float, max_sessions: int) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.table: OrderedDict[tuple[int, str], tuple[int, float]] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self.table)

    def follow(self, settings: dict[str, Any]) -> SessionTable:
        """This table under the settings' ``session_ttl`` and ``max_sessions``, its live
        sessions kept (itself when they are unchanged or not set yet)."""
        ttl, size = settings.get("session_ttl"), settings.get("max_sessions")
        if ttl is None or size is None or (self.ttl == ttl and self.max_sessions == size):
            return self
        table = SessionTable(ttl, size)
        table.table = self.table
        return table

    def get(self, account_id: int, session_id: str, now: float) -> int | None:
        """The egress pinned for the session, if it lives (touching it), else None."""
        key = (account_id, session_id)
        entry = self.table.get(key)
        if entry is None:
            return None
        if now - entry[1] >= self.ttl:
            del self.table[key]
            self.expired += 1
            return None
        self.table[key] = (entry[0], now)
        self.table.move_to_end(key)
        return entry[0]

    def peek(self, account_id: int, session_id: str, now: float) -> int | None:
        """Like :meth:`get`, without touching the session (a preview must not keep it alive)."""
        entry = self.table.get((account_id, session_id))
        if entry is None or now - entry[1] >= self.ttl:
            return None
        return entry[0]

    def put(self, account_id: int, session_id: str, egress_id: int, now: float) -> None:
        """Pin (or re-pin) a session to *egress_id*."""
        key = (account_id, session_id)
        self.table[key] = (egress_id, now)
        self.table.move_to_end(key)
        self.sweep(now, budget=2)
        while len(self.table) > self.max_sessions:
            self.table.popitem(last=False)
            self.evicted += 1

    def drop(self, account_id: int, session_id: str) -> None:
        """End a session."""
        self.table.pop((account_id, session_id), None)

    def sweep(self, now: float, budget: int = 1000) -> int:
        """Drop up to *budget* idle sessions from the oldest end; returns how many went."""
        n = 0
        t = self.table
        while t and n < budget:
            key, (_, last) = next(iter(t.items()))
            if now - last < self.ttl:
                break
            del t[key]
            n += 1
        self.expired += n
        return n
