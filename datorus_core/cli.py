"""``datorus``: the operator CLI (Typer over the ledger package).

Every command takes ``--db PATH`` (else ``DATORUS_DB``, else ``db`` in the settings
file, else ``./datorus.db``) and ``--json``, anywhere on the command line. With
``--json`` a command prints exactly one JSON object on stdout (camelCase keys), and on
failure the error envelope on stderr with a non-zero exit. Without it, it prints a
readable table, and on failure a sentence that says what to do next.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, Protocol

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from . import pricing
from .domains import HOSTS_FOLDED, by_registrable
from .envelope import DatorusError, envelope, request_id_floor, validation_error
from .ledger import (
    DatabaseError,
    Ledger,
    accounts,
    allowed_ips,
    connect,
    money,
    open_ledger,
    policy_rules,
)
from .ledger import usage as ledger_usage
from .ledger.target import is_postgres, scrubbed, shown
from .settings import (
    SETTINGS,
    SettingsError,
    conf_path,
    ledger_location,
    public_base,
    resolve_defaults,
    resolve_sources,
    shown_value,
)

APP_HELP = """The Datorus operator CLI: accounts, credentials, balances, policy, the egress pool
and its proxy-list sources.

Every command takes --db PATH or --db postgresql://... (else the DATORUS_DB environment
variable, else db in mitm.conf, else ./datorus.db) and --json, anywhere on the line.
With --json it prints one JSON object; on failure, the error envelope on stderr and exit status 1.
"""


def _tidy_params(params: list) -> list:
    """Help that reads like the README: ACCOUNT_ID for arguments, no value after a flag."""
    for p in params:
        if p.metavar is not None:
            continue
        if isinstance(p, TyperArgument):
            p.metavar = p.name.upper()
        elif getattr(p, "is_flag", False):
            p.metavar = ""  # Typer would print <bool>, as if the flag took a value
    return params


class _Command(TyperCommand):
    """A command whose help lists flags without a value placeholder."""

    def get_params(self, ctx):  # noqa: D102
        return _tidy_params(super().get_params(ctx))


class _Group(TyperGroup):
    """A command group whose help lists flags without a value placeholder."""

    def get_params(self, ctx):  # noqa: D102
        return _tidy_params(super().get_params(ctx))


class _Typer(typer.Typer):
    """Typer with Datorus's help style: rich markup, plain docstrings, flags as flags."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("no_args_is_help", True)
        kwargs.setdefault("rich_markup_mode", "markdown")
        super().__init__(cls=_Group, **kwargs)

    def command(self, *args: Any, **kwargs: Any):  # noqa: D102
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _Typer(add_completion=False, help=APP_HELP, pretty_exceptions_enable=False)
account_app = _Typer(help="Customer accounts.")
credential_app = _Typer(help="Proxy credentials.")
balance_app = _Typer(help="Prepaid balances.")
policy_app = _Typer(help="Acceptable-use policy rules.")
app.add_typer(account_app, name="account")
app.add_typer(credential_app, name="credential")
app.add_typer(balance_app, name="balance")
app.add_typer(policy_app, name="policy")


class _Run:
    """The global options, set by the root callback."""

    db: str | None = None
    json: bool = False


RUN = _Run()


@app.callback()
def _root(
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            metavar="PATH",
            help="The ledger: a SQLite path or a postgresql:// URL (else DATORUS_DB, else"
            " db in mitm.conf, else ./datorus.db).",
        ),
    ] = None,
    json_: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    RUN.db = db
    RUN.json = json_


# -- output -------------------------------------------------------------------------------

_CAMEL = re.compile(r"_([a-z0-9])")


