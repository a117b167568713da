"""Exclusive egress leases (seed 002's ``POST /proxies/acquire``): ids, filters, views.

A lease gives one account one egress to itself for a while: the gateway sends that
account's requests that name the lease (``X-Datorus-Lease-Id`` or ``-lease-ID`` in the
proxy username) through it, and no other request leaves by it until the lease ends.
A lease costs ``lease_price_cents`` from the balance when it is taken (seed 002: one
credit, a cent here), not refunded on an early release. The charge and the lease are
written in one transaction, and the charge carries ``external_id = "lease:ID"``, so a
lease is charged exactly once (:mod:`datorus_core.ledger.leases` writes them).
"""

from __future__ import annotations

import secrets
from typing import Any

from .clock import iso_utc
from .egress import parse_egress_url
from .egress_status import ACTIVE
from .sessions import LEASE_ID_RE

__all__ = ["LEASE_ID_RE", "leasable", "matches", "new_lease_id", "view"]

MAX_SECONDS = 3600  # the longest lease POST /proxies/acquire grants
DEFAULT_SECONDS = 300  # its lease_duration_seconds when the body names none


def new_lease_id() -> str:
    """A lease id: ``ls`` + 24 hex digits (no ``-``, so it can ride in a username)."""
    return "ls" + secrets.token_hex(12)


def leasable(row: dict[str, Any]) -> bool:
    """Only a distinct way out can be leased: not the box's shared default route, and
    only an active one (its checks passed; not failing them now: score 0)."""
    return bool(row["url"] != "direct://" and row["status"] == ACTIVE and row["score"] > 0)


def matches(row: dict[str, Any], f: dict[str, Any]) -> bool:
    kind = parse_egress_url(row["url"]).kind
    return (
        (f.get("protocol") is None or kind == f["protocol"])
        and (f.get("country") is None or (row["country"] or "") == f["country"].lower())
        and (f.get("anonymity") is None or row["anonymity"] == f["anonymity"])
        and (f.get("min_score") is None or row["score"] >= f["min_score"])
    )


def view(lease: dict[str, Any], egress: dict[str, Any]) -> dict[str, Any]:
    """A lease as the API shows it: seed 002's fields and how to use it."""
    spec = parse_egress_url(egress["url"])
    return {
        "lease_id": lease["id"],
        "proxy": {
            "id": egress["id"],
            "ip": spec.address,
            "port": spec.port if spec.is_proxy else None,
            "protocol": spec.kind,
            "country": egress["country"].upper() if egress["country"] else None,
            "anonymity": egress["anonymity"],
            "exit_ip": egress["exit_ip"],
        },
        "created_at": lease["created_at"],
        "expires_at": iso_utc(lease["expires_at"]),
        "use": {"header": "X-Datorus-Lease-Id", "username_option": f"-lease-{lease['id']}"},
    }
