"""Datorus settings: one table of names, types, defaults and help texts.

Each setting comes, lowest precedence first, from its built-in default, from
``mitm.conf`` at the repository root (YAML ``name: value`` lines; ``DATORUS_CONF``
names another file), from the environment variable ``DATORUS_<NAME>`` and from
``--set datorus_<name>=...``. The CLI reads the same file and environment
(``datorus settings``), so one ``db`` serves the gateway and the CLI.
The gateway passes the file and environment values to mitmproxy as the option
defaults, so a ``--set`` naturally wins over both.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONF = REPO_ROOT / "mitm.conf"


class SettingsError(ValueError):
    """A setting is unknown or has a value it cannot take."""


def _positive(v: int) -> None:
    if v <= 0:
        raise SettingsError("must be > 0")


def _non_negative(v: int) -> None:
    if v < 0:
        raise SettingsError("must be >= 0")


def _port(v: int) -> None:
    if not 0 <= v <= 65535:
        raise SettingsError("must be a port number 0-65535 (0 disables)")


def _address(v: str) -> None:
    """An IP address to listen on (a name would be resolved at every start)."""
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise SettingsError(f"{v!r} is not an IP address, e.g. 127.0.0.1") from None


def _cidrs(values: Sequence[str]) -> None:
    for v in values:
        net = v.rsplit(":", 1)[0] if v.count(":") == 1 or "]:" in v else v
        try:
            ipaddress.ip_network(net.strip("[]"), strict=False)
        except ValueError as e:
            raise SettingsError(f"{v!r} is not a CIDR[:PORT]") from e


def _proxy_cidrs(values: Sequence[str]) -> None:
    """Each a CIDR[:PORT] as the found proxies' policy reads it (``sources.screen``)."""
    from .sources.screen import allow_rules

    for v in values:
        try:
            allow_rules([v])
        except ValueError as e:
            raise SettingsError(f"{v!r} is not a CIDR[:PORT] ({e})") from e


def _ports(values: Sequence[str]) -> None:
    for v in values:
        if not v.isdigit() or not 0 < int(v) < 65536:
            raise SettingsError(f"{v!r} is not a port number")


def _statuses(values: Sequence[str]) -> None:
    for v in values:
        if not v.isdigit() or not 100 <= int(v) <= 599:
            raise SettingsError(f"{v!r} is not an HTTP status")


@dataclass(frozen=True, slots=True)
class Setting:
    """One Datorus setting as mitmproxy sees it (``datorus_<name>``)."""

    name: str
    type: type | Any
    default: Any
    help: str
    check: Callable[[Any], None] | None = None

    @property
    def option(self) -> str:
        """The mitmproxy option name, ``datorus_<name>``."""
        return f"datorus_{self.name}"

    @property
    def env(self) -> str:
        """The environment variable, ``DATORUS_<NAME>``."""
        return f"DATORUS_{self.name.upper()}"