def camel(value: Any) -> Any:
    """*value* with every dict key, at any depth, in camelCase (``topped_up`` -> ``toppedUp``)."""
    if isinstance(value, dict):
        return {  # tags are the operator's own names: kept as given
            _CAMEL.sub(lambda m: m.group(1).upper(), str(k)): v if k == "tags" else camel(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [camel(v) for v in value]
    return value


def emit(result: dict[str, Any], table: Callable[[dict[str, Any]], str] | None = None) -> None:
    """Print *result* as one camelCase JSON object (``--json``) or as readable text."""
    result = camel(result)
    if RUN.json:
        print(json.dumps(result, separators=(",", ":"), default=str))
    else:
        print(table(result) if table else _kv(result))


def cell(value: Any) -> str:
    """A value as a table shows it: ``-`` for nothing, yes/no for booleans."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _kv(result: dict[str, Any], notes: dict[str, str] | None = None) -> str:
    notes = notes or {}
    shown = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
    width = max((len(k) for k in shown), default=0)
    return "\n".join(
        f"{k:<{width}}  {cell(v)}{notes.get(k, '')}".rstrip() for k, v in shown.items()
    )


def _rows(rows: list[dict[str, Any]], cols: tuple[str, ...] | None = None) -> str:
    if not rows:
        return "(none)"
    cols = cols or tuple(rows[0])
    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _items(cols: tuple[str, ...] | None = None) -> Callable[[dict[str, Any]], str]:
    return lambda r: _rows(r["items"], cols)


# -- inputs and the ledger ----------------------------------------------------------------


def _int(field: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise validation_error(field, "must be a whole number") from None


def _settings_error(e: SettingsError) -> DatorusError:
    return validation_error(
        "settings",
        str(e),
        f"The settings are invalid: {e}. Fix the file or the DATORUS_* variable.",
    )


def ledger_path() -> tuple[str, str]:
    """The ledger this invocation uses (absolute, or a URL) and where that came from."""
    try:
        return ledger_location(RUN.db)
    except SettingsError as e:
        raise _settings_error(e) from None


def db_path() -> str:
    """The ledger path this invocation uses."""
    return ledger_path()[0]


def _is_file(path: str) -> bool:
    return path != ":memory:" and "://" not in path


def _where(source: str) -> str:
    if source == "--db":
        return "given with --db"
    if source == "DATORUS_DB":
        return "from DATORUS_DB"
    if source == "default":
        return "the default ./datorus.db, in the current folder"
    return f"from db in {source}"


def _no_ledger(path: str, source: str) -> DatorusError:
    where = shown(path)
    return DatorusError(
        "SERVICE_UNAVAILABLE",
        message=(
            f"No ledger at {where} ({_where(source)}). If the gateway keeps its ledger"
            " elsewhere, name it with --db PATH or DATORUS_DB=PATH (or db in"
            f" {conf_path()}); run 'datorus init' only to create a new, empty ledger there."
        ),
        details={"db": where},
    )


def _cannot_create(path: str) -> DatorusError | None:
    """Why no ledger can be created at *path*, or None."""
    folder = os.path.dirname(path)
    reason = None
    if not os.path.isdir(folder):
        reason = f"the folder {folder} does not exist"
    elif not os.access(folder, os.W_OK | os.X_OK):
        reason = f"the folder {folder} is not writable"
    if reason is None:
        return None
    return validation_error(
        "db",
        reason,
        f"Cannot create the ledger at {path}: {reason}. Create it, or name another"
        " path with --db PATH.",
    )


def _db(create: bool = False):
    """The open ledger; only ``create`` (``datorus init``) may make a new one."""
    path, source = ledger_path()
    if _is_file(path) and not os.path.exists(path):
        if not create:
            raise _no_ledger(path, source)
        err = _cannot_create(path)
        if err is not None:
            raise err
    postgres = is_postgres(path)
    try:
        # a PostgreSQL database without a ledger in it is like a missing file: only
        # 'datorus init' makes the tables (the database itself must exist)
        return open_ledger(path, create=create or not postgres)
    except DatabaseError as e:
        where, hint = shown(path), ""
        if postgres and "does not exist" in str(e):
            hint = (
                " The database must exist: create it (createdb, or CREATE DATABASE),"
                " then run 'datorus init --db URL' to make the ledger's tables in it."
            )
        raise DatorusError(
            "SERVICE_UNAVAILABLE",
            message=f"Cannot open the ledger at {where}: {str(e).rstrip('.')}.{hint}",
            details={"db": where, "reason": str(e)},
        ) from None
    except DatorusError as e:
        if postgres and e.code == "SERVICE_UNAVAILABLE":
            raise _no_ledger(path, source) from None
        raise


def _schema_version(path: str) -> int:
    """The schema version of the PostgreSQL ledger at *path* (0: none there yet), or 0
    when it cannot be read (:func:`_db` then says why)."""
    try:
        db = Ledger(connect(path))
    except DatabaseError:
        return 0
    try:
        return db.schema_version()
    except DatabaseError:
        return 0
    finally:
        db.close()


def _defaults() -> dict[str, Any]:
    try:
        return resolve_defaults()
    except SettingsError as e:
        raise _settings_error(e) from None


# -- commands -----------------------------------------------------------------------------


@app.command()
def init() -> None:
    """Create the ledger, or bring an existing one up to date (safe to repeat).

    It prints the ledger's absolute path: the gateway must use the same one.
    """
    path, _ = ledger_path()
    created = _is_file(path) and not os.path.exists(path)
    if is_postgres(path):
        created = _schema_version(path) == 0
    db = _db(create=True)
    version = db.schema_version()
    emit(
        {"db": shown(path), "schemaVersion": version, "created": created},
        lambda r: (
            f"{'Created a new, empty' if r['created'] else 'The'} ledger at {r['db']}"
            f"{'' if r['created'] else ' is ready'} (schema {r['schemaVersion']})."
        ),
    )


_LIMITS = (
    ("priceCentsPerGb", "price_cents_per_gb"),
    ("rps", "rps"),
    ("burst", "burst"),
    ("maxTunnels", "max_tunnels"),
)


def _effective(acc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The account with the values in effect: its own, else the gateway's defaults.

    Also returns a note for each value that is a default, for the table.
    """
    defaults = _defaults()
    notes = {}
    for key, setting in _LIMITS:
        if acc[key] is None:
            acc[key] = defaults[setting]
            notes[key] = "  (default)"
    return acc, notes


def _show_effective(acc: dict[str, Any]) -> None:
    acc, notes = _effective(acc)
    emit(acc, lambda r: _kv(r, notes))


@account_app.command("create")
def account_create(
    email: str,
    trial_bytes: Annotated[int | None, typer.Option(help="Free trial bytes.")] = None,
    price_cents_per_gb: Annotated[int | None, typer.Option(help="Price in cents per GB.")] = None,
    rps: Annotated[int | None, typer.Option(help="Requests per second per credential.")] = None,
    burst: Annotated[int | None, typer.Option(help="Burst per credential.")] = None,
    max_tunnels: Annotated[int | None, typer.Option(help="Open tunnels at once.")] = None,
    provider: Annotated[str | None, typer.Option(help="Social login: google or github.")] = None,
) -> None:
    """Create a customer account with its free trial.

    Without a price or limit of its own, an account uses the gateway's defaults.
    """
    if provider is not None and provider not in ("google", "github"):
        raise validation_error("provider", "must be google or github")
    db = _db()
    trial = _defaults()["trial_bytes"] if trial_bytes is None else trial_bytes
    emit(
        accounts.create_account(
            db, email, trial, price_cents_per_gb, rps, burst, max_tunnels, provider, verified=True
        )
    )


@account_app.command("show")
def account_show(account_id: str) -> None:
    """One account: trial bytes left, balance, usage, and its price and limits in effect."""
    _show_effective(accounts.show_account(_db(), _int("id", account_id)))


@account_app.command("list")
def account_list() -> None:
    """Every account with its balance and usage."""
    rows = [
        {
            "id": r["id"],
            "email": r["email"],
            "status": r["status"],
            "trialRemainingBytes": max(0, r["trial_remaining_bytes"]),
            "balanceCents": pricing.whole_cents(r["balance_nanocents"]),
            "balanceNanocents": r["balance_nanocents"],
            "usedBytes": r["used_bytes"],
            "requests": r["requests"],
            "chargedNanocents": r["charged_nanocents"],
            "toppedUp": bool(r["topped_up"]),
        }
        for r in accounts.list_accounts(_db())
    ]
    emit(
        {"items": rows},
        _items(
            (
                "id",
                "email",
                "status",
                "trialRemainingBytes",
                "balanceCents",
                "usedBytes",
                "requests",
                "toppedUp",
            )
        ),
    )


def _set_status(account_id: str, status: str) -> None:
    emit(accounts.set_status(_db(), _int("id", account_id), status))


@account_app.command("suspend")
def account_suspend(account_id: str) -> None:
    """Suspend an account: its requests get 403 and its tunnels close."""
    _set_status(account_id, "suspended")


@account_app.command("unsuspend")
def account_unsuspend(account_id: str) -> None:
    """Lift a suspension."""
    _set_status(account_id, "active")


@account_app.command("set")
def account_set(
    account_id: str,
    price_cents_per_gb: Annotated[int | None, typer.Option(help="Price in cents per GB.")] = None,
    rps: Annotated[int | None, typer.Option(help="Requests per second per credential.")] = None,
    burst: Annotated[int | None, typer.Option(help="Burst per credential.")] = None,
    max_tunnels: Annotated[int | None, typer.Option(help="Open tunnels at once.")] = None,
) -> None:
    """Change an account's price or limits (a running gateway applies it within 2 s).

    Values not given stay as they are. It prints the account with the values in effect.
    """
    _show_effective(
        accounts.set_limits(
            _db(), _int("id", account_id), price_cents_per_gb, rps, burst, max_tunnels
        )
    )


@credential_app.command("create")
def credential_create(
    account_id: str,
    max_bytes: Annotated[int | None, typer.Option(help="Byte cap for this credential.")] = None,
    label: Annotated[str | None, typer.Option(help="A name for the credential.")] = None,
) -> None:
    """Create a proxy credential; the password is shown this once."""
    emit(accounts.create_credential(_db(), _int("account_id", account_id), max_bytes, label))


@credential_app.command("list")
def credential_list(account_id: str) -> None:
    """An account's credentials (never their passwords), each with its allow-listed CIDRs."""
    db, aid = _db(), _int("account_id", account_id)
    rows = accounts.list_credentials(db, aid)
    cidrs: dict[int, list[str]] = {}
    for entry in allowed_ips.list_allowed_ips(db, aid):
        cidrs.setdefault(entry["credentialId"], []).append(entry["cidr"])
    for row in rows:
        row["allowedIps"] = cidrs.get(row["id"], [])
    emit({"items": rows}, _items())


@credential_app.command("allow-ip")
def credential_allow_ip(username: str, cidr: str) -> None:
    """Let requests from CIDR in without credentials, as USERNAME (within 2 s).

    A request that carries credentials is still judged by them; where two credentials'
    CIDRs overlap, the most specific wins; a CIDR belongs to one credential only.
    """
    emit(allowed_ips.allow_ip(_db(), username, cidr))


@credential_app.command("deny-ip")
def credential_deny_ip(username: str, cidr: str) -> None:
    """Remove CIDR from USERNAME's allow-listed client addresses (within 2 s)."""
    emit(allowed_ips.deny_ip(_db(), username, cidr))


@credential_app.command("revoke")
def credential_revoke(username: str) -> None:
    """Revoke a credential (a running gateway refuses it within 2 s)."""
    emit(accounts.revoke_credential(_db(), username))


@balance_app.command("add", context_settings={"ignore_unknown_options": True})
def balance_add(
    account_id: str,
    cents: str,
    reason: Annotated[
        str | None, typer.Option(help="Why (kept in the ledger); required for a correction.")
    ] = None,
) -> None:
    """Top up an account's prepaid balance by CENTS.

    A negative CENTS corrects a mistake (a top-up entered twice, say): it needs --reason,
    is kept as an adjustment that does not count as a top-up, and cannot take the
    balance below zero.
    """
    db = _db()
    aid, amount = _int("account_id", account_id), _int("cents", cents)
    if amount < 0:
        if not (reason or "").strip():
            raise validation_error(
                "reason",
                "is required for a correction",
                "A negative CENTS is a correction and needs a reason: add --reason TEXT.",
            )
        result = money.correct_balance(db, aid, amount, reason or "")
    else:
        result = money.add_balance(db, aid, amount, reason or "operator top-up")
    emit({k: result[k] for k in ("id", "balanceCents", "balanceNanocents", "kind")})


@balance_app.command("history")
def balance_history(
    account_id: str,
    limit: Annotated[
        int, typer.Option(help="How many, newest first (1-10000).", min=1, max=10_000)
    ] = 50,
) -> None:
    """An account's transactions, newest first."""
    aid = _int("account_id", account_id)
    rows = money.transactions(_db(), aid, limit)
    emit({"id": aid, "items": rows}, _items())


@app.command()
def usage(
    account_id: str,
    by: Annotated[
        str | None,
        typer.Option(
            "--by",
            metavar="day|domain",
            help="'day' for a daily breakdown, 'domain' for one by registrable destination domain.",
        ),
    ] = None,
    days: Annotated[
        int, typer.Option(help="With --by domain: how many days back.", min=1, max=366)
    ] = 30,
) -> None:
    """Requests, bytes and charges of an account (per day, or per registrable destination
    domain: ``www.example.co.uk`` and ``img.example.co.uk`` are ``example.co.uk``)."""
    if by not in (None, "day", "domain"):
        raise validation_error("by", "must be day or domain")
    db, aid = _db(), _int("account_id", account_id)
    if by == "domain":
        accounts.account_row(db, aid)
        since = request_id_floor(int((time.time() - days * 86400) * 1000))
        items = by_registrable(ledger_usage.by_host(db, aid, since, HOSTS_FOLDED), 200)
        emit({"id": aid, "by": "domain", "days": days, "items": items}, _items())
        return
    result = ledger_usage.usage(db, aid, by_day=by == "day")
    if by == "day":
        emit(result, lambda r: _kv(r) + "\n\n" + _rows(r["days"]))
    else:
        emit(result)


@app.command()
def receipts(
    account_id: str,
    limit: Annotated[int, typer.Option(help="How many, newest first.", min=1, max=1000)] = 20,
) -> None:
    """An account's most recent receipts, newest first (one: ``datorus receipt ID``)."""
    db, aid = _db(), _int("account_id", account_id)
    accounts.account_row(db, aid)
    emit(
        {"id": aid, "items": ledger_usage.recent_receipts(db, aid, limit)},
        _items(("requestId", "method", "host", "port", "status", "bytesUp", "bytesDown")),
    )


@app.command()
def receipt(request_id: str) -> None:
    """The receipt of one request, by its X-Datorus-Request-Id."""
    emit(ledger_usage.receipt(_db(), request_id))


def _emit_rule(result: dict[str, Any]) -> None:
    """The added rule; a CIDR widened to its network is said on stderr too (``warning``)."""
    if result["warning"] and not RUN.json:
        print(result["warning"], file=sys.stderr)
    emit(result, lambda r: _kv({k: v for k, v in r.items() if k != "warning"}))


@policy_app.command("allow")
def policy_allow(rule: str) -> None:
    """Allow a destination CIDR[:PORT] despite the built-in denials (a CIDR with host
    bits set allows its whole network, and says so)."""
    _emit_rule(policy_rules.add_policy_rule(_db(), "allow", rule))


@policy_app.command("deny")
def policy_deny(rule: str) -> None:
    """Deny a destination DOMAIN_OR_CIDR[:PORT]."""
    _emit_rule(policy_rules.add_policy_rule(_db(), "deny", rule))


@policy_app.command("remove")
def policy_remove(action: str, rule: str) -> None:
    """Remove an allow or deny rule: 'policy remove allow 10.0.0.0/8'."""
    if action not in ("allow", "deny"):
        raise validation_error("action", "must be allow or deny")
    emit(policy_rules.remove_policy_rule(_db(), action, rule))


@policy_app.command("list")
def policy_list() -> None:
    """Every operator policy rule."""
    emit({"items": policy_rules.list_policy_rules(_db())}, _items())


@app.command()
def outbox(
    to: Annotated[str | None, typer.Option("--to", help="Only mail to this address.")] = None,
    limit: Annotated[
        int, typer.Option(help="How many, newest first (1-10000).", min=1, max=10_000)
    ] = 20,
) -> None:
    """Mail Datorus sent or queued (the outbox), newest first, with bodies."""
    from .api.mail import list_outbox

    rows = list_outbox(_db(), to, limit)
    emit(
        {"items": rows},
        lambda r: (
            "\n\n".join(
                f"#{m['id']} {m['createdAt']} to {m['to']}"
                f" ({'sent ' + m['sentAt'] if m['sentAt'] else m['error'] or 'not sent'})\n"
                f"Subject: {m['subject']}\n\n{m['body']}"
                for m in r["items"]
            )
            or "(none)"
        ),
    )


SETTINGS_COLUMNS = ("name", "value", "source")


def _short(value: Any, width: int = 40) -> str:
    text = cell(value)
    return text if len(text) <= width else text[: width - 3] + "..."


@app.command("settings")
def settings_show() -> None:
    """Every gateway setting, its value and where the value comes from.

    Sources: default, mitm.conf (or the file DATORUS_CONF names) and environment
    (DATORUS_NAME). A gateway started with --set datorus_name=VALUE uses that value
    instead: the CLI cannot see it. Secrets are hidden.
    """
    try:
        resolved = resolve_sources()
    except SettingsError as e:
        raise _settings_error(e) from None
    items = []
    for s in SETTINGS:
        value, source = resolved[s.name]
        items.append(
            {
                "name": s.name,
                "value": shown_value(s, value),
                "source": source,
                "default": shown_value(s, s.default),
                "env": s.env,
                "option": s.option,
                "help": s.help,
            }
        )
    path = conf_path()
    emit(
        {"file": str(path), "fileExists": path.exists(), "items": items},
        lambda r: (
            f"Settings file: {r['file']}{'' if r['fileExists'] else ' (none)'}\n\n"
            + _rows([{**i, "value": _short(i["value"])} for i in r["items"]], SETTINGS_COLUMNS)
        ),
    )


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _policy_note(db, target: str, host: str, port: int) -> str | None:
    """A reminder when *target* is an address the gateway refuses by policy, else None."""
    from ipaddress import IPv4Address
    from urllib.parse import urlsplit

    from .listeners import gateway_sockets
    from .policy import Policy, classify_host, parse_rule

    try:
        parts = urlsplit(target)
        name = parts.hostname or ""
        tport = parts.port or (443 if parts.scheme == "https" else 80)
        ip = classify_host(name)
        if isinstance(ip, str):
            if ip != "localhost" and not ip.endswith(".localhost"):
                return None
            ip = IPv4Address("127.0.0.1")  # what classify_host("127.0.0.1") answers
        s = _defaults()
        allow = [parse_rule(x, allow_domains=False) for x in s["allow"]]
        deny = [parse_rule(x, allow_domains=True) for x in s["deny"]]
        for r in policy_rules.list_policy_rules(db):
            (allow if r["action"] == "allow" else deny).append((r["target"], r["port"]))
        own = gateway_sockets(s, [(host, port)])
        policy = Policy(allow, deny, [int(p) for p in s["deny_ports"]], own)
        denial = policy.check_address(ip, tport)
    except ValueError:
        return None
    if denial is None:
        return None
    net = f"{ip}/{32 if ip.version == 4 else 128}"
    return (
        f"The gateway refuses {name} ({denial.rule}) with 403 AUP_VIOLATION:"
        f" allow it first with 'datorus policy allow {net}'."
    )


@app.command()
def quickstart(
    email: str,
    trial_bytes: Annotated[int | None, typer.Option(help="Free trial bytes.")] = None,
    host: Annotated[str, typer.Option(help="The gateway's address, as customers reach it.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="The gateway's proxy port.")] = 8001,
    target: Annotated[str, typer.Option(help="The URL the sample curl line fetches.")] = (
        "http://example.com/"
    ),
    api_url: Annotated[
        str | None,
        typer.Option(help="The REST API's base URL (default: public_url, else api_host:api_port)."),
    ] = None,
) -> None:
    """Give a new customer access in one step: an account, a proxy credential and an API key.

    It prints a ready curl line through the gateway and one for the REST API. The
    password and the key are shown this once.
    """
    if not 0 < port < 65536:
        raise validation_error("port", "must be 1-65535")
    from urllib.parse import urlsplit

    if urlsplit(target).scheme not in ("http", "https") or not urlsplit(target).hostname:
        raise validation_error("target", "must be an http(s) URL")
    db = _db()
    from .api.store import create_key

    settings = _defaults()
    trial = settings["trial_bytes"] if trial_bytes is None else trial_bytes
    acc = accounts.create_account(db, email, trial, verified=True)
    cred = accounts.create_credential(db, acc["id"], label="quickstart")
    key = create_key(db, acc["id"], "quickstart")
    proxy = f"http://{cred['username']}:{cred['password']}@{_hostport(host, port)}"
    base = (api_url or public_base(settings)).rstrip("/")
    notes = [n for n in (_policy_note(db, target, host, port),) if n]
    if api_url is None and not settings["api_port"] and not settings["public_url"]:
        notes.append(
            "The gateway serves no REST API (api_port is 0): set api_port, or run 'datorus api'."
        )
    emit(
        {
            "accountId": acc["id"],
            "email": acc["email"],
            "trialBytes": trial,
            "username": cred["username"],
            "password": cred["password"],
            "proxyUrl": proxy,
            "curl": f"curl -x {proxy} {shlex.quote(target)}",
            "apiKey": key["key"],
            "apiUrl": base,
            "apiCurl": f"curl -H 'Authorization: Bearer {key['key']}' {base}/account",
            "notes": notes,
        },
        lambda r: "\n".join(
            [
                f"Account {r['accountId']} ({r['email']}) is ready with {r['trialBytes']}"
                " free trial bytes. The password and the API key are shown this once.",
                "",
                "Through the proxy:",
                f"  {r['curl']}",
                "The REST API:",
                f"  {r['apiCurl']}",
                *(["", *r["notes"]] if r["notes"] else []),
            ]
        ),
    )


@app.command("api")
def api_serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default api_host).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default api_port).")] = None,
) -> None:
    """Serve the REST API standalone (the gateway also serves it on api_port)."""
    import uvicorn

    from .api import create_app

    settings = _defaults()
    settings["db"] = db_path()
    settings["api_host"] = host or settings["api_host"]
    settings["api_port"] = settings["api_port"] if port is None else port
    if not 0 < settings["api_port"] < 65536:
        raise validation_error("port", "must be 1-65535")
    app_ = create_app(settings)
    print(
        f"datorus: REST API on http://{settings['api_host']}:{settings['api_port']}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app_,
        host=settings["api_host"],
        port=settings["api_port"],
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


@app.command("deliver")
def deliver_cmd() -> None:
    """Send the event outbox (webhooks, notifiers), expire leases and check low balances
    and auto-recharges, in the foreground, without a gateway: what each gateway's delivery
    process does (several may run on one ledger: each delivery is claimed by one)."""
    import asyncio

    from .delivery import Deliverer

    settings = _defaults()
    settings["db"] = db_path()
    _db().close()  # a ledger must be there (and migrated)
    print("datorus: delivering events (Ctrl-C stops)", file=sys.stderr, flush=True)
    asyncio.run(Deliverer(settings, []).main())


@app.command(
    "serve",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def serve_cmd(
    ctx: typer.Context,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Gateway workers (default: the number of cores); more than 1 needs"
            " --set datorus_redis_url=redis://HOST:PORT/DB."
        ),
    ] = None,
) -> None:
    """Run N gateway workers (mitmdump -s addons/datorus.py MITMDUMP_ARGS...) on one port.

    The other arguments go to every worker as they are: --listen-host, --listen-port,
    --set datorus_...=VALUE. SIGTERM drains and stops, SIGHUP restarts the workers one
    at a time with no request refused.
    """
    from .serve import serve

    args = list(ctx.args)
    if RUN.db and not any(a.startswith("datorus_db=") for a in args):
        args = ["--set", f"datorus_db={RUN.db}", *args]
    raise SystemExit(serve(workers, args))


ledger_app = _Typer(help="The ledger itself: move a SQLite ledger to PostgreSQL.")
app.add_typer(ledger_app, name="ledger")


def _copied(r: dict[str, Any]) -> str:
    """``ledger copy``'s summary as text."""
    return "\n".join(
        [
            f"Copied the ledger at {r['from']} (schema {r['schemaVersion']}) into {r['to']}"
            f" in one transaction, {r['seconds']:.1f} s:",
            "",
            _rows(r["tables"]),
            "",
            f"Rows {r['rows']:,}, accounts {r['accounts']:,}, their balances {r['balanceCents']:,}"
            f" cents in all ({r['balanceNanocents']:,} nanocents). Verified before the commit: the"
            " rows of every table, and every balance against the source and against the sum"
            " of its transactions; new rows get ids past the copied ones.",
        ]
    )


@ledger_app.command("copy")
def ledger_copy(
    from_: Annotated[
        str, typer.Option("--from", metavar="PATH", help="The SQLite ledger file to copy.")
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="URL",
            help="The PostgreSQL database (postgresql://...): empty, or made by 'datorus init'.",
        ),
    ],
) -> None:
    """Copy a SQLite ledger into PostgreSQL in one transaction, ids kept, then verify it.

    The SQLite file is brought up to date first; the destination must hold no accounts
    or other rows (only what 'datorus init' makes). Every table is copied and checked
    (row counts; every balance against the source and the sum of its transactions)
    before the commit; on any difference nothing is written. Stop the gateways on the
    SQLite file first: what they write after the copy starts is not copied.
    """
    from .ledger.copy import copy_ledger

    try:
        result = copy_ledger(from_, to)
    except DatabaseError as e:
        where, reason = shown(to), scrubbed(str(e), to).rstrip(".")
        hint = ""
        if re.search(r'database "[^"]*" does not exist', reason):
            hint = " Create the database first (createdb NAME, or CREATE DATABASE)."
        raise DatorusError(
            "SERVICE_UNAVAILABLE",
            message=f"The copy into {where} failed: {reason}. Nothing was written.{hint}",
            details={"to": where, "reason": reason},
        ) from None
    emit(result, _copied)


