"""The operator CLI as operators and outside scripts use it (CONTRACT section 4).

The real ``datorus`` console script against a real ledger (a SQLite file, or a
PostgreSQL database with ``DATORUS_TEST_LEDGER=postgresql``): with ``--json`` exactly
one JSON object on stdout with at least the contract's keys, every key camelCase; on
failure nothing on stdout, the envelope on stderr and a non-zero exit, and without
``--json`` a sentence that says what to do next. Each run gets its own settings file
(``DATORUS_CONF``) and no ``DATORUS_*`` variables from the developer's shell.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support.ledger import LedgerTarget, is_url, ledger_dir, new_ledger
from support.origins import Origin
from support.paths import DATORUS
from support.processes import Gateway
from support.waiting import free_port, wait_until

ENVELOPE_KEYS = {"code", "message", "details", "requestId", "timestamp"}
CAMEL = re.compile(r"^[a-z][a-zA-Z0-9]*$")
BOOLEAN_KEYS = {"toppedUp", "revoked", "enabled", "created", "removed", "passed", "fileExists"}
# the settings file of most tests: defaults the outputs can be checked against
CONF = "price_cents_per_gb: 275\nmax_tunnels: 12\nburst: 9\n"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the developer's DATORUS_* variables, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATORUS_")}
    return {**env, **extra}


def run(
    db: LedgerTarget | None,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """``datorus [--db DB] ARGS`` with both streams captured."""
    cmd = [DATORUS, *(["--db", str(db)] if db is not None else []), *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else clean_env(DATORUS_CONF=str(conf_of(db))),
        cwd=cwd,
    )


def conf_of(db: LedgerTarget | None) -> Path:
    """The settings file of the test that owns *db*: ``mitm.conf`` in its folder."""
    assert db is not None, "a run without --db names its environment"
    return ledger_dir(db) / "mitm.conf"


def ok(db: LedgerTarget | None, *args: str, **kw: Any) -> dict:
    """The one JSON object a successful ``--json`` command prints (its keys checked)."""
    p = run(db, *args, "--json", **kw)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 1  # exactly one object, on one line
    out = json.loads(p.stdout)
    assert_camel(out, " ".join(args))
    return out


def assert_camel(value: Any, where: str, path: str = "") -> None:
    """Every key at every depth is camelCase; the known booleans are JSON booleans."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert CAMEL.match(k), f"{where}: key {path}{k!r} is not camelCase"
            if k in BOOLEAN_KEYS:
                assert isinstance(v, bool), f"{where}: {path}{k} is {v!r}, not a boolean"
            assert_camel(v, where, f"{path}{k}.")
    elif isinstance(value, list):
        for v in value:
            assert_camel(v, where, path)


def table(db: LedgerTarget, *args: str) -> str:
    """A command's readable output, which never shows Python's None."""
    p = run(db, *args)
    assert p.returncode == 0, p.stderr
    assert "None" not in p.stdout, p.stdout
    return p.stdout