def _ledger(v: str) -> None:
    """A SQLite path or a ``postgresql://`` URL (``postgres://`` too).

    >>> _ledger("postgresql://datorus@127.0.0.1:5432/ledger")
    >>> try:
    ...     _ledger("mysql://db/ledger")
    ... except SettingsError as e:
    ...     print(e)
    mysql:// is not a ledger: use a SQLite file path or a postgresql:// URL
    """
    from .ledger.target import unsupported

    if not v:
        raise SettingsError("must be a SQLite file path or a postgresql:// URL")
    why = unsupported(v)
    if why is not None:
        raise SettingsError(why)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "db",
        str,
        "./datorus.db",
        "The ledger: a SQLite file path (created and migrated at start) or a"
        " postgresql://user:password@host:port/dbname URL (the database must exist; its"
        " tables are created and migrated at start).",
        _ledger,
    ),
    Setting(
        "socks5_port",
        int,
        1080,
        "Port of the SOCKS5 entry (RFC 1928, username/password per RFC 1929) on the proxy's"
        " listen host, beside the HTTP proxy port (0: off).",
        _port,
    ),
    Setting("api_host", str, "127.0.0.1", "Address the REST API listens on."),
    Setting("api_port", int, 8002, "Port of the REST API served by the gateway (0: off).", _port),
    Setting(
        "upstream_timeout",
        int,
        30,
        "Seconds to wait for an upstream response before 504.",
        _positive,
    ),
    Setting(
        "header_timeout",
        int,
        5,
        "Seconds a client may take from connecting to a complete request head (slowloris).",
        _positive,
    ),
    Setting(
        "keepalive_timeout",
        int,
        60,
        "Seconds an idle kept-alive client connection stays open between requests.",
        _positive,
    ),
    Setting(
        "startup_wait",
        int,
        10,
        "Seconds a request that arrives while the gateway is still loading its ledger waits"
        " for it (then 503); a ledger that cannot be opened in that time stops the gateway.",
        _positive,
    ),
    Setting(
        "ledger_grace",
        int,
        30,
        "Seconds the gateway keeps serving from memory while the ledger cannot be read"
        " (locked, busy); past that, 503 until it can.",
        _positive,
    ),
    Setting(
        "drain_seconds",
        int,
        5,
        "Seconds a stopping gateway lets requests and tunnels under way finish (new ones: 503).",
        _non_negative,
    ),
    Setting(
        "drain_listen_seconds",
        int,
        0,
        "Seconds a stopping gateway keeps its port open, answering 503, even with nothing"
        " under way: behind a balancer, long enough for its health check to take the node"
        " out, so that no connection is accepted and then reset when the port closes.",
        _non_negative,
    ),
    Setting("trial_bytes", int, 100_000_000, "Free trial bytes for a new account.", _non_negative),
    Setting(
        "price_cents_per_gb", int, 300, "Default price in cents per GB (10^9 bytes).", _non_negative
    ),
    Setting(
        "min_balance_cents",
        int,
        1,
        "Balance a topped-up account needs to start a request.",
        _non_negative,
    ),
    Setting(
        "max_overdraft_cents",
        int,
        5,
        "How far below zero one account's usage may run before it is cut.",
        _non_negative,
    ),
    Setting("rps", int, 50, "Default requests per second per credential.", _positive),
    Setting("burst", int, 100, "Default burst per credential.", _positive),
    Setting("max_tunnels", int, 200, "Default cap on open tunnels per account.", _positive),
    Setting(
        "flush_ms", int, 250, "Longest time usage waits in memory before it is written.", _positive
    ),
    Setting("flush_events", int, 2000, "Usage events that force an early write.", _positive),
    Setting("refresh_ms", int, 500, "How often the gateway looks for operator changes.", _positive),
    Setting("session_ttl", int, 600, "Idle seconds before a sticky session ends.", _positive),
    Setting(
        "max_sessions", int, 200_000, "Most live sticky sessions (oldest idle evicted).", _positive
    ),
    Setting("receipt_days", int, 30, "Days receipts are kept.", _positive),
    Setting("event_days", int, 30, "Days events (and their deliveries) are kept.", _positive),
    Setting(
        "event_pool_low",
        int,
        1,
        "proxy.pool_low is announced when fewer egress than this are active (0: never).",
        _non_negative,
    ),
    Setting(
        "event_keepalive_seconds",
        int,
        15,
        "How often GET /account/events sends a keep-alive comment on an idle stream.",
        _positive,
    ),
    Setting(
        "event_retry_seconds",
        int,
        86400,
        "How long a webhook or notifier delivery is retried (with exponential back-off"
        " and jitter) before it is marked failed.",
        _positive,
    ),
    Setting(
        "event_retry_first_ms",
        int,
        5000,
        "The first retry's back-off in milliseconds; each next one doubles it (up to an"
        " hour), with jitter.",
        _positive,
    ),
    Setting(
        "webhook_timeout",
        int,
        10,
        "Seconds one webhook delivery may take (a slow receiver delays only itself).",
        _positive,
    ),
    Setting(
        "lease_price_cents",
        int,
        1,
        "What an exclusive egress lease (POST /proxies/acquire) costs from the balance.",
        _non_negative,
    ),
    Setting(
        "ws_connect_timeout",
        int,
        10,
        "Seconds the WebSocket relay (/ws) waits for its connect message (seed 001: 10).",
        _positive,
    ),
    Setting(
        "max_leases_per_account", int, 5, "Live egress leases one account may hold.", _positive
    ),
    Setting(
        "auth_fail_limit",
        int,
        20,
        "Failed logins from one address per minute before it is throttled.",
        _positive,
    ),
    Setting(
        "auth_block_seconds",
        int,
        60,
        "How long an address that failed too often is throttled.",
        _positive,
    ),
    Setting(
        "allow",
        Sequence[str],
        [],
        "CIDR[:PORT] destinations allowed despite the built-in denials.",
        _cidrs,
    ),
    Setting(
        "deny", Sequence[str], [], "Extra denied domains or CIDRs, each with an optional :PORT."
    ),
    Setting("deny_ports", Sequence[str], ["25"], "Destination ports always denied.", _ports),
    Setting(
        "block_statuses",
        Sequence[str],
        ["403", "429"],
        "Upstream statuses that mark an egress blocked for a domain.",
        _statuses,
    ),
    Setting("smtp_host", str, "", "SMTP server for mail (empty: mail goes to the outbox table)."),
    Setting("smtp_port", int, 25, "SMTP port.", _port),
    Setting("mail_from", str, "datorus@localhost", "Sender of Datorus mail."),
    Setting(
        "stripe_api_key", str, "", "Stripe secret key (empty: top-ups through Stripe are off)."
    ),
    Setting("stripe_api_base", str, "", "Stripe API base URL (empty: Stripe's own)."),
    Setting("stripe_webhook_secret", str, "", "Secret that signs Stripe webhook deliveries."),
    Setting(
        "public_url",
        str,
        "",
        "Base URL customers use for the API (links in mail; empty: http://api_host:api_port).",
    ),
    Setting(
        "email_token_ttl",
        int,
        86400,
        "Seconds an emailed verification token stays valid (0: expired at once).",
        _non_negative,
    ),
    Setting("stripe_currency", str, "usd", "Currency of Stripe top-ups (amounts are in cents)."),
)