key_app = _Typer(help="REST API keys (pp_...).")
app.add_typer(key_app, name="key")


@key_app.command("create")
def key_create(
    account_id: Annotated[str | None, typer.Argument()] = None,
    operator: Annotated[
        bool,
        typer.Option(
            "--operator", help="An operator key (no account): the only key /sources takes."
        ),
    ] = False,
    label: Annotated[str | None, typer.Option(help="A name for the key.")] = None,
) -> None:
    """Create an API key for an account, or with --operator the operator's key; the key
    is shown this once."""
    from .api.store import create_key

    db = _db()
    if operator == (account_id is not None):
        raise validation_error(
            "account_id",
            "give an ACCOUNT_ID or --operator, not both",
            "Give an ACCOUNT_ID (a customer's key) or --operator (the operator's key).",
        )
    aid = None if account_id is None else _int("account_id", account_id)
    if aid is not None:
        accounts.account_row(db, aid)
    emit(create_key(db, aid, label))


@key_app.command("list")
def key_list(
    account_id: Annotated[str | None, typer.Argument()] = None,
    operator: Annotated[bool, typer.Option("--operator", help="The operator's keys.")] = False,
) -> None:
    """An account's API keys, or with --operator the operator's, by prefix (never the keys)."""
    from .api.store import key_view
    from .ledger import api as ledger_api

    db = _db()
    if operator == (account_id is not None):
        raise validation_error(
            "account_id",
            "give an ACCOUNT_ID or --operator, not both",
            "Give an ACCOUNT_ID (its keys) or --operator (the operator's keys).",
        )
    if account_id is None:
        rows = [key_view(r) for r in ledger_api.operator_keys(db)]
    else:
        aid = _int("account_id", account_id)
        accounts.account_row(db, aid)
        rows = [key_view(r) for r in ledger_api.api_keys(db, aid)]
    emit({"items": rows}, lambda r: _rows(r["items"]))