def error(db: LedgerTarget | None, *args: str, **kw: Any) -> str:
    """The one sentence a failing command prints without --json."""
    p = run(db, *args, **kw)
    assert p.returncode != 0 and p.stdout == "", (p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1, p.stderr
    assert "{" not in p.stderr and "_ERROR" not in p.stderr and "NOT_FOUND" not in p.stderr
    return p.stderr.strip()


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> LedgerTarget:
    d = new_ledger(tmp_path_factory.mktemp("cli"))
    conf_of(d).write_text(CONF)
    shown = ok(d, "init")["db"]
    if is_url(d):
        assert shown == d
    else:
        assert Path(shown).resolve() == Path(d).resolve()
    return d


def test_every_stable_command_prints_its_keys(db: LedgerTarget) -> None:
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


def test_every_json_object_is_camel_case_with_real_booleans(db: LedgerTarget) -> None:
    """Every command a fresh ledger can run: every key at every depth is camelCase."""
    aid = str(ok(db, "account", "create", "cli-camel@example.com", "--trial-bytes", "0")["id"])
    listed = ok(db, "account", "list")["items"]
    row = next(r for r in listed if r["id"] == int(aid))
    assert row["toppedUp"] is False and row["trialRemainingBytes"] == 0
    ok(db, "account", "show", aid)
    ok(db, "account", "set", aid, "--rps", "3")
    cred = ok(db, "credential", "create", aid, "--label", "camel", "--max-bytes", "1000")
    ok(db, "credential", "list", aid)
    ok(db, "balance", "add", aid, "40")
    assert ok(db, "account", "show", aid)["toppedUp"] is True
    ok(db, "balance", "add", aid, "-15", "--reason", "typo")
    history = ok(db, "balance", "history", aid)["items"]
    assert {"trialBytes", "externalId", "createdAt"} <= set(history[0])
    ok(db, "usage", aid)
    assert ok(db, "usage", aid, "--by", "day")["days"] == []
    ok(db, "policy", "allow", "10.9.0.0/16:8080")
    assert {"createdAt"} <= set(ok(db, "policy", "list")["items"][0])
    ok(db, "policy", "remove", "allow", "10.9.0.0/16:8080")
    eg = ok(db, "egress", "add", "direct://127.0.0.9")
    ok(db, "egress", "list")
    assert "checks" in ok(db, "egress", "show", str(eg["id"]))
    ok(db, "egress", "disable", str(eg["id"]))
    ok(db, "egress", "enable", str(eg["id"]))
    ok(db, "egress", "remove", str(eg["id"]))
    key = ok(db, "key", "create", aid, "--label", "camel")
    assert {"createdAt", "lastUsedAt"} <= set(ok(db, "key", "list", aid)["items"][0])
    ok(db, "key", "revoke", str(key["id"]))
    ok(db, "outbox")
    ok(db, "settings")
    ok(db, "quickstart", "cli-camel-qs@example.com")
    ok(db, "credential", "revoke", cred["username"])
    ok(db, "account", "suspend", aid)
    ok(db, "init")


def test_tables_show_values_not_none_and_account_set_prints_what_is_in_effect(
    db: LedgerTarget,
) -> None:
    aid = str(ok(db, "account", "create", "cli-set@example.com")["id"])
    changed = ok(db, "account", "set", aid, "--rps", "1", "--burst", "1")
    # price and tunnels were not touched: the gateway's defaults (CONF) are in effect
    assert (changed["rps"], changed["burst"]) == (1, 1)
    assert (changed["priceCentsPerGb"], changed["maxTunnels"]) == (275, 12)
    text = table(db, "account", "set", aid, "--rps", "2")
    assert re.search(r"^priceCentsPerGb +275 +\(default\)$", text, re.M), text
    assert re.search(r"^rps +2$", text, re.M), text
    assert re.search(r"^provider +-$", text, re.M) and re.search(r"^toppedUp +no$", text, re.M)
    for args in (
        ("account", "show", aid),
        ("account", "list"),
        ("credential", "list", aid),
        ("balance", "history", aid),
        ("policy", "list"),
        ("settings",),
        ("key", "list", aid),
    ):
        table(db, *args)


def test_help_is_plain_text_and_flags_take_no_value(db: LedgerTarget) -> None:
    for args in ((), ("account", "create"), ("balance", "add"), ("quickstart",), ("settings",)):
        p = run(db, *args, "--help")
        assert p.returncode == 0, p.stderr
        assert "``" not in p.stdout and "<bool>" not in p.stdout, p.stdout
    top = run(db, "--help").stdout
    assert re.search(r"--json +Print one JSON object", top), top
    assert "ACCOUNT_ID" in run(db, "balance", "add", "--help").stdout
    # examples with glob stars survive the help's markdown (a probe copied 'proxy.,credits.')
    wide = clean_env(DATORUS_CONF=str(conf_of(db)), COLUMNS="200")
    assert "'proxy.*,credits.*'" in run(db, "notifier", "add", "--help", env=wide).stdout
    assert "'*/30 * * * *'" in run(db, "source", "add", "--help", env=wide).stdout


# -- errors -------------------------------------------------------------------------------


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
        # amounts that would not fit the ledger's exact 64-bit integers: refused, not crashed
        (("balance", "add", "1", "10000000000"), "VALIDATION_ERROR", "cents"),
        (("balance", "add", "1", "99999999999999999999999"), "VALIDATION_ERROR", "cents"),
        (
            ("account", "create", "big@example.com", "--trial-bytes", "9" * 23),
            "VALIDATION_ERROR",
            "trial_bytes",
        ),
        (
            ("account", "create", "big@example.com", "--price-cents-per-gb", str(2**63 - 1)),
            "VALIDATION_ERROR",
            "price_cents_per_gb",
        ),
        (("account", "create", "big@example.com", "--rps", "9" * 23), "VALIDATION_ERROR", "rps"),
        (("credential", "create", "1", "--max-bytes", "9" * 23), "VALIDATION_ERROR", "max_bytes"),
        (("balance", "history", "1", "--limit", "9" * 23), "VALIDATION_ERROR", None),
        (("balance", "history", "1", "--limit", "-1"), "VALIDATION_ERROR", None),
    ],
)
def test_failures_are_the_envelope_on_stderr(db: LedgerTarget, args, code, field) -> None:
    p = run(db, *args, "--json")
    assert p.returncode != 0
    assert p.stdout == ""
    err = json.loads(p.stderr)["error"]
    assert set(err) == ENVELOPE_KEYS
    assert err["code"] == code, err
    if code == "VALIDATION_ERROR":
        assert err["details"]["reason"]
        assert err["details"]["field"] == (field or err["details"]["field"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("account", "show", "99"), "No account 99. List accounts with 'datorus account list'."),
        (
            ("credential", "revoke", "dtnosuchuser"),
            "No credential dtnosuchuser. List an account's credentials with"
            " 'datorus credential list ACCOUNT_ID'.",
        ),
        (("egress", "show", "99"), "No egress 99. List the pool with 'datorus egress list'."),
        (
            ("policy", "remove", "allow", "10.8.0.0/16"),
            "No policy rule '10.8.0.0/16'. List the rules with 'datorus policy list'.",
        ),
        (
            ("account", "create", "not-an-email"),
            "Invalid EMAIL: must be an email address. See 'datorus account create --help'.",
        ),
        (
            ("balance", "add", "1", "abc"),
            "Invalid CENTS: must be a whole number. See 'datorus balance add --help'.",
        ),
        (
            ("account", "show"),
            "Missing argument 'ACCOUNT_ID'. See 'datorus account show --help'.",
        ),
        (("no-such-command",), "No such command 'no-such-command'. See 'datorus --help'."),
        (
            ("notifier", "test", "999"),
            "No notifier 999. List the notifiers with 'datorus notifier list'.",
        ),
        (
            ("notifier", "remove", "999"),
            "No notifier 999. List the notifiers with 'datorus notifier list'.",
        ),
        (
            ("quickstart", "cli-qs0@example.com", "--target", "ftp://x"),
            "Invalid --target: must be an http(s) URL. See 'datorus quickstart --help'.",
        ),
    ],
)
def test_errors_without_json_are_sentences_with_the_next_step(
    db: LedgerTarget, args, expected
) -> None:
    assert error(db, *args) == expected