# -- REST API throttling and POST /fetch (issues 12 and 13) --------------------------------

SETTINGS += (
    Setting(
        "api_key_rps",
        int,
        50,
        "REST API requests per second per API key (POST /fetch: the proxy's own limit).",
        _positive,
    ),
    Setting("api_key_burst", int, 100, "REST API burst per API key.", _positive),
    Setting(
        "api_signups_per_hour",
        int,
        60,
        "Sign-ups (POST /auth/register) per client address per hour.",
        _positive,
    ),
    Setting(
        "api_resends_per_hour",
        int,
        10,
        "Verification mails (POST /auth/verify/resend) per client address and per account"
        " per hour.",
        _positive,
    ),
    Setting(
        "api_key_fail_limit",
        int,
        20,
        "Failed API-key checks per client address per minute before its failures get 429.",
        _positive,
    ),
    Setting(
        "api_judge_per_minute",
        int,
        60,
        "GET /judge answers per client address per minute (the gateway's own checks are"
        " not counted).",
        _positive,
    ),
    Setting(
        "max_fetch_timeout",
        int,
        120,
        "Largest 'timeout' (seconds) a POST /fetch may ask for; it overrides upstream_timeout"
        " for that request.",
        _positive,
    ),
)

# -- the egress pool (issue 5) -------------------------------------------------------------


def _check_url(v: str) -> None:
    from urllib.parse import urlsplit

    if v in ("", "none"):
        return
    if urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname:
        raise SettingsError("must be an http:// or https:// URL, empty or none")


SETTINGS += (
    Setting(
        "egress_check_url",
        str,
        "",
        "The judge every egress's HTTP check fetches through it; it answers the caller's"
        " IP, and its request headers as JSON to grade anonymity (empty: the gateway's own"
        " GET /judge at public_url; none: TCP checks only).",
        _check_url,
    ),
    Setting(
        "egress_check_seconds", int, 30, "Seconds between health checks of an egress.", _positive
    ),
    Setting(
        "egress_dead_after",
        int,
        3,
        "Failed checks in a row that make an egress dead (it recovers at its next pass).",
        _positive,
    ),
    Setting(
        "egress_check_concurrency",
        int,
        50,
        "Egress checks run at once, at most (in the background, off the request path).",
        _positive,
    ),
    Setting(
        "egress_check_timeout", int, 10, "Seconds a health check may take per stage.", _positive
    ),
    Setting(
        "block_markers",
        Sequence[str],
        ["g-recaptcha", "h-captcha", "cf-chl-", "/cdn-cgi/challenge-platform", "px-captcha"],
        "Text in a response body (first 64 KiB, any case) that marks a block page.",
    ),
    Setting(
        "block_seconds",
        int,
        30,
        "First back-off of a blocked (egress, domain); it doubles per further block.",
        _positive,
    ),
    Setting(
        "router_seed",
        int,
        0,
        "Seed of the egress router's random choices, for reproducible tests"
        " (0: the system's randomness).",
        _non_negative,
    ),
    Setting(
        "lean",
        bool,
        True,
        "Leave idle mitmproxy addons out of the hook chain and cache hook look-ups "
        "(see addons/lean.py); false restores mitmproxy's own dispatch.",
    ),
)