@key_app.command("revoke")
def key_revoke(key_id: str) -> None:
    """Revoke an API key by id (a customer's or an operator key)."""
    db = _db()
    kid = _int("key_id", key_id)
    from .api.store import revoke_key
    from .ledger import api as ledger_api

    row = ledger_api.api_key(db, kid)
    if row is None:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"key": kid})
    if row["operator"]:
        ledger_api.revoke_operator_key(db, kid)
        emit({"id": kid, "revoked": True})
        return
    emit(revoke_key(db, int(row["account_id"]), str(kid)))


# -- entry point --------------------------------------------------------------------------

_GLOBAL_FLAGS = ("--json",)
_GLOBAL_OPTS = ("--db",)


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move ``--db X``/``--db=X``/``--json`` from anywhere to the front, where Typer reads them."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg in _GLOBAL_FLAGS:
            front.append(arg)
        elif arg in _GLOBAL_OPTS and i + 1 < len(argv):
            front.extend(argv[i : i + 2])
            i += 1
        elif any(arg.startswith(o + "=") for o in _GLOBAL_OPTS):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


_ARGUMENTS = {
    "id": "ID",
    "account_id": "ACCOUNT_ID",
    "cents": "CENTS",
    "email": "EMAIL",
    "url": "URL",
    "rule": "RULE",
    "action": "ACTION",
    "key_id": "KEY_ID",
    "egress_id": "EGRESS_ID",
    "username": "USERNAME",
    "cidr": "CIDR",
    "request_id": "REQUEST_ID",
    # a source's fields, as the API body names them, are these options here
    "parser_name": "--parser",
    "cron_schedule": "--cron",
    "default_protocol": "--protocol",
    "default_country": "--country",
    "default_weight": "--weight",
    "tags": "--tag",
}