def test_an_unknown_notifier_is_named_a_notifier_under_json(db: LedgerTarget) -> None:
    p = run(db, "notifier", "test", "999", "--json")
    assert p.returncode == 1 and p.stdout == ""
    err = json.loads(p.stderr)["error"]
    assert set(err) == ENVELOPE_KEYS
    assert (err["code"], err["details"]) == ("RESOURCE_NOT_FOUND", {"notifier": "999"})


def test_a_policy_cidr_with_host_bits_is_widened_and_says_so(db: LedgerTarget) -> None:
    """Scripts keep working (exit 0, the network is the rule), but the widening is said:
    on stderr for a person, as ``warning`` under --json (probe 8, item 12)."""
    p = run(db, "policy", "allow", "10.77.0.1/16")
    assert p.returncode == 0, p.stderr
    assert p.stderr == "10.77.0.1/16 has host bits set: allowed 10.77.0.0/16\n"
    assert "allow 10.77.0.0/16" in p.stdout and "host bits" not in p.stdout
    out = ok(db, "policy", "deny", "10.78.0.1/16:443")
    assert out["rule"] == "deny 10.78.0.0/16:443"
    assert out["warning"] == "10.78.0.1/16 has host bits set: denied 10.78.0.0/16"
    exact = run(db, "policy", "allow", "10.79.0.0/16")
    assert exact.returncode == 0 and exact.stderr == ""
    assert ok(db, "policy", "allow", "10.79.0.0/16")["warning"] is None
    ok(db, "policy", "deny", "10.78.0.0/16:443")
    items = ok(db, "policy", "list")["items"]
    rules = {(r["action"], r["target"]) for r in items}
    assert {("allow", "10.77.0.0/16"), ("deny", "10.78.0.0/16")} <= rules
    # each rule given twice above is one rule, with a port or without (rows without one
    # used to repeat: NULL ports differ to a UNIQUE constraint; probe 8b)
    for target in ("10.78.0.0/16", "10.79.0.0/16"):
        assert sum(r["target"] == target for r in items) == 1, items
    for spec in ("allow 10.77.0.0/16", "deny 10.78.0.0/16:443", "allow 10.79.0.0/16"):
        ok(db, "policy", "remove", *spec.split())


