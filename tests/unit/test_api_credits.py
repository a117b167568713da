"""``GET /account/credits`` over a real ledger file: usage rolled up per day, money kept.

Usage rows are written as the gateway's flush writes them (one per account per flush),
with their timestamps set so a history spans several UTC days.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datorus_core import ledger
from datorus_core.api import store
from datorus_core.ledger import accounts

NC = 10**9  # nanocents per cent


@pytest.fixture
def db(tmp_path):
    d = ledger.open_ledger(tmp_path / "l.db")
    yield d
    d.conn.close()


def _tx(db, aid: int, kind: str, nanocents: int, at: str, **extra) -> None:
    db.conn.execute(
        "INSERT INTO transactions (account_id, kind, nanocents, trial_bytes, bytes, requests,"
        " reason, external_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            aid,
            kind,
            nanocents,
            extra.get("trial_bytes", 0),
            extra.get("bytes", 0),
            extra.get("requests", 0),
            extra.get("reason"),
            extra.get("external_id"),
            at,
        ),
    )


def _usage(db, aid: int, nanocents: int, at: str) -> None:
    _tx(db, aid, "usage", -nanocents, at, bytes=300, requests=1, trial_bytes=0)


def test_usage_is_one_row_per_day_and_money_rows_stay(db) -> None:
    aid = accounts.create_account(db, "a@example.com", 0)["id"]
    _tx(db, aid, "topup", 500 * NC, "2025-01-01T09:00:00Z", reason="top-up")
    for i in range(40):  # 40 flushes a day, most of them worth less than a cent
        _usage(db, aid, 30_000_000, f"2025-01-01T10:{i:02d}:00Z")
        _usage(db, aid, 30_000_000, f"2025-01-02T10:{i:02d}:00Z")
    _tx(db, aid, "adjustment", -NC, "2025-01-02T11:00:00Z", external_id="lease:ls1")
    for i in range(40):
        _usage(db, aid, 0, f"2025-01-03T10:{i:02d}:00Z")  # trial-paid: zero cents
    c = store.credits(db, aid, 20)
    rows = c["recent_transactions"]
    assert [(t["tx_type"], t["created_at"][:10]) for t in rows] == [
        ("usage", "2025-01-03"),
        ("acquire", "2025-01-02"),
        ("usage", "2025-01-02"),
        ("usage", "2025-01-01"),
        ("purchase", "2025-01-01"),
    ]
    assert [t["transactions"] for t in rows] == [40, 1, 40, 40, 1]
    assert rows[2]["amount_nanocents"] == -40 * 30_000_000 and rows[0]["amount"] == 0
    assert rows[1]["amount"] == -1 and rows[-1]["amount"] == 500
    assert sum(t["amount"] for t in rows) == c["balance"] == (500 * NC - NC - 80 * 30_000_000) // NC
    assert sum(t["amount_nanocents"] for t in rows) == c["balance_nanocents"]
    # a shorter window: the newest rows, the days still rolled up
    assert [t["tx_type"] for t in store.credits(db, aid, 2)["recent_transactions"]] == [
        "usage",
        "acquire",
    ]
    # the ledger is untouched
    assert db.conn.execute("SELECT COUNT(*) FROM transactions").fetchone()[0] == 122


def test_another_accounts_rows_stay_out(db) -> None:
    a = accounts.create_account(db, "a@example.com", 0)["id"]
    b = accounts.create_account(db, "b@example.com", 0)["id"]
    _tx(db, b, "topup", 7 * NC, "2025-01-01T09:00:00Z")
    _usage(db, b, NC, "2025-01-01T10:00:00Z")
    assert store.credits(db, a, 20)["recent_transactions"] == []
    assert store.credits(db, a, 20)["balance"] == 0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["usage", "topup", "adjustment"]),
            st.integers(0, 3 * NC),
            st.integers(0, 4),  # day
        ),
        max_size=40,
    ),
    st.integers(1, 50),
)
def test_rows_of_a_whole_history_add_up_to_the_balance(tmp_path_factory, history, limit) -> None:
    db = ledger.open_ledger(tmp_path_factory.mktemp("h") / "l.db")
    aid = accounts.create_account(db, "h@example.com", 0)["id"]
    history = sorted(history, key=lambda h: h[2])  # time goes forward
    for n, (kind, amount, day) in enumerate(history):
        at = f"2025-01-0{day + 1}T10:{n:02d}:00Z"
        if kind == "usage":
            _usage(db, aid, amount, at)
        elif kind == "topup":
            _tx(db, aid, "topup", (amount // NC + 1) * NC, at)
        else:
            _tx(db, aid, "adjustment", -(amount // NC) * NC, at)
    c = store.credits(db, aid, limit)
    rows = c["recent_transactions"]
    assert len(rows) <= limit
    assert [t["id"] for t in rows] == sorted((t["id"] for t in rows), reverse=True)
    # money rows are exact; usage rows take what the whole-cent balance moved
    for t in rows:
        if t["tx_type"] != "usage":
            assert t["amount"] * NC == t["amount_nanocents"]
    if len(rows) < limit:  # the whole history is on the page
        assert sum(t["amount"] for t in rows) == c["balance"]
        assert sum(t["amount_nanocents"] for t in rows) == c["balance_nanocents"]
    db.conn.close()