_NOT_FOUND = {
    "account": "No account {}. List accounts with 'datorus account list'.",
    "username": "No credential {}. List an account's credentials with"
    " 'datorus credential list ACCOUNT_ID'.",
    "requestId": "No receipt for request {}. Receipts are written within a second of the"
    " request's end and kept receipt_days days.",
    "rule": "No policy rule '{}'. List the rules with 'datorus policy list'.",
    "key": "No API key {}. List an account's keys with 'datorus key list ACCOUNT_ID'.",
    "egress": "No egress {}. List the pool with 'datorus egress list'.",
    "allowedIp": "{} is not allow-listed for that credential. See its CIDRs with"
    " 'datorus credential list ACCOUNT_ID'.",
    "credential": "No live credential {}. List an account's credentials with"
    " 'datorus credential list ACCOUNT_ID'.",
    "source": "No source {}. List the sources with 'datorus source list'.",
    "notifier": "No notifier {}. List the notifiers with 'datorus notifier list'.",
}


def _field_label(field: str) -> str:
    if field in _ARGUMENTS:
        return _ARGUMENTS[field]
    return "--" + field.replace("_", "-")


def sentence(err: DatorusError, command: str = "datorus") -> str:
    """*err* as a sentence for a person, with the next step where there is one."""
    details = err.details or {}
    if err.message != err.entry.message:  # raised with a message written for this case
        hint = details.get("hint")  # what to do instead, where the error knows it
        return f"{err.message} {hint}" if hint else err.message
    if err.code == "RESOURCE_NOT_FOUND":
        for key, text in _NOT_FOUND.items():
            if key in details:
                return text.format(details[key])
    if err.code == "VALIDATION_ERROR" and "field" in details:
        reason = str(details.get("reason") or "is invalid").rstrip(".")
        return f"Invalid {_field_label(str(details['field']))}: {reason}. See '{command} --help'."
    if err.code == "EMAIL_TAKEN":
        return (
            f"An account with the email {details.get('email')} already exists."
            " Find it with 'datorus account list'."
        )
    if err.code == "EMAIL_PROVIDER_MISMATCH":
        return f"That email belongs to an account that signs in with {details.get('provider')}."
    extra = ", ".join(f"{k} {v}" for k, v in details.items())
    return err.message.rstrip(".") + (f" ({extra})." if extra else ".")


