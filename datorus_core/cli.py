"""``datorus``: the operator CLI (Typer over sqlite-utils).

Every command takes ``--db PATH`` (else ``DATORUS_DB``, else ``./datorus.db``) and
``--json``, anywhere on the command line. With ``--json`` a command prints exactly
one JSON object on stdout, and on failure the error envelope on stderr with a
non-zero exit. Without it, it prints a readable table.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from . import ledger
from .envelope import DatorusError, envelope
from .settings import SettingsError, default_db_path, resolve_defaults

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False
)
account_app = typer.Typer(no_args_is_help=True, help="Customer accounts.")
credential_app = typer.Typer(no_args_is_help=True, help="Proxy credentials.")
balance_app = typer.Typer(no_args_is_help=True, help="Prepaid balances.")
policy_app = typer.Typer(no_args_is_help=True, help="Acceptable-use policy rules.")
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
    db: Annotated[str | None, typer.Option("--db", help="Ledger path.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    RUN.db = db
    RUN.json = json_


def db_path() -> str:
    """The ledger path this invocation uses."""
    return RUN.db or default_db_path()


def emit(result: dict[str, Any], table: Callable[[dict[str, Any]], str] | None = None) -> None:
    """Print *result* as JSON (``--json``) or as readable text."""
    if RUN.json:
        print(json.dumps(result, separators=(",", ":"), default=str))
    else:
        print(table(result) if table else _kv(result))


def _kv(result: dict[str, Any]) -> str:
    width = max((len(k) for k in result), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in result.items())


def _rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(f"{c:<{widths[c]}}" for c in cols)]
    lines += ["  ".join(f"{r.get(c, '')!s:<{widths[c]}}" for c in cols) for r in rows]
    return "\n".join(lines)


def _int(field: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatorusError(
            "VALIDATION_ERROR", details={"field": field, "reason": "must be a whole number"}
        ) from None


def _db(create: bool = False):
    return ledger.open_ledger(db_path(), create=create)


def _defaults() -> dict[str, Any]:
    try:
        return resolve_defaults()
    except SettingsError as e:
        raise DatorusError(
            "VALIDATION_ERROR", details={"field": "mitm.conf", "reason": str(e)}
        ) from None


# -- commands -----------------------------------------------------------------------------


@app.command()
def init() -> None:
    """Create or migrate the ledger (idempotent)."""
    db = _db(create=True)
    version = db.conn.execute("PRAGMA user_version").fetchone()[0]
    emit({"db": db_path(), "schemaVersion": version})


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
    """Create a customer account with its trial allocation."""
    if provider is not None and provider not in ("google", "github"):
        raise DatorusError(
            "VALIDATION_ERROR", details={"field": "provider", "reason": "must be google or github"}
        )
    trial = _defaults()["trial_bytes"] if trial_bytes is None else trial_bytes
    emit(
        ledger.create_account(
            _db(create=True), email, trial, price_cents_per_gb, rps, burst, max_tunnels, provider
        )
    )


@account_app.command("show")
def account_show(account_id: str) -> None:
    """An account with trial remaining, balance and used bytes."""
    acc = ledger.show_account(_db(), _int("id", account_id))
    # the effective values: an account without its own uses the gateway's defaults
    defaults = _defaults()
    for key, setting in (
        ("priceCentsPerGb", "price_cents_per_gb"),
        ("rps", "rps"),
        ("burst", "burst"),
        ("maxTunnels", "max_tunnels"),
    ):
        if acc[key] is None:
            acc[key] = defaults[setting]
    emit(acc)


@account_app.command("list")
def account_list() -> None:
    """Every account with its balance and usage."""
    rows = ledger.list_accounts(_db())
    emit({"items": rows}, lambda r: _rows(r["items"]))


def _set_status(account_id: str, status: str) -> None:
    emit(ledger.set_status(_db(), _int("id", account_id), status))


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
    """Change an account's price or limits (live within 2 s)."""
    emit(
        ledger.set_limits(
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
    emit(ledger.create_credential(_db(), _int("account_id", account_id), max_bytes, label))


@credential_app.command("list")
def credential_list(account_id: str) -> None:
    """An account's credentials (never their passwords)."""
    rows = ledger.list_credentials(_db(), _int("account_id", account_id))
    emit({"items": rows}, lambda r: _rows(r["items"]))


@credential_app.command("revoke")
def credential_revoke(username: str) -> None:
    """Revoke a credential (refused by a running gateway within 2 s)."""
    emit(ledger.revoke_credential(_db(), username))


@balance_app.command("add")
def balance_add(
    account_id: str,
    cents: str,
    reason: Annotated[str | None, typer.Option(help="Why (kept in the ledger).")] = None,
) -> None:
    """Top up an account's prepaid balance by CENTS."""
    result = ledger.add_balance(
        _db(), _int("account_id", account_id), _int("cents", cents), reason or "operator top-up"
    )
    emit({k: result[k] for k in ("id", "balanceCents", "balanceNanocents")})


@balance_app.command("history")
def balance_history(
    account_id: str,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
) -> None:
    """An account's transactions, newest first."""
    rows = ledger.transactions(_db(), _int("account_id", account_id), limit)
    emit({"id": int(account_id), "items": rows}, lambda r: _rows(r["items"]))


@app.command()
def usage(
    account_id: str,
    by: Annotated[str | None, typer.Option("--by", help="'day' for a daily breakdown.")] = None,
) -> None:
    """Requests, bytes and charges of an account."""
    if by not in (None, "day"):
        raise DatorusError("VALIDATION_ERROR", details={"field": "by", "reason": "must be day"})
    result = ledger.usage(_db(), _int("account_id", account_id), by_day=by == "day")
    if by == "day":
        emit(
            result,
            lambda r: _kv({k: v for k, v in r.items() if k != "days"}) + "\n\n" + _rows(r["days"]),
        )
    else:
        emit(result)


@app.command()
def receipt(request_id: str) -> None:
    """The receipt of one request, by its X-Datorus-Request-Id."""
    emit(ledger.receipt(_db(), request_id))


@policy_app.command("allow")
def policy_allow(rule: str) -> None:
    """Allow a destination CIDR[:PORT] despite the built-in denials."""
    emit(ledger.add_policy_rule(_db(create=True), "allow", rule))


@policy_app.command("deny")
def policy_deny(rule: str) -> None:
    """Deny a destination DOMAIN_OR_CIDR[:PORT]."""
    emit(ledger.add_policy_rule(_db(create=True), "deny", rule))


@policy_app.command("remove")
def policy_remove(action: str, rule: str) -> None:
    """Remove an 'allow' or 'deny' rule."""
    if action not in ("allow", "deny"):
        raise DatorusError(
            "VALIDATION_ERROR", details={"field": "action", "reason": "allow or deny"}
        )
    emit(ledger.remove_policy_rule(_db(), action, rule))


@policy_app.command("list")
def policy_list() -> None:
    """Every operator policy rule."""
    emit({"items": ledger.list_policy_rules(_db())}, lambda r: _rows(r["items"]))


@app.command()
def outbox(
    to: Annotated[str | None, typer.Option("--to", help="Only mail to this address.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
) -> None:
    """Mail Datorus sent or queued (the outbox), newest first, with bodies."""
    from .api.mail import list_outbox

    rows = list_outbox(_db(create=True), to, limit)
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
        raise DatorusError(
            "VALIDATION_ERROR", details={"field": "port", "reason": "must be 1-65535"}
        )
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


key_app = typer.Typer(no_args_is_help=True, help="REST API keys (pp_...).")
app.add_typer(key_app, name="key")


@key_app.command("create")
def key_create(
    account_id: str,
    label: Annotated[str | None, typer.Option(help="A name for the key.")] = None,
) -> None:
    """Create an API key for an account; the key is shown this once."""
    from .api.store import account_row, create_key

    db = _db()
    aid = _int("account_id", account_id)
    account_row(db, aid)
    emit(create_key(db, aid, label))


@key_app.command("list")
def key_list(account_id: str) -> None:
    """An account's API keys by prefix (never the keys)."""
    from .api.store import account_row, key_view

    db = _db()
    aid = _int("account_id", account_id)
    account_row(db, aid)
    rows = [key_view(r) for r in db.query("SELECT * FROM api_keys WHERE account_id = ?", [aid])]
    emit({"items": rows}, lambda r: _rows(r["items"]))


@key_app.command("revoke")
def key_revoke(key_id: str) -> None:
    """Revoke an API key by id."""
    db = _db()
    kid = _int("key_id", key_id)
    row = db.conn.execute("SELECT account_id FROM api_keys WHERE id = ?", (kid,)).fetchone()
    if row is None:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"key": kid})
    from .api.store import revoke_key

    emit(revoke_key(db, row[0], str(kid)))


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


def fail(err: DatorusError) -> None:
    """Report *err*: the envelope on stderr with ``--json``, a sentence without; exit 1."""
    if RUN.json:
        print(json.dumps(envelope(err.code, None, err.details, err.message)), file=sys.stderr)
    else:
        detail = f" ({err.details})" if err.details else ""
        print(f"error: {err.code}: {err.message}{detail}", file=sys.stderr)
    raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    RUN.json = "--json" in args[: args.index("--") if "--" in args else len(args)]
    try:
        app(args, standalone_mode=False)
    except DatorusError as e:
        fail(e)
    except sqlite3.Error as e:
        fail(DatorusError("SERVICE_UNAVAILABLE", message=f"The ledger is unavailable: {e}"))
    except Exception as e:  # Typer's vendored click: usage errors and Ctrl-C
        if type(e).__name__ == "Abort":
            raise SystemExit(130) from None
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            msg = e.format_message()
            param = getattr(getattr(e, "param", None), "name", None)
            field = param or getattr(e, "option_name", None)
            if field is None:
                field = "command" if "command" in msg.lower() else "arguments"
            fail(
                DatorusError(
                    "VALIDATION_ERROR",
                    message=msg,
                    details={"field": str(field).lstrip("-"), "reason": msg},
                )
            )
        raise


if __name__ == "__main__":
    main()


# -- the egress pool (issue 5) ------------------------------------------------------------

egress_app = typer.Typer(no_args_is_help=True, help="The egress pool: the ways out.")
app.add_typer(egress_app, name="egress")


def _egress_db(create: bool = False):
    return _db(create=create)


@egress_app.command("add")
def egress_add(
    url: str,
    country: Annotated[str | None, typer.Option(help="Two-letter country code.")] = None,
    weight: Annotated[int, typer.Option(help="Relative share of traffic (>= 1).")] = 1,
) -> None:
    """Add an egress: direct://, direct://SOURCE_IP[/LEN], http://, https:// or socks5://."""
    from . import egress_ledger

    emit(egress_ledger.add_egress(_egress_db(create=True), url, country, weight))


@egress_app.command("list")
def egress_list() -> None:
    """Every egress with its health score (passwords hidden)."""
    from . import egress_ledger

    rows = egress_ledger.list_egress(_egress_db())
    emit(
        {"items": rows},
        lambda r: _rows(
            [
                {k: x[k] for k in ("id", "url", "country", "weight", "enabled", "score", "exitIp")}
                for x in r["items"]
            ]
        ),
    )


@egress_app.command("show")
def egress_show(egress_id: str) -> None:
    """One egress with its latest checks."""
    from . import egress_ledger

    db = _egress_db()
    eid = _int("id", egress_id)
    emit({**egress_ledger.get_egress(db, eid), "checks": egress_ledger.recent_checks(db, eid)})


@egress_app.command("remove")
def egress_remove(egress_id: str) -> None:
    """Remove an egress (live within 2 s; its sessions move elsewhere)."""
    from . import egress_ledger

    emit(egress_ledger.remove_egress(_egress_db(), _int("id", egress_id)))


@egress_app.command("disable")
def egress_disable(egress_id: str) -> None:
    """Stop sending new requests through an egress."""
    from . import egress_ledger

    emit(egress_ledger.set_enabled(_egress_db(), _int("id", egress_id), False))


@egress_app.command("enable")
def egress_enable(egress_id: str) -> None:
    """Put a disabled egress back in the pool."""
    from . import egress_ledger

    emit(egress_ledger.set_enabled(_egress_db(), _int("id", egress_id), True))
