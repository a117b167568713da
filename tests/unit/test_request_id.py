"""Request ids: UUIDv7, so the receipts index grows at its end (see scripts/bench)."""

from __future__ import annotations

import time
import uuid

from datorus_core.envelope import new_request_id


def test_request_id_is_a_version_7_rfc_uuid() -> None:
    rid = new_request_id()
    u = uuid.UUID(rid)
    assert str(u) == rid
    assert u.version == 7
    assert u.variant == uuid.RFC_4122


def test_request_ids_carry_the_time_and_sort_by_it() -> None:
    before = time.time_ns() // 1_000_000
    first = new_request_id()
    ms = uuid.UUID(first).int >> 80
    assert before <= ms <= time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 <= ms:  # into the next millisecond, however long
        time.sleep(0.0005)
    assert new_request_id() > first


def test_request_ids_are_unique() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000


def test_floor_splits_ids_exactly_at_a_millisecond() -> None:
    """Receipts are pruned by ``request_id < request_id_floor(cutoff)``: exact to the ms."""
    from datorus_core.envelope import request_id_floor

    rid = new_request_id()
    ms = uuid.UUID(rid).int >> 80
    assert request_id_floor(ms) < rid < request_id_floor(ms + 1)
    assert request_id_floor(ms - 1) < request_id_floor(ms)
    assert not rid < request_id_floor(ms)  # made at ms: kept by a cutoff at ms