def fail(err: DatorusError, command: str = "datorus") -> None:
    """Report *err*: the envelope on stderr with ``--json``, a sentence without; exit 1."""
    if RUN.json:
        print(json.dumps(envelope(err.code, None, err.details, err.message)), file=sys.stderr)
    else:
        print(sentence(err, command), file=sys.stderr)
    raise SystemExit(1)


class _UsageError(Protocol):
    """What the CLI reads of a usage error of Typer's vendored click (not importable)."""

    exit_code: int

    def format_message(self) -> str: ...


def _usage_error(e: _UsageError) -> tuple[DatorusError, str]:
    """A click usage error as VALIDATION_ERROR, and the command it was about."""
    msg = e.format_message().strip() or "Missing command."  # no arguments: help shown
    param = getattr(getattr(e, "param", None), "name", None)
    field = param or getattr(e, "option_name", None)
    if field is None:
        field = "command" if "command" in msg.lower() else "arguments"
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "datorus"
    human = f"{msg.rstrip('.')}. See '{command} --help'."
    err = validation_error(str(field).lstrip("-"), msg, msg)
    return err, human


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    RUN.json = "--json" in args[: args.index("--") if "--" in args else len(args)]
    try:
        app(args, prog_name="datorus", standalone_mode=False)
    except DatorusError as e:
        fail(e, _command_of(args))
    except DatabaseError as e:
        path = shown(RUN.db) if RUN.db else "the ledger"
        fail(
            DatorusError(
                "SERVICE_UNAVAILABLE",
                message=f"The ledger {path} is unavailable: {e}. Try again; if it persists,"
                " check the file and its folder.",
            )
        )
    except Exception as e:  # Typer's vendored click: usage errors and Ctrl-C
        if type(e).__name__ == "Abort":
            raise SystemExit(130) from None
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            err, human = _usage_error(e)
            if RUN.json:
                fail(err)
            if type(e).__name__ != "NoArgsIsHelpError":  # else the help is already shown
                print(human, file=sys.stderr)
            raise SystemExit(1) from None
        raise


def _command_of(args: list[str]) -> str:
    """``datorus GROUP COMMAND`` as typed, for 'See ... --help'."""
    words = ["datorus"]
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in _GLOBAL_OPTS:
            skip = True
            continue
        if a.startswith("-"):
            continue
        words.append(a)
        if len(words) == 3 or a not in {g.name for g in app.registered_groups}:
            break
    return " ".join(words)


if __name__ == "__main__":
    main()


# -- the egress pool (issue 5) ------------------------------------------------------------

egress_app = _Typer(help="The egress pool: the ways out.")
app.add_typer(egress_app, name="egress")


def _egress_db():
    return _db()


@egress_app.command("add")
def egress_add(
    url: str,
    country: Annotated[str | None, typer.Option(help="Two-letter country code.")] = None,
    weight: Annotated[int, typer.Option(help="Relative share of traffic (>= 1).")] = 1,
) -> None:
    """Add an egress: direct://, direct://SOURCE_IP[/LEN], http://, https://, socks4:// or
    socks5://. It is unchecked, carrying no traffic, until its checks pass."""
    from .ledger import egress as egress_ledger

    emit(egress_ledger.add_egress(_egress_db(), url, country, weight))


@egress_app.command("list")
def egress_list() -> None:
    """Every egress with its status (unchecked, active, dead) and score (passwords hidden)."""
    from .ledger import egress as egress_ledger

    rows = egress_ledger.list_egress(_egress_db())
    emit(
        {"items": rows},
        lambda r: _rows(
            [
                {k: x[k] for k in ("id", "url", "status", "country", "weight", "enabled", "score")}
                | {"exitIp": x["exitIp"], "anonymity": x["anonymity"]}
                for x in r["items"]
            ]
        ),
    )


@egress_app.command("show")
def egress_show(egress_id: str) -> None:
    """One egress with its latest checks."""
    from .ledger import egress as egress_ledger

    db = _egress_db()
    eid = _int("id", egress_id)
    checks = [{**c, "passed": bool(c["passed"])} for c in egress_ledger.recent_checks(db, eid)]
    emit(
        {**egress_ledger.get_egress(db, eid), "checks": checks},
        lambda r: _kv(r) + "\n\n" + _rows(r["checks"]),
    )