def test_an_smtp_notifier_without_smtp_host_is_added_with_a_warning(db: LedgerTarget) -> None:
    """Accepted (exit 0: the host may be set later), but the operator is told the mail
    will wait and how to set the host (probe 8, item 19)."""
    p = run(db, "notifier", "add", "smtp", "cli-ops@example.com", "--events", "proxy.*")
    assert p.returncode == 0, p.stderr
    nid = re.search(r"^id\s+(\d+)$", p.stdout, re.M)
    assert nid is not None, p.stdout
    assert p.stderr == (
        "No smtp_host is set: mail to cli-ops@example.com waits in the delivery queue"
        " (retried for up to a day) until it is. Set smtp_host in the settings file (see"
        " 'datorus settings') or DATORUS_SMTP_HOST, restart the gateway, then check with"
        f" 'datorus notifier test {nid.group(1)}'.\n"
    )
    out = ok(db, "notifier", "add", "smtp", "cli-ops2@example.com")
    assert out["warning"].startswith("No smtp_host is set: mail to cli-ops2@example.com")
    with_host = conf_of(db).read_text() + "smtp_host: 127.0.0.1\n"
    conf = ledger_dir(db) / "with-smtp.conf"
    conf.write_text(with_host)
    p = run(
        db, "notifier", "add", "smtp", "cli-ops3@example.com", env=clean_env(DATORUS_CONF=str(conf))
    )
    assert p.returncode == 0 and p.stderr == "", p.stderr
    for n in ok(db, "notifier", "list")["items"]:
        if n["target"].startswith("cli-ops"):
            ok(db, "notifier", "remove", n["id"])


def test_email_taken_and_readable_output_without_json(db: LedgerTarget) -> None:
    ok(db, "account", "create", "cli-bob@example.com")
    p = run(db, "account", "create", "cli-bob@example.com", "--json")
    assert p.returncode != 0 and json.loads(p.stderr)["error"]["code"] == "EMAIL_TAKEN"
    assert error(db, "account", "create", "cli-bob@example.com") == (
        "An account with the email cli-bob@example.com already exists."
        " Find it with 'datorus account list'."
    )
    aid = str(ok(db, "account", "create", "cli-carol@example.com")["id"])
    text = table(db, "account", "show", aid)
    assert "cli-carol@example.com" in text and "trialRemainingBytes" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # a table for people, not JSON


# -- negative amounts: corrections --------------------------------------------------------


def test_a_negative_amount_is_a_correction_with_a_reason(db: LedgerTarget) -> None:
    """`balance add ID -N --reason R` takes N cents off: an adjustment, not a top-up."""
    aid = str(ok(db, "account", "create", "cli-fix@example.com", "--trial-bytes", "0")["id"])
    # without a reason: refused, and said so
    p = run(db, "balance", "add", aid, "-100", "--json")
    assert p.returncode != 0
    assert json.loads(p.stderr)["error"]["details"]["field"] == "reason"
    assert "--reason" in error(db, "balance", "add", aid, "-100")
    # never below zero: nothing to correct on a fresh account, and it stays untopped
    p = run(db, "balance", "add", aid, "-1", "--reason", "nothing there", "--json")
    err = json.loads(p.stderr)["error"]
    assert (err["code"], err["details"]["field"], err["details"]["balanceCents"]) == (
        "VALIDATION_ERROR",
        "cents",
        0,
    )
    assert "below zero" in error(db, "balance", "add", aid, "-1", "--reason", "nothing there")
    assert ok(db, "balance", "history", aid)["items"] == []
    # a top-up entered twice, then corrected
    ok(db, "balance", "add", aid, "150", "--reason", "paid 150")
    ok(db, "balance", "add", aid, "150", "--reason", "paid 150")
    fixed = ok(db, "balance", "add", aid, "-150", "--reason", "entered twice")
    assert (fixed["balanceCents"], fixed["kind"]) == (150, "adjustment")
    shown = ok(db, "account", "show", aid)
    assert (shown["balanceCents"], shown["toppedUp"]) == (150, True)
    items = ok(db, "balance", "history", aid)["items"]
    assert [(i["kind"], i["nanocents"], i["reason"]) for i in items][0] == (
        "adjustment",
        -150 * 10**9,
        "entered twice",
    )
    # the balance is the sum of the transactions, to the nanocent
    assert sum(i["nanocents"] for i in items) == shown["balanceNanocents"]
    # more than the balance: refused, nothing written
    assert run(db, "balance", "add", aid, "-151", "--reason", "too much").returncode != 0
    assert len(ok(db, "balance", "history", aid)["items"]) == len(items)


