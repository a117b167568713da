"""A test's ledger: the real ``datorus`` CLI on a SQLite file, and the pool filled before start."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from .paths import DATORUS


def cli(db: str | Path, *args: str, check: bool = True) -> dict[str, Any]:
    """Run ``datorus --db DB ARGS --json`` and return its one JSON object."""
    p = subprocess.run(
        [DATORUS, "--db", str(db), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"datorus {args} failed ({p.returncode}): {p.stderr}")
    out = p.stdout if p.returncode == 0 else p.stderr
    return json.loads(out) if out.strip() else {}


def prepare_ledger(db: Path) -> None:
    """``datorus init`` and allow the loopback origins the tests use."""
    cli(db, "init")
    cli(db, "policy", "allow", "127.0.0.0/8")
    cli(db, "policy", "allow", "::1/128")


def add_egress(db: Path, items: list[tuple[str, str]]) -> None:
    """Fill the pool before the gateway starts (the CLI test covers the live path)."""
    from datorus_core import ledger
    from datorus_core.ledger import egress as egress_ledger

    conn = ledger.open_ledger(db)
    for url, country in items:
        egress_ledger.add_egress(conn, url, country)
    conn.conn.close()