@egress_app.command("remove")
def egress_remove(egress_id: str) -> None:
    """Remove an egress (live within 2 s; its sessions move elsewhere)."""
    from .ledger import egress as egress_ledger

    emit(egress_ledger.remove_egress(_egress_db(), _int("id", egress_id)))


@egress_app.command("disable")
def egress_disable(egress_id: str) -> None:
    """Stop sending new requests through an egress."""
    from .ledger import egress as egress_ledger

    emit(egress_ledger.set_enabled(_egress_db(), _int("id", egress_id), False))


@egress_app.command("enable")
def egress_enable(egress_id: str) -> None:
    """Put a disabled egress back in the pool."""
    from .ledger import egress as egress_ledger

    emit(egress_ledger.set_enabled(_egress_db(), _int("id", egress_id), True))


# -- proxy-list sources (issue 17) ---------------------------------------------------------

source_app = _Typer(help="Proxy-list sources: lists of proxies the pool imports.")
app.add_typer(source_app, name="source")

_SOURCE_COLUMNS = (
    "id",
    "url",
    "parserName",
    "cronSchedule",
    "isActive",
    "proxies",
    "lastScrapedAt",
    "nextRunAt",
    "lastError",
)


def _tags(pairs: list[str] | None) -> dict[str, str] | None:
    if pairs is None:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq:
            raise validation_error("tags", "each --tag is NAME=VALUE")
        out[name] = value
    return out


def _next_run(settings: dict[str, Any]) -> Callable[[str | None], int | None]:
    import time

    from .sources.fields import next_run_at

    test_seconds = int(settings["test_schedule_seconds"])
    return lambda cron: next_run_at(cron, time.time(), test_seconds)


def _source_out(row: dict[str, Any]) -> None:
    import time

    from .ledger import sources as ledger_sources

    emit(ledger_sources.source_view(row, time.time()))


def _pick_parser(url: str, timeout: float) -> str:
    """The parser that reads the list at *url* now (as ``POST /sources`` picks it)."""
    import asyncio

    from .scraping import ListError, fetch_list
    from .sources.registry import installed_parsers, pick_parser

    try:
        fetched = asyncio.run(fetch_list(url, timeout))
    except ListError as e:
        raise validation_error(
            "url",
            f"{e}",
            f"The list could not be fetched to pick its parser: {e}. Name one with --parser.",
        ) from None
    try:
        return pick_parser(fetched.content, fetched.content_type).name
    except DatorusError:
        names = ", ".join(installed_parsers().names()) or "none"
        raise validation_error(
            "parser_name",
            "no installed parser reads the list",
            f"No installed parser reads this list ({names}): name one with --parser.",
        ) from None


@source_app.command("add")
def source_add(
    url: str,
    parser: Annotated[
        str | None, typer.Option(help="Parser name (default: picked from the list).")
    ] = None,
    cron: Annotated[
        str | None, typer.Option(help="Five-field cron schedule, e.g. '*/30 * * * *'.")
    ] = None,
    protocol: Annotated[str, typer.Option(help="Protocol of entries naming none.")] = "http",
    country: Annotated[str | None, typer.Option(help="Country of entries naming none.")] = None,
    weight: Annotated[int, typer.Option(help="Weight of the proxies it finds (1-1000).")] = 1,
    tag: Annotated[list[str] | None, typer.Option(help="NAME=VALUE, repeatable.")] = None,
    name: Annotated[str | None, typer.Option(help="A label.")] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="Add it switched off.")] = False,
) -> None:
    """Add a proxy-list source. Without --parser the list is fetched once to pick one;
    nothing is imported until 'datorus source scrape ID' or its schedule."""
    from .ledger import sources as ledger_sources
    from .sources.fields import check_fields

    db = _db()
    settings = _defaults()
    fields = check_fields(
        {
            "url": url,
            "name": name,
            "parser_name": parser,
            "cron_schedule": cron,
            "default_protocol": protocol,
            "default_country": country,
            "default_weight": weight,
            "tags": _tags(tag) or {},
            "is_active": not disabled,
        }
    )
    if fields["parser_name"] is None:
        fields["parser_name"] = _pick_parser(fields["url"], settings["source_timeout"])
    fields["next_run_at"] = _next_run(settings)(fields["cron_schedule"])
    _source_out(ledger_sources.add_source(db, fields))


@source_app.command("list")
def source_list() -> None:
    """Every source, its last scrape and its next scheduled run."""
    import time

    from .ledger import sources as ledger_sources

    db = _db()
    now = time.time()
    rows = [ledger_sources.source_view(r, now) for r in db.query(ledger_sources.SOURCES_SQL)]
    emit({"items": sorted(rows, key=lambda r: r["id"])}, _items(_SOURCE_COLUMNS))


@source_app.command("show")
def source_show(id: str) -> None:
    """One source: settings, last scrape, next run."""
    from .ledger import sources as ledger_sources

    _source_out(ledger_sources.get_source(_db(), _int("id", id)))