def test_a_zero_amount_is_neither_a_top_up_nor_a_correction(db: LedgerTarget) -> None:
    aid = str(ok(db, "account", "create", "cli-fix2@example.com", "--trial-bytes", "0")["id"])
    assert "must be > 0" in error(db, "balance", "add", aid, "0")
    assert ok(db, "account", "show", aid)["toppedUp"] is False
    assert ok(db, "balance", "history", aid)["items"] == []


# -- where the ledger is ------------------------------------------------------------------


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a settings file without db, a folder with no ledger to run the CLI from)."""
    conf = tmp_path / "conf" / "mitm.conf"
    conf.parent.mkdir()
    conf.write_text("rps: 5\n")
    folder = tmp_path / "somewhere-else"
    folder.mkdir()
    yield conf, folder


@pytest.mark.sqlite_only  # the default ./datorus.db file
def test_no_ledger_names_the_absolute_path_and_how_to_point_at_the_real_one(elsewhere) -> None:
    conf, folder = elsewhere
    env = clean_env(DATORUS_CONF=str(conf))
    message = error(None, "account", "list", env=env, cwd=folder)
    path = str(folder / "datorus.db")
    assert message.startswith(f"No ledger at {path} (the default ./datorus.db"), message
    assert message.index("--db") < message.index("DATORUS_DB") < message.index("datorus init")
    assert str(conf) in message
    p = run(None, "account", "list", "--json", env=env, cwd=folder)
    err = json.loads(p.stderr)["error"]
    assert (err["code"], err["details"]) == ("SERVICE_UNAVAILABLE", {"db": path})
    # a relative DATORUS_DB is named absolutely too, with where it came from
    env = clean_env(DATORUS_CONF=str(conf), DATORUS_DB="rel.db")
    message = error(None, "usage", "1", env=env, cwd=folder)
    assert message.startswith(f"No ledger at {folder / 'rel.db'} (from DATORUS_DB)."), message
    assert not list(folder.iterdir())  # asking made no second, empty ledger


@pytest.mark.sqlite_only  # a file path whose folder is missing
def test_init_where_no_ledger_can_be_made_names_the_path_and_the_reason(tmp_path: Path) -> None:
    env = clean_env(DATORUS_CONF=str(tmp_path / "none.conf"))
    (tmp_path / "none.conf").write_text("")
    assert error(Path("/nonexistent/dir/x.db"), "init", env=env) == (
        "Cannot create the ledger at /nonexistent/dir/x.db: the folder /nonexistent/dir does"
        " not exist. Create it, or name another path with --db PATH."
    )
    p = run(Path("/nonexistent/dir/x.db"), "init", "--json", env=env)
    err = json.loads(p.stderr)["error"]
    assert err["code"] == "VALIDATION_ERROR" and err["details"]["field"] == "db"
    assert "/nonexistent/dir" in err["message"]


@pytest.mark.sqlite_only  # a file path relative to the settings file
def test_a_relative_db_in_the_settings_file_is_one_ledger_for_gateway_and_cli(
    tmp_path: Path,
) -> None:
    """``db: ledger.db`` in the file means the file's folder, from any working directory.

    The gateway runs in the repository (its README command), the CLI in another folder;
    both read the settings file and nothing else names the ledger, yet the credential the
    CLI makes works through the gateway, and `datorus quickstart` hands out working access:
    the proxy line and the API key.
    """
    conf_dir, folder = tmp_path / "conf", tmp_path / "work"
    conf_dir.mkdir(), folder.mkdir()
    api_port = free_port()
    conf = conf_dir / "mitm.conf"
    conf.write_text(f"db: ledger.db\napi_host: 127.0.0.1\napi_port: {api_port}\n")
    env = clean_env(DATORUS_CONF=str(conf))
    init = ok(None, "init", env=env, cwd=folder)
    assert init["db"] == str(conf_dir / "ledger.db") and init["created"] is True
    ok(None, "policy", "allow", "127.0.0.0/8", env=env, cwd=folder)
    settings = {i["name"]: i for i in ok(None, "settings", env=env, cwd=folder)["items"]}
    assert (settings["db"]["value"], settings["db"]["source"]) == (
        str(conf_dir / "ledger.db"),
        "mitm.conf",
    )
    gw = Gateway(conf_dir / "ledger.db", settings={"api_port": api_port}, env=env, set_db=False)
    origin = Origin()
    try:
        gw.start()
        qs = ok(
            None, "quickstart", "cli-qs@example.com", "--port", str(gw.port), env=env, cwd=folder
        )
        assert qs["proxyUrl"] == f"http://{qs['username']}:{qs['password']}@127.0.0.1:{gw.port}"
        assert qs["curl"] == f"curl -x {qs['proxyUrl']} http://example.com/"
        assert qs["apiUrl"] == f"http://127.0.0.1:{api_port}" and qs["notes"] == []
        gw.wait_for_credential(qs["username"], qs["password"])
        # the printed curl line, aimed at the loopback origin, through the real gateway
        argv = shlex.split(qs["curl"])[:-1] + ["-s", "-i", "--max-time", "20", origin.url("/x")]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.stdout.startswith("HTTP/1.1 200"), out.stdout + out.stderr
        request_id = re.search(r"(?im)^x-datorus-request-id: (\S+)", out.stdout).group(1)
        # and the API key, through the printed REST line
        headers = dict([shlex.split(qs["apiCurl"])[2].split(": ", 1)])
        account = wait_until(
            lambda: requests.get(f"{qs['apiUrl']}/account", headers=headers, timeout=10),
            10,
            0.1,
            "REST API up",
        )
        assert account.status_code == 200 and "cli-qs@example.com" in account.text
        receipt = wait_until(
            lambda: ok(None, "receipt", request_id, env=env, cwd=folder), 5, 0.1, "receipt"
        )
        assert receipt["requestId"] == request_id and receipt["bytesDown"] > 0
        # a local target: the output says the policy must allow it first
        ok(None, "policy", "remove", "allow", "127.0.0.0/8", env=env, cwd=folder)
        qs2 = ok(
            None,
            "quickstart",
            "cli-qs2@example.com",
            "--target",
            origin.url("/x"),
            env=env,
            cwd=folder,
        )
        assert qs2["notes"] and "datorus policy allow 127.0.0.1/32" in qs2["notes"][0]
    finally:
        gw.stop()
        origin.close()


# -- datorus settings ---------------------------------------------------------------------


def test_settings_name_each_value_and_where_it_came_from(db: LedgerTarget) -> None:
    env = clean_env(DATORUS_CONF=str(conf_of(db)), DATORUS_RPS="7", DATORUS_STRIPE_API_KEY="sk_x")
    out = ok(db, "settings", env=env)
    assert out["file"] == str(conf_of(db)) and out["fileExists"] is True
    items = {i["name"]: i for i in out["items"]}
    assert (items["rps"]["value"], items["rps"]["source"]) == (7, "environment")
    assert (items["burst"]["value"], items["burst"]["source"]) == (9, "mitm.conf")
    assert (items["header_timeout"]["value"], items["header_timeout"]["source"]) == (5, "default")
    assert items["stripe_api_key"]["value"] == "********"  # a secret is never printed
    assert items["rps"]["env"] == "DATORUS_RPS" and items["rps"]["option"] == "datorus_rps"
    assert all(i["help"] for i in out["items"])
    text = run(db, "settings", env=env).stdout
    assert re.search(r"^rps +7 +environment$", text, re.M), text
    assert "sk_x" not in text
    # a bad value stops it with a message naming the setting
    message = error(db, "settings", env={**env, "DATORUS_RPS": "fast"})
    assert "datorus_rps" in message


def test_a_balance_stays_an_exact_integer_at_its_cap(tmp_path: Path) -> None:
    """Top-ups past the cap are refused: the balance never leaves exact integers."""
    db = new_ledger(tmp_path, "cap.db")
    conf_of(db).write_text(CONF)
    ok(db, "init")
    acc = ok(db, "account", "create", "cap@example.com")
    ok(db, "balance", "add", str(acc["id"]), "999999999")
    ok(db, "balance", "add", str(acc["id"]), "1")
    err = json.loads(run(db, "balance", "add", str(acc["id"]), "1", "--json").stderr)["error"]
    assert err["code"] == "VALIDATION_ERROR" and err["details"]["field"] == "cents"
    shown = ok(db, "account", "show", str(acc["id"]))
    assert shown["balanceCents"] == 10**9 and shown["balanceNanocents"] == 10**18