# -- every core: datorus serve (issue 15) ---------------------------------------------------


def _redis_url(v: str) -> None:
    """Empty, or ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS).

    >>> _redis_url("redis://127.0.0.1:6379/0")
    >>> _redis_url("http://127.0.0.1:6379/0")
    Traceback (most recent call last):
    ...
    datorus_core.settings.SettingsError: must be redis://host:port/db (or rediss://...), e.g. redis://127.0.0.1:6379/0
    """
    if not v:
        return
    from urllib.parse import urlsplit

    hint = "must be redis://host:port/db (or rediss://...), e.g. redis://127.0.0.1:6379/0"
    try:
        u = urlsplit(v)
        port = u.port
    except ValueError:
        raise SettingsError(hint) from None
    db = u.path.lstrip("/")
    if u.scheme not in ("redis", "rediss") or not u.hostname or u.query or u.fragment:
        raise SettingsError(hint)
    if port == 0 or (db and not db.isdigit()):
        raise SettingsError(hint)


SETTINGS += (
    Setting(
        "redis_url",
        str,
        "",
        "Redis that the workers of 'datorus serve --workers N' share their hot state through"
        " (redis://host:port/db); required with more than one worker, empty: state in process.",
        _redis_url,
    ),
)

# -- proxy-list sources (issue 17) ----------------------------------------------------------

SETTINGS += (
    Setting(
        "source_timeout",
        int,
        30,
        "Seconds a proxy list may take to download (a scrape, or POST /sources picking a parser).",
        _positive,
    ),
    Setting(
        "source_concurrency",
        int,
        2,
        "Scheduled scrapes one gateway process runs at once (in the background, off the"
        " request path).",
        _positive,
    ),
    Setting(
        "source_proxy_allow",
        Sequence[str],
        [],
        "CIDR[:PORT] ranges where a proxy found by a source may be despite the built-in"
        " denials (loopback, private, link-local and metadata addresses): found proxies"
        " elsewhere in those ranges are skipped and counted in the scrape result. Empty:"
        " none allowed. The destination 'allow' rules do not apply to found proxies.",
        _proxy_cidrs,
    ),
    Setting(
        "test_schedule_seconds",
        int,
        0,
        "FOR TESTS ONLY: when > 0, every source with a cron schedule runs every this many"
        " seconds instead (0: the cron schedules as written).",
        _non_negative,
    ),
)

# -- watching it: Prometheus metrics (issue 20) ----------------------------------------------