@source_app.command("set")
def source_set(
    id: str,
    url: Annotated[str | None, typer.Option(help="A new list URL.")] = None,
    parser: Annotated[
        str | None, typer.Option(help="Parser name ('auto': each scrape picks).")
    ] = None,
    cron: Annotated[str | None, typer.Option(help="Cron schedule ('none': not scheduled).")] = None,
    protocol: Annotated[str | None, typer.Option(help="Protocol of entries naming none.")] = None,
    country: Annotated[str | None, typer.Option(help="Country of entries naming none.")] = None,
    weight: Annotated[int | None, typer.Option(help="Weight of the proxies it finds.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="NAME=VALUE (replaces all).")] = None,
    name: Annotated[str | None, typer.Option(help="A label.")] = None,
    enable: Annotated[bool | None, typer.Option("--enable/--disable", help="Switch.")] = None,
) -> None:
    """Change a source (like PATCH /sources/ID); a new schedule or --enable sets the next
    run from now."""
    from .ledger import sources as ledger_sources
    from .sources.fields import check_fields

    given: dict[str, Any] = {
        k: v
        for k, v in {
            "url": url,
            "name": name,
            "default_protocol": protocol,
            "default_country": country,
            "default_weight": weight,
            "tags": _tags(tag),
            "is_active": enable,
        }.items()
        if v is not None
    }
    if parser is not None:
        given["parser_name"] = None if parser == "auto" else parser
    if cron is not None:
        given["cron_schedule"] = None if cron == "none" else cron
    db = _db()
    changes = check_fields(given)
    row = ledger_sources.update_source(db, _int("id", id), changes, _next_run(_defaults()))
    _source_out(row)


@source_app.command("scrape")
def source_scrape(id: str) -> None:
    """Scrape a source now, from this machine, whatever its schedule.

    A list that fails (unreachable, an HTTP error, too large, unreadable) changes no
    proxy: the error is kept as the source's lastError and the command exits 1.
    """
    import asyncio

    from .scraping import Scraper, new_owner
    from .sources.screen import found_proxy_policy

    db = _db()
    settings = _defaults()
    sid = _int("id", id)

    async def run(fn: Callable[[Any], Any]) -> Any:
        return fn(db)

    scraper = Scraper(
        run,
        new_owner(),
        float(settings["source_timeout"]),
        settings["test_schedule_seconds"],
        found_proxy_policy(settings),
    )
    result = asyncio.run(scraper.scrape(sid))
    assert result is not None
    if result["error"]:
        raise DatorusError(
            "UPSTREAM_FAILED",
            message=f"Source {sid} could not be scraped: {result['error']}. No proxy changed.",
            details=camel(result),
        )
    emit(result, _scrape_text)


def _scrape_text(result: dict[str, Any]) -> str:
    """A scrape's counts, then each problem it met on its own line (why proxies were
    skipped or denied: the counts alone do not say)."""
    problems = result.get("problems") or []
    return _kv(result) + "".join(f"\nproblem: {p}" for p in problems)


@source_app.command("remove")
def source_remove(id: str) -> None:
    """Delete a source; the proxies it found stay in the pool."""
    from .ledger import sources as ledger_sources

    emit(ledger_sources.delete_source(_db(), _int("id", id)))


# -- notifiers (issue 18) -------------------------------------------------------------------

notifier_app = _Typer(help="Operator notifiers: events mailed or posted as they happen.")
app.add_typer(notifier_app, name="notifier")

_NOTIFIER_COLUMNS = ("id", "kind", "target", "events", "lastSuccessAt", "lastFailureAt",
                     "lastFailure")  # fmt: skip


def _notifier_out(row: dict[str, Any]) -> dict[str, Any]:
    """A subscription as the notifier commands show it (``target`` for every kind)."""
    out = dict(row)
    if "url" in out:
        out["target"] = out.pop("url")
    return out


def _plugin(kind: str) -> Any:
    from .notifiers import load_notifiers

    found, _ = load_notifiers()
    if kind not in found:
        raise validation_error(
            "kind", f"no notifier plugin {kind!r} (loaded: {', '.join(sorted(found)) or 'none'})"
        )
    return found[kind].obj


@notifier_app.command("add")
def notifier_add(
    kind: str,
    target: str,
    events: Annotated[
        str, typer.Option(help="Comma-separated glob patterns, e.g. `'proxy.*,credits.*'`.")
    ] = "*",
) -> None:
    """Subscribe a notifier (KIND: webhook or smtp; TARGET: a URL or an email address) to
    every event matching --events. A webhook's signing secret is printed this once."""
    from . import events as ev
    from .ledger import events as ledger_events
    from .notifiers.targets import check_target, policy_for

    plugin = _plugin(kind)
    try:
        target = plugin.check(target)
    except ValueError as e:
        raise validation_error("target", str(e)) from None
    try:
        patterns = ev.parse_patterns(events)
    except ValueError as e:
        raise validation_error("events", str(e)) from None
    db = _db()
    settings = _defaults()
    if kind == "webhook":
        check_target(policy_for(db, settings), target)
    out = _notifier_out(ledger_events.add_subscription(db, None, kind, target, patterns))
    out["warning"] = None
    if kind == "smtp" and not settings.get("smtp_host"):
        # accepted (the host may be set later), but said: nothing would tell otherwise
        keep = int(settings.get("event_retry_seconds") or 86400)
        within = "a day" if keep == 86400 else f"{keep} s"
        out["warning"] = (
            f"No smtp_host is set: mail to {target} waits in the delivery queue (retried"
            f" for up to {within}) until it is. Set smtp_host in the settings file"
            " (see 'datorus settings') or DATORUS_SMTP_HOST, restart the gateway, then"
            f" check with 'datorus notifier test {out['id']}'."
        )
        if not RUN.json:
            print(out["warning"], file=sys.stderr)
    emit(out, lambda r: _kv({k: v for k, v in r.items() if k != "warning"}))


@notifier_app.command("list")
def notifier_list() -> None:
    """Every notifier with its health: last success, last failure and why."""
    from .ledger import events as ledger_events

    rows = [_notifier_out(r) for r in ledger_events.subscriptions(_db(), None)]
    emit({"items": rows}, _items(_NOTIFIER_COLUMNS))


@notifier_app.command("remove")
def notifier_remove(id: str) -> None:
    """Unsubscribe a notifier; deliveries not yet made are dropped."""
    from .ledger import events as ledger_events

    emit(ledger_events.remove_subscription(_db(), None, _int("id", id)))


@notifier_app.command("test")
def notifier_test(id: str) -> None:
    """Deliver a test event to a notifier now, from this machine, and say how it went
    (its health records the outcome)."""
    import asyncio
    import secrets
    import time

    from . import events as ev
    from .clock import iso_utc
    from .ledger import events as ledger_events
    from .notifiers import Delivery, DeliveryError
    from .notifiers.targets import denial_of, policy_for

    db = _db()
    settings = _defaults()
    row = ledger_events.get_subscription(db, None, _int("id", id))
    plugin = _plugin(row["kind"])
    policy = policy_for(db, settings)
    event = {
        "id": f"test_{secrets.token_hex(8)}",
        "type": "notifier.test",
        "created_at": iso_utc(),
        "data": {"notifier_id": str(row["id"]), "message": "A test from 'datorus notifier test'."},
    }

    async def resolve(host: str, port: int) -> str:
        scheme = "https" if port == 443 else "http"
        denial, _ = denial_of(policy, f"{scheme}://{host}:{port}/")
        if denial is not None:
            raise DeliveryError(f"refused by the acceptable-use policy ({denial.rule})")
        return host

    delivery = Delivery(
        target=row["target"],
        event=event,
        body=ev.body(event),
        secret=row["secret"],
        timeout=float(settings["webhook_timeout"]),
        resolve=resolve,
        settings=settings,
    )
    started = time.monotonic()
    try:
        asyncio.run(plugin.send(delivery))
    except DeliveryError as e:
        ledger_events.note_health(db, row["id"], False, e.reason)
        raise DatorusError(
            "UPSTREAM_FAILED",
            message=f"Notifier {row['id']} ({row['kind']} {row['target']}): {e.reason}.",
            details={"id": str(row["id"]), "reason": e.reason, "status": e.status},
        ) from None
    ledger_events.note_health(db, row["id"], True, None)
    emit(
        {
            "id": str(row["id"]),
            "delivered": True,
            "eventId": event["id"],
            "ms": round((time.monotonic() - started) * 1000),
        }
    )
