"""The operator CLI's stable part (CONTRACT section 4), as outside scripts use it.

The real ``datorus`` console script against a real SQLite file: with ``--json`` exactly
one JSON object on stdout with at least the contract's keys; on failure nothing on
stdout, the envelope on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support import DATORUS

ENVELOPE_KEYS = {"code", "message", "details", "requestId", "timestamp"}


def run(db: Path, *args: str) -> subprocess.CompletedProcess:
    """``datorus --db DB ARGS`` with both streams captured."""
    return subprocess.run(
        [DATORUS, "--db", str(db), *args], capture_output=True, text=True, timeout=60
    )


def ok(db: Path, *args: str) -> dict:
    """The one JSON object a successful ``--json`` command prints."""
    p = run(db, *args, "--json")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 1  # exactly one object, on one line
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "ledger.db"
    assert Path(ok(d, "init")["db"]).resolve() == d.resolve()
    return d


def test_every_stable_command_prints_its_keys(db: Path) -> None:
    assert set(ok(db, "init")) >= {"db"}  # idempotent: a second init is fine
    acc = ok(
        db,
        "account",
        "create",
        "cli-alice@example.com",
        "--trial-bytes",
        "5000",
        "--price-cents-per-gb",
        "250",
        "--rps",
        "7",
        "--burst",
        "9",
        "--max-tunnels",
        "3",
    )
    assert set(acc) >= {"id", "email"} and acc["email"] == "cli-alice@example.com"
    aid = str(acc["id"])
    shown = ok(db, "account", "show", aid)
    assert set(shown) >= {
        "id",
        "email",
        "status",
        "trialRemainingBytes",
        "balanceCents",
        "usedBytes",
    }
    assert (shown["status"], shown["trialRemainingBytes"], shown["balanceCents"]) == (
        "active",
        5000,
        0,
    )
    assert (shown["rps"], shown["burst"], shown["maxTunnels"]) == (7, 9, 3)
    suspended = ok(db, "account", "suspend", aid)
    assert (suspended["id"], suspended["status"]) == (acc["id"], "suspended")
    unsuspended = ok(db, "account", "unsuspend", aid)
    assert (unsuspended["id"], unsuspended["status"]) == (acc["id"], "active")
    cred = ok(db, "credential", "create", aid)
    assert set(cred) >= {"username", "password"} and len(cred["password"]) >= 16
    revoked = ok(db, "credential", "revoke", cred["username"])
    assert revoked["username"] == cred["username"] and revoked["revoked"] is True
    bal = ok(db, "balance", "add", aid, "125", "--reason", "cli test")
    assert bal["id"] == acc["id"] and bal["balanceCents"] == 125
    usage = ok(db, "usage", aid)
    assert set(usage) >= {"id", "requests", "bytes", "chargedCents"}
    assert (usage["requests"], usage["bytes"], usage["chargedCents"]) == (0, 0, 0)
    eg = ok(db, "egress", "add", "direct://", "--country", "us")
    assert set(eg) >= {"id", "url"} and eg["url"] == "direct://"
    assert [e["id"] for e in ok(db, "egress", "list")["items"]] == [eg["id"]]
    assert ok(db, "policy", "allow", "127.0.0.0/8")["rule"]
    assert ok(db, "policy", "deny", "blocked.example:8080")["rule"]
    # --json anywhere on the line
    p = run(db, "--json", "account", "show", aid)
    assert p.returncode == 0 and json.loads(p.stdout)["id"] == acc["id"]


@pytest.mark.parametrize(
    ("args", "code", "field"),
    [
        (("account", "show", "999999"), "RESOURCE_NOT_FOUND", None),
        (("account", "show", "abc"), "VALIDATION_ERROR", "id"),
        (("account", "show"), "VALIDATION_ERROR", "account_id"),
        (("account", "create", "not-an-email"), "VALIDATION_ERROR", "email"),
        (("account", "create", "x@example.com", "--rps", "abc"), "VALIDATION_ERROR", "rps"),
        (("balance", "add", "1", "abc"), "VALIDATION_ERROR", "cents"),
        (("credential", "revoke", "dtnosuchuser"), "RESOURCE_NOT_FOUND", None),
        (("policy", "allow", "10.0.0.0/99"), "VALIDATION_ERROR", None),
        (("egress", "add", "ftp://proxy.example:21"), "VALIDATION_ERROR", "url"),
        (("no-such-command",), "VALIDATION_ERROR", "command"),
    ],
)
def test_failures_are_the_envelope_on_stderr(db: Path, args, code, field) -> None:
    p = run(db, *args, "--json")
    assert p.returncode != 0
    assert p.stdout == ""
    err = json.loads(p.stderr)["error"]
    assert set(err) == ENVELOPE_KEYS
    assert err["code"] == code, err
    if code == "VALIDATION_ERROR":
        assert err["details"]["reason"]
        assert err["details"]["field"] == (field or err["details"]["field"])


def test_email_taken_and_readable_output_without_json(db: Path) -> None:
    ok(db, "account", "create", "cli-bob@example.com")
    p = run(db, "account", "create", "cli-bob@example.com", "--json")
    assert p.returncode != 0 and json.loads(p.stderr)["error"]["code"] == "EMAIL_TAKEN"
    p = run(db, "account", "create", "cli-bob@example.com")
    assert p.returncode != 0 and p.stderr.startswith("error: EMAIL_TAKEN")
    aid = str(ok(db, "account", "create", "cli-carol@example.com")["id"])
    p = run(db, "account", "show", aid)
    assert p.returncode == 0
    assert "cli-carol@example.com" in p.stdout and "trialRemainingBytes" in p.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(p.stdout)  # a table for people, not JSON