SETTINGS += (
    Setting(
        "metrics_host",
        str,
        "127.0.0.1",
        "Address GET /metrics (Prometheus) listens on.",
        _address,
    ),
    Setting(
        "metrics_port",
        int,
        9464,
        "Port of GET /metrics, the Prometheus text format (0: off); under 'datorus serve'"
        " the launcher serves every worker's metrics on it.",
        _port,
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
BY_OPTION: dict[str, Setting] = {s.option: s for s in SETTINGS}


def coerce(setting: Setting, raw: Any) -> Any:
    """Turn a file or environment value into the setting's type, or raise SettingsError."""
    try:
        if setting.type is bool:
            if isinstance(raw, bool):
                value: Any = raw
            elif str(raw).lower() in ("1", "true", "yes", "on"):
                value = True
            elif str(raw).lower() in ("0", "false", "no", "off"):
                value = False
            else:
                raise SettingsError("must be true or false")
        elif setting.type is int:
            if isinstance(raw, bool):
                raise SettingsError("must be a whole number")
            value = int(str(raw).strip().replace("_", ""))
        elif setting.type is str:
            value = "" if raw is None else str(raw)
        else:  # Sequence[str]
            if raw is None:
                value = []
            elif isinstance(raw, str):
                value = [p.strip() for p in raw.split(",") if p.strip()]
            elif isinstance(raw, list | tuple):
                value = [str(p).strip() for p in raw]
            else:
                raise SettingsError("must be a list")
    except ValueError as e:
        if isinstance(e, SettingsError):
            raise SettingsError(f"{setting.option}: {e}") from None
        kind = {int: "a whole number", str: "text"}.get(setting.type, "a list")
        raise SettingsError(f"{setting.option}: {raw!r} is not {kind}") from None
    validate(setting, value)
    return value


def validate(setting: Setting, value: Any) -> None:
    """Run the setting's own check, raising SettingsError with its name."""
    if setting.check is not None:
        try:
            setting.check(value)
        except SettingsError as e:
            raise SettingsError(f"{setting.option}: {e}") from None


def conf_path() -> Path:
    """The settings file: ``DATORUS_CONF`` if set, else ``mitm.conf`` at the repository root."""
    return Path(os.environ.get("DATORUS_CONF") or DEFAULT_CONF).expanduser().absolute()


def _is_url(value: str) -> bool:
    return "://" in value


def read_conf(path: Path | str | None = None) -> dict[str, Any]:
    """Read the settings file (YAML mapping); a missing ``mitm.conf`` means no values.

    A relative ``db`` in the file is relative to the file's own folder, so the gateway
    and the CLI find the same ledger from any working directory.
    """
    explicit = path is not None or bool(os.environ.get("DATORUS_CONF"))
    path = Path(path).absolute() if path else conf_path()
    if not path.exists():
        if explicit:
            raise SettingsError(f"{path}: no such settings file (DATORUS_CONF)")
        return {}
    from ruamel.yaml import YAML

    try:
        data = YAML(typ="safe").load(path.read_text()) or {}
    except Exception as e:  # the YAML parser raises many types
        raise SettingsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected 'name: value' lines")
    values: dict[str, Any] = {}
    for key, raw in data.items():
        name = str(key).removeprefix("datorus_")
        if name not in BY_NAME:
            raise SettingsError(f"{path}: unknown setting {key!r}")
        try:
            values[name] = coerce(BY_NAME[name], raw)
        except SettingsError as e:
            raise SettingsError(f"{path}: {e}") from None
    db = values.get("db")
    if db and db != ":memory:" and not _is_url(db) and not Path(db).expanduser().is_absolute():
        values["db"] = os.path.normpath(path.parent / db)
    return values


#: Where a setting's value came from, as ``datorus settings`` names it.
SOURCE_DEFAULT, SOURCE_CONF, SOURCE_ENV = "default", "mitm.conf", "environment"


def resolve_sources(
    conf: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, tuple[Any, str]]:
    """Each setting's ``(value, source)``: built-in default < mitm.conf < environment."""
    conf = read_conf() if conf is None else conf
    environ = os.environ if environ is None else environ
    out: dict[str, tuple[Any, str]] = {}
    for s in SETTINGS:
        value, source = s.default, SOURCE_DEFAULT
        if s.name in conf:
            value, source = conf[s.name], SOURCE_CONF
        if s.env in environ:
            value, source = coerce(s, environ[s.env]), SOURCE_ENV
        out[s.name] = (list(value) if isinstance(value, list | tuple) else value, source)
    return out


def resolve_defaults(
    conf: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Each setting's value from built-in default < mitm.conf < environment."""
    return {name: value for name, (value, _) in resolve_sources(conf, environ).items()}


def ledger_location(cli_db: str | None = None) -> tuple[str, str]:
    """The ledger a CLI command uses and where that came from.

    ``--db`` (*cli_db*) > ``DATORUS_DB`` > ``db`` in the settings file > ``./datorus.db``.
    A file path comes back absolute (a relative ``--db``, ``DATORUS_DB`` or default is
    relative to the current folder); a URL comes back unchanged. The source is
    ``--db``, ``DATORUS_DB``, the settings file's path, or ``default``.
    """
    if cli_db:
        path, source = cli_db, "--db"
    elif os.environ.get("DATORUS_DB"):
        path, source = os.environ["DATORUS_DB"], "DATORUS_DB"
    else:
        conf = read_conf()
        if "db" in conf:
            path, source = conf["db"], str(conf_path())
        else:
            path, source = BY_NAME["db"].default, SOURCE_DEFAULT
    if path != ":memory:" and not _is_url(path):
        path = os.path.abspath(os.path.expanduser(path))
    return path, source


def default_db_path() -> str:
    """The ledger path a CLI command uses without ``--db``: env, then mitm.conf, then default."""
    return ledger_location()[0]


_SECRET_ENDINGS = ("_key", "_secret", "_password", "_token")


def shown_value(setting: Setting, value: Any) -> Any:
    """*value* as it may be printed: secrets hidden, passwords in URLs masked."""
    if isinstance(value, str) and value:
        if setting.name.endswith(_SECRET_ENDINGS):
            return "********"
        if _is_url(value):
            from .ledger.target import shown

            return shown(value)
    return value


def public_base(settings: dict[str, Any]) -> str:
    """The API's base URL for links: ``public_url``, else where the API listens."""
    url = str(settings.get("public_url") or "").rstrip("/")
    if url:
        return url
    host = str(settings.get("api_host") or "127.0.0.1")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.get('api_port') or 8002}"
