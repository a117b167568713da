"""Datorus benchmark: bare mitmdump against the Datorus gateway, interleaved, on loopback.

``scripts/bench`` runs this file with the project's Python. One run:

1. installs nginx and ApacheBench with apt-get when they are missing (and py-spy with
   pip, for the profile); without nginx it serves from ``scripts/bench_origin.py``;
2. starts an origin on 127.0.0.1 (HTTP and HTTPS, ``/1k`` and ``/100m``), a bare
   ``mitmdump`` that passes TLS through (``--ignore-hosts '.*'``), the Datorus gateway on
   a fresh ledger (auth, metering, rate limits set far above the load, policy on) and a
   second gateway whose ledger holds 10,000 accounts and credentials;
3. measures bare and gateway interleaved for several rounds and prints the medians and
   the ratio to bare measured in the same round, then the RSS after 20,000 and 100,000
   requests, the scale figures, the ledger's usage-event write rate and a py-spy
   profile of the gateway that says what each Datorus addon costs.

Two comparisons join the same interleaved rounds when asked for:

``--baseline REF``
    another commit's gateway (issue 14: "no loss against main"): a throwaway
    ``git worktree add --detach`` of REF in the temp dir, removed on exit, whose ledger
    is made by that tree's own ledger code and whose ``addons/datorus.py`` runs under
    the same ``.venv`` with ``PYTHONPATH`` on that tree; the report gives
    current/baseline ratios, round by round.
``--ledger-compare``
    the ledger on PostgreSQL (issue 16): a throwaway cluster the bench starts (``initdb``
    into the temp dir, as Debian's ``postgres`` user when run as root; loopback TCP only;
    ``fsync``, ``synchronous_commit`` and ``full_page_writes`` ON, as a real ledger runs),
    the usage writer's events/s on SQLite and on PostgreSQL, the time ``datorus ledger
    copy`` takes to move the 10,000-account ledger there, and two gateway nodes (two
    mitmdump processes on two ports, one PostgreSQL ledger, one ``redis-server``,
    ``datorus_redis_url`` on both) against one of them alone, forward c50 (c25 + c25 on
    the two ports for the pair), in the same interleaved rounds, with the CPU of each
    node, of PostgreSQL and of Redis, Redis's commands and the ledger's write
    transactions per request.
``--workers-compare``
    ``datorus serve --workers 2`` with its hot state in Redis (a ``redis-server`` the
    bench starts on a free port, no persistence), bare mitmdump and proxy.py 2.4 with its
    default workers (installed with pip into a throwaway venv in the temp dir, never into
    the project), against the one-worker gateway (issue 15). CPU counts every process of
    a proxy (its whole session: launcher and workers), and Redis's for the workers. Skipped,
    saying why, on a tree without ``datorus serve``.

Everything it starts is stopped on exit, Ctrl-C included. ``_tunnels`` is an internal
subcommand: the CONNECT+TLS+GET client, run as its own process so its CPU is not ours;
``_ledger TREE DB`` prepares the bench ledger with TREE's ledger code (the baseline's).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import datetime as dt
import glob
import json
import os
import pwd
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LARGE_BYTES = 100 * 1000 * 1000
C50 = 50
T0 = time.monotonic()


# -- processes and /proc -----------------------------------------------------------------


def log(msg: str) -> None:
    """A progress line on stderr, stamped with the seconds since start."""
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def tool(name: str) -> str | None:
    """``$REPO/.venv/bin/NAME`` when it exists, else NAME on PATH."""
    venv = REPO / ".venv" / "bin" / name
    return str(venv) if venv.exists() else shutil.which(name)


def clean_env() -> dict[str, str]:
    """The environment without proxy variables, so no client is sent anywhere else."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    # no gateway binds the default metrics port (9464) unless the bench gives it one: two
    # gateways of a run would collide on it (start_proxy(..., metrics=True) gives a port)
    env.setdefault("DATORUS_METRICS_PORT", "0")
    return env


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a short command with a time limit, capturing its text output."""
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )


def free_port() -> int:
    """A currently free TCP port on the loopback address."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stat_fields(text: str) -> tuple[int, float]:
    """``(session id, user+system CPU seconds)`` from the text of ``/proc/PID/stat``.

    >>> line = "7 (a) b) S 1 7 7 0 -1 0 0 0 0 0 250 50 0 0 20 0 3 0 1 2 3"
    >>> stat_fields(line) == (7, 300 / CLK_TCK)
    True
    """
    fields = text.rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
    return int(fields[3]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds the process has used (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        return stat_fields(f.read())[1]


def session_cpu_seconds(sessions: set[int]) -> float:
    """CPU seconds of every live process in *sessions* (a proxy and the workers it forks).

    Each process the bench starts leads its own session, so this counts a launcher, its
    workers and their threads. A child that exited in between is not counted.
    """
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    sid, cpu = stat_fields(f.read())
                if sid in sessions:
                    total += cpu
    return total


def own_cpu() -> float:
    """User plus system CPU seconds of this process, every thread."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def family_cpu_seconds(pid: int) -> float:
    """CPU seconds of the process *pid* and of its live children (``/proc/*/stat``)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
                ppid = int(text.rsplit(")", 1)[1].split()[1])
                if int(entry) == pid or ppid == pid:
                    total += stat_fields(text)[1]
    return total


def rss_mb(pid: int) -> float | None:
    """The process's resident set size in MiB, or None when it is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


class Children:
    """Every long-running process this run started (each in its own process group)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        name: str,
        cmd: list[str],
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
        owner: pwd.struct_passwd | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start *cmd* in *cwd* with its output in ``TMP/NAME.log`` (*env* added to ours),
        as the user *owner* when given (PostgreSQL will not run as root)."""
        with open(self.tmp / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=clean_env() | (env or {}),
                start_new_session=True,
                **as_user(owner),
            )
        self.procs.append(proc)
        return proc

    def wait_port(
        self, proc: subprocess.Popen[bytes], name: str, port: int, timeout: float
    ) -> None:
        """Poll until *port* accepts connections; exit with the log tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
                return
            time.sleep(0.1)
        text = (self.tmp / f"{name}.log").read_text(errors="replace").strip().splitlines()[-8:]
        raise SystemExit(f"bench: {name} did not listen on :{port}\n" + "\n".join(text))

    def stop_all(self) -> None:
        """SIGTERM every process group, then SIGKILL what lingers."""
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(8)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def as_user(owner: pwd.struct_passwd | None) -> dict[str, Any]:
    """``subprocess`` arguments that run a child as *owner* (nothing for None)."""
    if owner is None:
        return {}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


# -- set-up: packages, certificates, origin ----------------------------------------------


def ensure_tools(install: bool, redis: bool = False, postgres: bool = False) -> str:
    """Install nginx and ab (and redis-server, PostgreSQL) with apt-get, py-spy with pip,
    when missing."""
    notes = []
    wanted = [("nginx-light", "nginx"), ("apache2-utils", "ab")]
    wanted += [("redis-server", "redis-server")] if redis else []
    apt = [p for p, exe in wanted if not shutil.which(exe)]
    apt += ["postgresql"] if postgres and pg_bin() is None else []
    if apt and install and shutil.which("apt-get") and os.geteuid() == 0:
        log(f"installing {' '.join(apt)} with apt-get")
        env = clean_env() | {"DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *apt]
        for attempt in range(2):
            if subprocess.run(cmd, capture_output=True, env=env, timeout=300).returncode == 0:
                break
            if attempt == 0:
                subprocess.run(
                    ["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300
                )
        notes.append(f"apt-get installed {' '.join(apt)}")
    if not tool("py-spy") and install:
        log("installing py-spy with pip (for the profile)")
        run([sys.executable, "-m", "pip", "install", "-q", "py-spy>=0.3,<0.5"], timeout=300)
        notes.append("pip installed py-spy")
    if not shutil.which("ab"):
        raise SystemExit("bench: ApacheBench (ab) is required: apt-get install apache2-utils")
    if not shutil.which("curl"):
        raise SystemExit("bench: curl is required: apt-get install curl")
    return "; ".join(notes) or "nothing installed"


def make_certs(tmp: Path) -> tuple[Path, Path]:
    """A throwaway CA and a 127.0.0.1 leaf (mitmproxy's own helpers): (ca.pem, leaf.pem)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from mitmproxy import certs

    key, ca = certs.create_ca("datorus bench", "datorus bench CA", 2048)
    leaf = certs.dummy_cert(key, ca, "127.0.0.1", [x509.IPAddress(ipaddress.ip_address(HOST))])
    ca_pem, leaf_pem = tmp / "ca.pem", tmp / "leaf.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    leaf_pem.write_bytes(leaf.to_pem() + key_pem)  # nginx and Python both take cert+key
    return ca_pem, leaf_pem


NGINX_CONF = """\
worker_processes 1;
{user}pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/ngx; proxy_temp_path {tmp}/ngx; fastcgi_temp_path {tmp}/ngx;
    uwsgi_temp_path {tmp}/ngx; scgi_temp_path {tmp}/ngx;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 10000000;
    server {{ listen {host}:{http}; root {tmp}/www; }}
    server {{ listen {host}:{https} ssl; root {tmp}/www;
             ssl_certificate {pem}; ssl_certificate_key {pem}; }}
}}
"""


@dataclass
class Origin:
    """The HTTP/HTTPS origin every proxy forwards to."""

    kind: str
    http: int
    https: int
    ca: Path

    @property
    def small(self) -> str:
        return f"http://{HOST}:{self.http}/1k"


def start_origin(children: Children, tmp: Path, force_python: bool) -> Origin:
    """nginx when installed, else ``scripts/bench_origin.py``."""
    ca, pem = make_certs(tmp)
    http, https = free_port(), free_port()
    if shutil.which("nginx") and not force_python:
        (tmp / "ngx").mkdir()
        (tmp / "www").mkdir()
        (tmp / "www" / "1k").write_bytes(bytes(range(256)) * 4)
        with open(tmp / "www" / "100m", "wb") as f:
            f.truncate(LARGE_BYTES)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = NGINX_CONF.format(user=user, tmp=tmp, host=HOST, http=http, https=https, pem=pem)
        (tmp / "nginx.conf").write_text(conf)
        cmd = ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
               "-e", str(tmp / "nginx-error.log"), "-g", "daemon off;"]  # fmt: skip
        kind = "nginx " + run(["nginx", "-v"], 10).stderr.strip().split("/")[-1]
    else:
        cmd = [sys.executable, str(REPO / "scripts" / "bench_origin.py"), "--http-port", str(http),
               "--https-port", str(https), "--cert", str(pem), "--key", str(pem)]  # fmt: skip
        kind = "scripts/bench_origin.py (asyncio)"
    proc = children.spawn("origin", cmd)
    children.wait_port(proc, "origin", http, 20)
    children.wait_port(proc, "origin", https, 20)
    return Origin(kind, http, https, ca)


# -- the proxies and their ledgers -------------------------------------------------------


@dataclass
class Proxy:
    """One proxy under test."""

    key: str
    port: int
    proc: subprocess.Popen[bytes]
    creds: tuple[str, str] | None = None
    requests: int = 0  # forward requests it has served so far
    rss: dict[int, float | None] = field(default_factory=dict)
    also: list[int] = field(default_factory=list)  # pids whose CPU counts too (Redis)
    redis_port: int = 0  # the Redis its hot state lives in (0: none)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        """CPU seconds of the proxy's whole session (and of the processes in ``also``)."""
        return session_cpu_seconds({self.proc.pid, *self.also})


FULL = ("bare", "datorus", "baseline", "workers", "proxypy")  # every figure, every round
C50_ONLY = ("nometer", "scale")  # forward c50 only
GATEWAY_SETTINGS = {  # rate limits far above what the bench sends; the REST API off
    "api_port": 0, "rps": 10_000_000, "burst": 10_000_000, "max_tunnels": 100_000,
}  # fmt: skip


def gateway_args(tmp: Path, key: str, port: int, db: Path | str) -> list[str]:
    """mitmdump's arguments for a gateway on *port* and ledger *db* (a SQLite path or a
    PostgreSQL URL), with the bench settings."""
    args = ["-q", "--listen-host", HOST, "--listen-port", str(port)]
    args += ["--set", f"confdir={tmp / ('mitm-' + key)}", "--set", f"datorus_db={db}"]
    for k, v in GATEWAY_SETTINGS.items():
        args += ["--set", f"datorus_{k}={v}"]
    return args


def start_proxy(
    children: Children, tmp: Path, key: str, script: str | None = None, db: Path | None = None,
    creds: tuple[str, str] | None = None, tree: Path = REPO, metrics: bool = False,
) -> Proxy:  # fmt: skip
    """``mitmdump -q`` on a free port; with *script*, the Datorus gateway on ledger *db*.

    *tree* is the checkout the gateway runs from (the baseline's for ``--baseline``):
    its directory is the working directory and comes first on ``PYTHONPATH``. With
    *metrics* it serves ``/metrics`` on a free port (as a gateway does by default);
    else ``metrics_port`` is 0 (an older tree ignores the variable).
    """
    port = free_port()
    mitmdump = tool("mitmdump") or "mitmdump"
    if script is None or db is None:
        cmd = [mitmdump, "-q", "--listen-host", HOST, "--listen-port", str(port)]
        cmd += ["--set", f"confdir={tmp / ('mitm-' + key)}"]
        cmd += ["--ignore-hosts", ".*"]  # TLS passes through, as Datorus passes it
    else:
        cmd = [mitmdump, "-s", str(tree / script), *gateway_args(tmp, key, port, db)]
    env = {"PYTHONPATH": str(tree)} if tree != REPO else {}
    # several gateways run at once here: none takes the SOCKS5 entry's default port
    env["DATORUS_SOCKS5_PORT"] = os.environ.get("DATORUS_SOCKS5_PORT", "0")
    if metrics:
        env["DATORUS_METRICS_PORT"] = str(free_port())
    return Proxy(key, port, children.spawn(key, cmd, cwd=tree, env=env), creds)


def prepare_ledger(db: Path) -> tuple[str, str]:
    """One bench account (a huge trial) and its credential, loopback allowed, an egress pool.

    The pool is the box's default route twice (two egress to choose between), so the
    gateway's egress router picks per request and keeps the bench's sticky session.
    """
    from datorus_core.ledger import accounts, open_ledger, policy_rules
    from datorus_core.ledger import egress as egress_ledger

    d = open_ledger(db)
    account = accounts.create_account(d, "bench@example.com", trial_bytes=10**15)
    cred = accounts.create_credential(d, account["id"])
    policy_rules.add_policy_rule(d, "allow", "127.0.0.0/8")
    egress_ledger.add_egress(d, "direct://")
    egress_ledger.add_egress(d, "direct://127.0.0.1")
    d.conn.close()
    return cred["username"], cred["password"]


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite ledger (the backup API)."""
    with (
        contextlib.closing(sqlite3.connect(src)) as a,
        contextlib.closing(sqlite3.connect(dst)) as b,
    ):
        a.backup(b)


def seed_accounts(db: Path, accounts: int) -> None:
    """Add *accounts* accounts with a credential each, the way the CLI creates them.

    Accounts go through ``ledger.accounts.create_account``; the credentials share one
    real scrypt hash and go in with ``ledger.accounts.add_credentials_bulk`` in one
    transaction (hashing 10,000 passwords would take minutes, and those passwords are
    never used: rows and indexes are what count).
    """
    from datorus_core.hashing import hash_secret, new_username
    from datorus_core.ledger import accounts as ledger_accounts
    from datorus_core.ledger import open_ledger

    d = open_ledger(db)
    shared = hash_secret("filler-password-never-used")
    ids = [
        ledger_accounts.create_account(d, f"scale{i}@bench.example", 10**9)["id"]
        for i in range(accounts)
    ]
    ledger_accounts.add_credentials_bulk(d, [(i, new_username(), shared) for i in ids])
    d.close()


def probe(proxy: Proxy, origin: Origin, timeout: float = 30) -> None:
    """Wait until one forward request through *proxy* answers 200 (exit if it never does)."""
    auth = ""
    if proxy.creds:
        auth = f"Proxy-Authorization: Basic {b64(proxy.creds)}\r\n"
    host = f"Host: {HOST}:{origin.http}\r\n"
    req = f"GET {origin.small} HTTP/1.1\r\n{host}{auth}Connection: close\r\n\r\n"
    deadline, status = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline and proxy.proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection((HOST, proxy.port), 5) as s:
            s.sendall(req.encode())
            status = s.makefile("rb").readline().decode(errors="replace").strip()
            if status.split(" ")[1:2] == ["200"]:
                return
        time.sleep(0.2)
    raise SystemExit(f"bench: {proxy.key} does not forward (last answer: {status}); see its log")


def b64(creds: tuple[str, str]) -> str:
    """``user:password`` in base64, for Proxy-Authorization."""
    return base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


# -- the comparisons: another commit's gateway; workers, Redis and proxy.py ----------------


def add_baseline_tree(ref: str, tmp: Path) -> tuple[Path, str]:
    """A throwaway ``git worktree add --detach`` of *ref* in *tmp*: (its path, short hash)."""
    done = run(["git", "rev-parse", "--short", "--verify", "--end-of-options", f"{ref}^{{commit}}"],
               30)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"bench: --baseline {ref}: not a commit of this repository")
    sha, tree = done.stdout.strip(), tmp / "baseline"
    done = run(["git", "worktree", "add", "--detach", str(tree), sha], 120)
    if done.returncode:
        raise SystemExit(f"bench: git worktree add {ref} failed: {done.stderr.strip()}")
    return tree, sha


def remove_baseline_tree(tree: Path) -> None:
    """Remove the baseline's worktree and git's record of it."""
    done = run(["git", "worktree", "remove", "--force", str(tree)], 120)
    if done.returncode:
        print(f"bench: git worktree remove {tree}: {done.stderr.strip()}", file=sys.stderr)


def prepare_ledger_in(tree: Path, db: Path) -> tuple[str, str]:
    """:func:`prepare_ledger` run by *tree*'s own ledger code (``_ledger``, a subprocess)."""
    done = subprocess.run(
        [sys.executable, __file__, "_ledger", str(tree), str(db)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=tree,
        env=clean_env() | {"PYTHONPATH": str(tree)},
    )  # fmt: skip
    try:
        got = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise SystemExit(f"bench: the baseline's ledger code failed:\n{tail}") from None
    if not Path(got["code"]).is_relative_to(tree):
        raise SystemExit(f"bench: the baseline's ledger came from {got['code']}, not {tree}")
    return got["username"], got["password"]


def serve_missing() -> str | None:
    """Why ``datorus serve`` cannot run from this tree, or None when it can."""
    datorus = tool("datorus")
    if datorus is None:
        return "the datorus CLI is not installed here (./scripts/install)"
    if run([datorus, "serve", "--help"], 60).returncode != 0:
        return "this tree has no 'datorus serve' (issue 15's branch is not merged yet)"
    if not shutil.which("redis-server"):
        return "redis-server is not installed (apt-get install redis-server)"
    return None


def start_redis(children: Children, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A throwaway ``redis-server`` on a free loopback port, without persistence."""
    port = free_port()
    cmd = ["redis-server", "--bind", HOST, "--port", str(port), "--save", "",
           "--appendonly", "no", "--dir", str(tmp)]  # fmt: skip
    proc = children.spawn("redis", cmd)
    children.wait_port(proc, "redis", port, 20)
    return proc, port


def redis_info(text: str) -> dict[str, str]:
    """The ``name:value`` lines of a Redis ``INFO`` reply.

    >>> redis_info("$60\\r\\n# Stats\\r\\ntotal_commands_processed:42\\r\\nx:1:2\\r\\n")
    {'total_commands_processed': '42', 'x': '1:2'}
    """
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and line[:1] != "#")


def redis_commands(port: int) -> int:
    """Commands the Redis on *port* has processed so far (``INFO stats``, this one included)."""
    with socket.create_connection((HOST, port), 5) as s:
        s.sendall(b"INFO stats\r\n")
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
            head, sep, rest = buf.partition(b"\r\n")
            if sep and head[:1] == b"$" and len(rest) >= int(head[1:]):
                break
    return int(redis_info(buf.decode())["total_commands_processed"])


def start_workers(
    children: Children, tmp: Path, db: Path, creds: tuple[str, str], workers: int
) -> Proxy:
    """``datorus serve --workers N`` with the gateway's bench settings and its state in Redis."""
    redis, redis_port = start_redis(children, tmp)
    port = free_port()
    cmd = [tool("datorus") or "datorus", "serve", "--workers", str(workers)]
    cmd += gateway_args(tmp, "workers", port, db)
    cmd += ["--set", f"datorus_redis_url=redis://{HOST}:{redis_port}/0"]
    proc = children.spawn("workers", cmd)
    return Proxy("workers", port, proc, creds, also=[redis.pid], redis_port=redis_port)


PROXYPY = "proxy.py==2.4.*"


def install_proxypy(tmp: Path) -> tuple[Path | None, str]:
    """proxy.py 2.4 in a throwaway venv in *tmp* (pip, from PyPI): (its ``proxy``, version).

    Never in the project's venv: it is a reference, not a dependency.
    """
    venv = tmp / "proxypy-venv"
    log(f"installing {PROXYPY} with pip into {venv}")
    if run([sys.executable, "-m", "venv", str(venv)], 120).returncode:
        return None, "python -m venv failed"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check", PROXYPY]  # fmt: skip
    done = run(pip, 300)
    exe = venv / "bin" / "proxy"
    if done.returncode or not exe.exists():
        return None, "pip install failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return exe, run([str(exe), "--version"], 30).stdout.strip()


def start_proxypy(children: Children, tmp: Path, exe: Path) -> Proxy:
    """proxy.py with its default workers and plugins on a free loopback port.

    Its defaults already pass CONNECT through without decrypting (TLS interception needs
    ``--ca-*`` files) and load no plugin beyond the HTTP proxy; ``--log-level WARNING``
    turns off its per-request access log (bare mitmdump runs ``-q`` too).
    """
    port = free_port()
    cmd = [str(exe), "--hostname", HOST, "--port", str(port), "--log-level", "WARNING",
           "--data-dir", str(tmp / "proxypy-data")]  # fmt: skip
    return Proxy("proxypy", port, children.spawn("proxypy", cmd, cwd=tmp))


# -- --ledger-compare: a throwaway PostgreSQL, two gateway nodes sharing it and Redis ----


def pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` (Debian's layout), else ``initdb``'s on PATH."""

    def version(initdb: str) -> int:
        name = Path(initdb).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PgCluster:
    """``initdb`` into ``TMP/pg`` and ``postgres`` on a free loopback port, durable.

    Unlike the tests' cluster, nothing that makes commits cheaper is turned off:
    ``fsync``, ``synchronous_commit`` and ``full_page_writes`` are on (PostgreSQL's
    defaults, spelled out), so every usage batch the writer commits waits for its WAL
    flush, as on a real ledger. Trust authentication on 127.0.0.1 and a socket in the
    cluster's directory: nothing leaves the box. As root it runs as Debian's ``postgres``
    user (the temp dir is opened for traversal, ``0711``).
    """

    def __init__(self, children: Children, tmp: Path) -> None:
        found = pg_bin()
        if found is None:
            raise SystemExit("bench: PostgreSQL is required: apt-get install postgresql")
        self.bin = found
        self.children = children
        self.port = free_port()
        self.dir = tmp / "pg"
        self.dir.mkdir()
        self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if self.owner is not None:
            os.chmod(tmp, 0o711)
            os.chown(self.dir, self.owner.pw_uid, self.owner.pw_gid)
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self, *cmd: str, timeout: float = 120) -> str:
        """Run one of the cluster's binaries as its owner; its output (exit on failure)."""
        done = subprocess.run(
            [str(self.bin / cmd[0]), *cmd[1:]], capture_output=True, text=True,
            timeout=timeout, cwd=self.dir, env=clean_env(), check=False, **as_user(self.owner),
        )  # fmt: skip
        if done.returncode:
            raise SystemExit(f"bench: {cmd[0]} failed: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def start(self) -> PgCluster:
        """initdb, then the server; returns when it accepts connections."""
        data = str(self.dir / "data")
        self.run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                 "--locale=C")  # fmt: skip
        cmd = [str(self.bin / "postgres"), "-D", data, "-p", str(self.port), "-k", str(self.dir),
               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on",
               "-c", "synchronous_commit=on", "-c", "full_page_writes=on"]  # fmt: skip
        self.proc = self.children.spawn("postgres", cmd, cwd=self.dir, owner=self.owner)
        deadline = time.monotonic() + 60
        ready = [str(self.bin / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port)]
        while subprocess.run(ready, check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.children.tmp / "postgres.log").read_text(errors="replace")[-800:]
                raise SystemExit(f"bench: postgres did not start\n{tail}")
            time.sleep(0.1)
        return self

    def createdb(self, name: str) -> str:
        """A new database; its URL (``postgresql://postgres@127.0.0.1:PORT/NAME``)."""
        self.run("createdb", "-h", HOST, "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql://postgres@{HOST}:{self.port}/{name}"

    def psql(self, sql: str, db: str) -> str:
        """*sql*'s result with ``psql -A -t`` (a bench probe, not the ledger's code)."""
        return self.run("psql", "-X", "-q", "-A", "-t", "-h", HOST, "-p", str(self.port),
                        "-U", "postgres", "-d", db, "-c", sql).strip()  # fmt: skip

    def cpu(self) -> float:
        """CPU seconds of the server and its live children (backends, WAL writer...:
        each leads a session of its own, so they are found by their parent)."""
        return family_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def version(self) -> str:
        """``PostgreSQL 15.x`` as the server reports it."""
        out = subprocess.run([str(self.bin / "postgres"), "--version"], capture_output=True,
                             text=True, check=False).stdout  # fmt: skip
        m = re.search(r"\(PostgreSQL\) (\S+)", out)
        return f"PostgreSQL {m.group(1) if m else '?'}"


@dataclass
class Nodes:
    """``--ledger-compare``'s set-up: the cluster, the nodes' ledger, their Redis."""

    pg: PgCluster
    db: str  # the nodes' database name
    redis_pid: int
    redis_port: int
    copy_s: float  # what 'datorus ledger copy' of their ledger took


def ledger_stats(nodes: Nodes) -> int:
    """Usage batches the nodes' ledger holds (one write transaction each)."""
    return int(nodes.pg.psql("SELECT count(*) FROM usage_batches", nodes.db) or 0)


def start_nodes(bench: Bench, db: Path, creds: tuple[str, str]) -> None:
    """Two gateway nodes on one PostgreSQL ledger (a copy of the bench ledger, made with
    ``datorus ledger copy``) and one Redis: ``node_a`` and ``node_b``."""
    from datorus_core.ledger.copy import copy_ledger

    tmp, children = bench.tmp, bench.children
    pg = bench.pg or PgCluster(children, tmp).start()
    bench.pg = pg
    src = tmp / "nodes.db"
    copy_db(db, src)
    url = pg.createdb("nodes")
    t0 = time.perf_counter()
    copy_ledger(str(src), url)
    took = time.perf_counter() - t0
    redis, redis_port = start_redis(children, tmp)
    bench.nodes = Nodes(pg, "nodes", redis.pid, redis_port, took)
    mitmdump = tool("mitmdump") or "mitmdump"
    for key in ("node_a", "node_b"):
        port = free_port()
        cmd = [mitmdump, "-s", str(REPO / "addons" / "datorus.py")]
        cmd += gateway_args(tmp, key, port, url)
        cmd += ["--set", f"datorus_redis_url=redis://{HOST}:{redis_port}/0"]
        bench.proxies[key] = Proxy(key, port, children.spawn(key, cmd), creds)


# -- measurements ------------------------------------------------------------------------


AB_RE = {
    "requests": re.compile(r"^Complete requests:\s+(\d+)", re.M),
    "failed": re.compile(r"^Failed requests:\s+(\d+)", re.M),
    "non2xx": re.compile(r"^Non-2xx responses:\s+(\d+)", re.M),
    "rps": re.compile(r"^Requests per second:\s+([\d.]+)", re.M),
}


def ab_cmd(
    proxy: Proxy, origin: Origin, conc: int, seconds: float, count: int, csv: Path
) -> list[str]:
    """ApacheBench with keep-alive through the proxy (``-X``, ``-P``).

    ``-H 'Connection: keep-alive'``: mitmproxy compares the Connection token
    case-sensitively, and ab's own ``Keep-Alive`` alone makes it close every connection.
    """
    cmd = ["ab", "-q", "-k", "-H", "Connection: keep-alive", "-H", "X-Datorus-Session-Id: bench",
           "-c", str(conc), "-s", "30",
           "-n", str(count), "-e", str(csv), "-X", f"{HOST}:{proxy.port}"]  # fmt: skip
    if seconds:
        cmd[1:1] = ["-t", str(max(1, round(seconds)))]
    if proxy.creds:
        cmd += ["-P", f"{proxy.creds[0]}:{proxy.creds[1]}"]
    return [*cmd, origin.small]


def parse_ab(out: str, csv: Path) -> dict[str, Any]:
    """Requests, failures, req/s and the p50/p99 (from ``-e``'s CSV, sub-ms resolution)."""
    got = {k: rx.search(out) for k, rx in AB_RE.items()}
    if got["requests"] is None or got["rps"] is None:
        return {"requests": 0, "error": "ab: " + (out.strip().splitlines() or ["no output"])[-1]}
    res: dict[str, Any] = {
        "requests": int(got["requests"].group(1)),
        "failed": sum(int(got[k].group(1)) for k in ("failed", "non2xx") if got[k]),
        "rps": float(got["rps"].group(1)),
    }
    pct = dict(line.split(",") for line in csv.read_text().splitlines()[1:])
    res["p50"], res["p99"] = float(pct["50"]), float(pct["99"])
    return res


@dataclass(frozen=True)
class Sample:
    """What a proxy has used so far: its CPU, its Redis's CPU and Redis's command count."""

    cpu: float
    redis_cpu: float | None = None
    redis_commands: int | None = None
    box: tuple[int, int] | None = None  # (idle, all) jiffies of every core since boot
    clients: float | None = None  # CPU seconds of our finished children (ab, tunnels)


def box_jiffies() -> tuple[int, int]:
    """Idle (idle + iowait) and all jiffies of every core since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
    return ticks[3] + ticks[4], sum(ticks)


def children_cpu() -> float:
    """User plus system CPU seconds of the child processes this bench has waited for."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def sample(p: Proxy) -> Sample:
    """The proxy's counters now (Redis's only when it has one), the box's and the clients'."""
    commands = None
    if p.redis_port:
        with contextlib.suppress(OSError, KeyError, ValueError):
            commands = redis_commands(p.redis_port)
    redis_cpu = session_cpu_seconds(set(p.also)) if p.also else None
    return Sample(p.cpu(), redis_cpu, commands, box_jiffies(), children_cpu())


def costs(before: Sample, after: Sample, n: int) -> dict[str, float]:
    """Per unit of work (*n* requests or tunnels): CPU ms, and Redis's CPU ms and commands;
    how idle the box's cores were in between (%) and the client's CPU ms per unit.

    The INFO command that took the first sample is Redis's own count, not the proxy's.

    >>> costs(Sample(1.0, 0.5, 100), Sample(1.2, 0.52, 301), 100)
    {'cpu_ms': 2.0, 'redis_cpu_ms': 0.2, 'redis_cmds': 2.0}
    """
    out = {"cpu_ms": round((after.cpu - before.cpu) / n * 1000, 9)}
    if before.redis_cpu is not None and after.redis_cpu is not None:
        out["redis_cpu_ms"] = round((after.redis_cpu - before.redis_cpu) / n * 1000, 9)
    if before.redis_commands is not None and after.redis_commands is not None:
        out["redis_cmds"] = (after.redis_commands - before.redis_commands - 1) / n
    if before.box and after.box and after.box[1] > before.box[1]:
        idle, every = after.box[0] - before.box[0], after.box[1] - before.box[1]
        out["box_idle_pct"] = round(idle / every * 100, 1)
    if before.clients is not None and after.clients is not None:
        out["client_cpu_ms"] = round((after.clients - before.clients) / n * 1000, 9)
    return out


class Bench:
    """One run: the origin, the proxies and every raw figure, per round."""

    def __init__(self, args: argparse.Namespace, tmp: Path, children: Children) -> None:
        self.args = args
        self.tmp = tmp
        self.children = children
        self.origin: Origin
        self.proxies: dict[str, Proxy] = {}
        self.rounds: list[dict[str, dict[str, Any]]] = []
        self.extra: dict[str, Any] = {}
        self.notes: list[str] = []
        self.pg: PgCluster | None = None
        self.nodes: Nodes | None = None
        self._n = 0

    def put(self, key: str, name: str, value: Any) -> None:
        """Store a figure of proxy *key* in the current round."""
        self.rounds[-1].setdefault(key, {})[name] = value

    def forward(
        self, p: Proxy, conc: int, seconds: float = 0, count: int = 10_000_000
    ) -> dict[str, Any]:
        """One ab run; adds the proxy's CPU ms (and Redis's share) per request."""
        self._n += 1
        csv = self.tmp / f"ab{self._n}.csv"
        before = sample(p)
        done = run(ab_cmd(p, self.origin, conc, seconds, count, csv), timeout=seconds + 600)
        res = parse_ab(done.stdout + done.stderr, csv)
        p.requests += res["requests"]
        if res["requests"]:
            res |= costs(before, sample(p), res["requests"])
        if res.get("failed") or res.get("error"):
            self.notes.append(
                f"{p.key} c{conc}: {res.get('error') or str(res['failed']) + ' failed'}"
            )
        return res

    def nodes_forward(self, nodes: list[Proxy], seconds: float) -> dict[str, Any]:
        """c50 split evenly over *nodes* (one ab per node, at once): the requests/s they
        served together, and what each node, PostgreSQL, Redis and the clients spent."""
        ns = self.nodes
        assert ns is not None
        conc = C50 // len(nodes)
        batches0 = ledger_stats(ns)
        cpu0 = [p.cpu() for p in nodes]
        pg0, redis0 = ns.pg.cpu(), cpu_seconds(ns.redis_pid)
        cmds0, box0, clients0 = redis_commands(ns.redis_port), box_jiffies(), children_cpu()
        t0 = time.monotonic()
        running = []
        for p in nodes:
            self._n += 1
            csv = self.tmp / f"ab{self._n}.csv"
            cmd = ab_cmd(p, self.origin, conc, seconds, 10_000_000, csv)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=clean_env(), cwd=REPO)  # fmt: skip
            running.append((p, csv, proc))
        got = []
        for p, csv, proc in running:
            out, _ = proc.communicate(timeout=seconds + 600)
            res = parse_ab(out, csv)
            p.requests += res["requests"]
            got.append(res)
        wall = time.monotonic() - t0
        cpu = [p.cpu() - c for p, c in zip(nodes, cpu0, strict=True)]
        pg, redis = ns.pg.cpu() - pg0, cpu_seconds(ns.redis_pid) - redis0
        cmds, box, clients = redis_commands(ns.redis_port), box_jiffies(), children_cpu()
        batches = ledger_stats(ns) - batches0
        n = sum(r["requests"] for r in got)
        for p, r in zip(nodes, got, strict=True):
            if r.get("failed") or r.get("error"):
                self.notes.append(f"{p.key} c{conc}: {r.get('error') or r['failed']} failed")
        if not n:
            return {"rps": None}
        idle, every = box[0] - box0[0], box[1] - box0[1]
        res = {
            "rps": sum(r.get("rps", 0) for r in got),
            "p50": max(r.get("p50", 0) for r in got),
            "p99": max(r.get("p99", 0) for r in got),
            "gateway_cpu_ms": sum(cpu) / n * 1000,
            "pg_cpu_ms": pg / n * 1000,
            "pg_cpu_pct": pg / wall * 100,
            "redis_cpu_ms": redis / n * 1000,
            "redis_cpu_pct": redis / wall * 100,
            "redis_cmds": (cmds - cmds0 - 1) / n,  # less the INFO that took the first count
            "client_cpu_ms": (clients - clients0) / n * 1000,
            "box_idle_pct": idle / every * 100 if every else None,
            "batches_s": batches / wall,
            "per_batch": n / batches if batches else None,
        }
        for i, c in enumerate(cpu):
            res[f"node{i}_cpu_pct"] = c / wall * 100
        return res

    def nodes_round(self, n: int) -> None:
        """One node alone, then both (or the other way round on even rounds)."""
        a, b = self.proxies["node_a"], self.proxies["node_b"]
        runs = [("one_node", [a]), ("two_nodes", [a, b])]
        for key, nodes in runs if n % 2 else runs[::-1]:
            r = self.nodes_forward(nodes, self.args.seconds)
            for k, v in r.items():
                self.put(key, k, v)
            log(
                f"round {n}: {key:<9} c50 {r.get('rps') or 0:8.0f} req/s  "
                f"p99 {r.get('p99', 0):6.2f} ms  gateway {r.get('gateway_cpu_ms', 0):.3f} ms/req  "
                f"postgres {r.get('pg_cpu_pct', 0):.0f} %  redis {r.get('redis_cmds', 0):.1f}"
                f" cmds/req  idle {r.get('box_idle_pct') or 0:.0f} %"
            )

    def tunnels(self, p: Proxy, count: int) -> dict[str, Any]:
        """CONNECT+TLS+GET+close, *count* of them, 50 at once (the ``_tunnels`` client)."""
        cmd = [sys.executable, __file__, "_tunnels", str(p.port), str(self.origin.https),
               str(self.origin.ca), str(count), b64(p.creds) if p.creds else ""]  # fmt: skip
        before = sample(p)
        done = run(cmd, timeout=300)
        try:
            res = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            res = {"ok": 0, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        if res["ok"]:
            res |= costs(before, sample(p), res["ok"])
        if res.get("error"):
            self.notes.append(f"{p.key} tunnels: {res['error']}")
        return res

    def download(self, p: Proxy) -> dict[str, Any]:
        """The 100 MB file over HTTPS through one tunnel with curl: MB/s (10^6 B/s)."""
        cmd = ["curl", "-sS", "-o", "/dev/null", "--max-time", "120", "--noproxy", "",
               "--cacert", str(self.origin.ca), "-x", f"http://{HOST}:{p.port}",
               "-w", "%{http_code} %{speed_download} %{size_download}"]  # fmt: skip
        if p.creds:
            cmd += ["--proxy-user", f"{p.creds[0]}:{p.creds[1]}"]
        before = p.cpu()
        done = run([*cmd, f"https://{HOST}:{self.origin.https}/100m"], timeout=150)
        cpu = p.cpu() - before
        code, speed, size = ([*done.stdout.split(), "", "", ""])[:3]
        if code != "200" or size != str(LARGE_BYTES):
            self.notes.append(f"{p.key} download: HTTP {code}, {size} bytes {done.stderr.strip()}")
            return {}
        return {"mbps": float(speed) / 1e6, "cpu_s": cpu}

    def round(self) -> None:
        """One round: each figure for every proxy back to back, the order reversed each round.

        The proxies in :data:`FULL` run every figure at c1 and c50 and the tunnels; the
        gateway without metering and the 10,000-account gateway run at c50 only, among the
        others' c50 runs whichever way the round goes; the 100 MB download is bare's and
        the gateway's only.
        """
        self.rounds.append({})
        n = len(self.rounds)
        order = [self.proxies[k] for k in (*FULL, *C50_ONLY) if k in self.proxies]
        if n % 2 == 0:
            order.reverse()
        full = [p for p in order if p.key in FULL]
        pair = [p for p in order if p.key in ("bare", "datorus")]
        for conc in (1, C50):
            for p in full if conc == 1 else order:
                r = self.forward(p, conc, self.args.seconds)
                for k in ("rps", "p50", "p99", "cpu_ms", "box_idle_pct", "client_cpu_ms",
                          "redis_cpu_ms", "redis_cmds"):  # fmt: skip
                    if k in r or not k.startswith("redis"):
                        self.put(p.key, f"c{conc}_{k}", r.get(k))
                log(
                    f"round {n}: {p.key:<8} c{conc:<2} {r.get('rps', 0):8.0f} req/s  "
                    f"p50 {r.get('p50', 0):6.2f} ms  p99 {r.get('p99', 0):6.2f} ms  "
                    f"cpu {r.get('cpu_ms', 0):.3f} ms/req  idle {r.get('box_idle_pct', 0):.0f} %"
                    + (f"  redis {r['redis_cmds']:.1f} cmds/req" if "redis_cmds" in r else "")
                )
        for p in full:
            t = self.tunnels(p, self.args.tunnels)
            self.put(p.key, "tunnels_s", t.get("rate"))
            self.put(p.key, "tunnel_cpu_ms", t.get("cpu_ms"))
            for k in ("redis_cpu_ms", "redis_cmds", "box_idle_pct", "client_cpu_ms"):
                if k in t:
                    self.put(p.key, f"tunnel_{k}", t[k])
            log(
                f"round {n}: {p.key:<8} tunnels {t.get('rate') or 0:8.0f} /s  "
                f"cpu {t.get('cpu_ms') or 0:.2f} ms/tunnel  idle {t.get('box_idle_pct', 0):.0f} %"
                f"  client {t.get('client_cpu_ms', 0):.2f} ms/tunnel"
            )
        if self.nodes is not None:
            self.nodes_round(n)
        for p in pair:
            d = self.download(p)
            self.put(p.key, "mbps", d.get("mbps"))
            self.put(p.key, "download_cpu_s", d.get("cpu_s"))
            log(f"round {n}: {p.key:<8} 100 MB  {d.get('mbps') or 0:8.0f} MB/s")

    def fill_rss(self, targets: tuple[int, int]) -> None:
        """Forward requests (c50) until each proxy has served a target; read its RSS there.

        Bare mitmdump, the reference, goes to the first target only (its RSS is known to
        stay flat, and it is the slower of the two): the gateway alone goes on to the
        second. Up to the first target both are filled at once, by two ab processes.
        """
        lo, hi = targets
        for target, proxies in ((lo, ("bare", "datorus")), (hi, ("datorus",))):
            running = []
            for p in (self.proxies[k] for k in proxies):
                left = target - p.requests
                if left > 0:
                    self._n += 1
                    cmd = ab_cmd(p, self.origin, C50, 0, left, self.tmp / f"ab{self._n}.csv")
                    out = subprocess.DEVNULL
                    running.append((p, left, subprocess.Popen(cmd, stdout=out, stderr=out)))
            for p, left, proc in running:
                proc.wait(900)
                p.requests += left
            for p in (self.proxies[k] for k in proxies):
                p.rss[target] = rss_mb(p.pid)
                log(f"RSS {p.key:<8} {p.rss[target] or 0:6.1f} MiB after {p.requests:,} requests")


# -- scale, ledger rate, profile ---------------------------------------------------------


def rate_ledger(db: Path, receipts: int = 0, pg: PgCluster | None = None) -> str:
    """A copy of the SQLite ledger *db* to measure the writer on: a SQLite file beside it,
    or (with *pg*) a new database of that cluster filled by ``datorus ledger copy``'s
    code. With *receipts*, the copy first gets that many old receipts: a ledger that has
    been running for a while."""
    from datorus_core.envelope import new_request_id
    from datorus_core.ledger import open_ledger, usage

    if pg is None:
        target = str(db.with_name(f"rate{receipts}.db"))
        copy_db(db, Path(target))
    else:
        from datorus_core.ledger.copy import copy_ledger

        target = pg.createdb(f"rate{receipts}")
        copy_ledger(str(db), target)
    if receipts:
        old = "2026-01-01T00:00:00Z"
        d = open_ledger(target)
        usage.insert_receipts(
            d,
            (
                (new_request_id(), 1, 1, "GET", "example.com", 80, 200, 100, 1000, 0, 0, old, old)
                for _ in range(receipts)
            ),
        )
        d.close()
    return target


def ledger_write_rate(
    target: str, seconds: float, receipts: int = 0, server: PgCluster | None = None
) -> dict[str, Any]:
    """Usage events/s the gateway's ledger writer sustains on the ledger *target* (a
    SQLite path or a PostgreSQL URL: a :func:`rate_ledger` copy, written to).

    Events are built by ``Runtime.settle`` as the metering addon builds them (one
    settled forward request with its receipt and the gateway's request id, spread over every
    account of the ledger) and written with ``LedgerLink.write`` in batches of
    ``flush_events`` (2,000); the rate counts the time spent writing only, and so do
    the CPU figures: this process's (the writer and, on SQLite, its thread) and the
    *server*'s when there is one, per event.
    """

    from datorus_core.envelope import new_request_id
    from datorus_core.ledger.gateway import LedgerLink
    from datorus_core.runtime import Runtime
    from datorus_core.settings import resolve_defaults

    async def go() -> dict[str, Any]:
        link = LedgerLink(target)
        await link.open()
        settings = resolve_defaults()
        rt = Runtime(settings)
        rt.apply_snapshot(*(await link.snapshot()))
        creds = list(rt.by_username.values())
        per = settings["flush_events"]
        events, writing, t0 = 0, 0.0, time.perf_counter()
        mine, theirs = 0.0, 0.0
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        while time.perf_counter() - t0 < seconds:
            for _ in range(per):
                cred = random.choice(creds)
                receipt = (new_request_id(), cred.account.id, cred.id, "GET", "127.0.0.1", 80,
                           200, 120, 1200, 0, 0, stamp, stamp)  # fmt: skip
                rt.settle(cred, 120, 1200, 0)
                rt.settle(cred, 0, 0, 0, requests=1, receipt=receipt)
            batch = rt.take_batch()
            w0, c0, s0 = time.perf_counter(), own_cpu(), server.cpu() if server else 0.0
            await link.write(batch)
            writing += time.perf_counter() - w0
            mine += own_cpu() - c0
            theirs += (server.cpu() - s0) if server else 0.0
            events += per
        await link.close()
        return {
            "events_per_s": events / writing,
            "batch": per,
            "accounts": len(rt.accounts),
            "receipts_before": receipts,
            "client_us_per_event": mine / events * 1e6,
            "server_us_per_event": theirs / events * 1e6 if server else None,
        }

    return asyncio.run(go())


def profile(bench: Bench, seconds: float) -> dict[str, Any]:
    """py-spy samples of the gateway under a c50 forward load: the share of each addon.

    A sample is charged to the innermost Datorus addon file on its stack
    (``addons/metering.py`` etc.); the rest is mitmproxy, asyncio and the protocol.
    """
    spy = tool("py-spy")
    if not spy:
        bench.notes.append("profile skipped: py-spy is not installed (pip install py-spy)")
        return {}
    p = bench.proxies["datorus"]
    out = bench.tmp / "profile.txt"
    cmd = [spy, "record", "--format", "raw", "-r", "250", "-d", str(int(seconds) + 1),
           "--nonblocking", "-o", str(out), "--pid", str(p.pid)]  # fmt: skip
    rec = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # py-spy attaching; the load below runs past its end either way
    load = bench.forward(p, C50, seconds)
    rec.wait(60)
    if not out.exists():
        bench.notes.append("profile skipped: py-spy could not attach (ptrace not permitted?)")
        return {}
    by_addon: collections.Counter[str] = collections.Counter()
    by_func: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or "<module>" in stack.split(";")[-1]:
            continue
        total += int(n)
        frames = stack.split(";")
        by_addon[attribute(frames)] += int(n)
        by_func[frames[-1]] += int(n)
    if not total:
        return {}
    cpu_ms = load.get("cpu_ms") or 0
    shares = {k: round(v / total * 100, 1) for k, v in by_addon.most_common()}
    return {
        "samples": total,
        "cpu_ms_per_req": cpu_ms,
        "share_pct": shares,
        "ms_per_req": {k: round(v / 100 * cpu_ms, 4) for k, v in shares.items()},
        "top_self": [(f, round(n / total * 100, 1)) for f, n in by_func.most_common(15)],
    }


# hardening's and errors' wrappers of mitmproxy's HTTP/1 head reader and sender (written
# in patches.py): what runs below them is mitmproxy's parsing, not the wrapper's check
_WRAPPER = re.compile(
    r"(^|[.>])(read_headers|send|send_error) \(.*addons/(hardening|errors|patches)\.py"
)
# lean's cached dispatch (patches.py's LeanDispatch)
_LEAN = re.compile(r"(^|[.>])(LeanDispatch\.\w+|trigger_event|handle_lifecycle) \(.*addons/patches")


def attribute(frames: list[str]) -> str:
    """The Datorus addon file a sample belongs to: the innermost one on its stack.

    ``lean`` calls every hook, mitmproxy's own included: a sample below it in a
    mitmproxy addon is mitmproxy's; only lean's own frames count as dispatch. The same
    holds below the head reader/sender wrappers of ``hardening`` and ``errors``. Socket
    I/O that merely passes through an addon (the metered stream wrappers) is not the
    addon's either.
    """
    rest = "(mitmproxy, asyncio, protocol)"
    if any("aiosqlite/" in f for f in frames):
        return "ledger I/O thread (aiosqlite)"
    for i in range(len(frames) - 1, -1, -1):
        m = re.search(r"[(/]addons/(\w+)\.py", frames[i])
        if m and "mitmproxy/" not in frames[i]:
            if m.group(1) == "lean" or _LEAN.search(frames[i]):
                return rest if any("mitmproxy/" in f for f in frames[i + 1 :]) else "lean dispatch"
            if _WRAPPER.search(frames[i]) and any("mitmproxy/" in f for f in frames[i + 1 :]):
                return rest  # mitmproxy's HTTP/1 parsing inside hardening's/errors' wrappers
            if i + 1 < len(frames) and "asyncio/" in frames[i + 1]:
                return rest  # socket I/O passing through (the metered reader and writer)
            return m.group(1)
    return rest


def sticky_sessions_figure(bench: Bench) -> dict[str, Any] | None:
    """Memory and lookup cost of 100,000 live sticky sessions (scripts/bench_sessions.py).

    The session table is a dict plus an LRU order, O(1) per request whatever its size,
    so the table itself is measured (tracemalloc, ids included) rather than a gateway
    fed 100,000 session ids, which alone would take minutes here.
    """
    script = REPO / "scripts" / "bench_sessions.py"
    try:
        out = subprocess.run(
            [sys.executable, str(script), "100000"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        r = json.loads(out)
    except (subprocess.SubprocessError, ValueError, OSError) as e:
        log(f"sticky sessions figure failed: {e}")
        return None
    return r


# -- the report --------------------------------------------------------------------------


ROWS = [  # label, figure, digits, compare ("ratio" or "diff"), target text, pass test
    ("forward req/s, c1", "c1_rps", 0, "ratio", ">= 1.0", lambda r: r >= 1.0),
    ("forward req/s, c50", "c50_rps", 0, "ratio", ">= 1.0", lambda r: r >= 1.0),
    ("forward p50 ms, c1", "c1_p50", 2, "diff", "", None),
    ("forward p99 ms, c1", "c1_p99", 2, "diff", "<= +1 ms", lambda d: d <= 1.0),
    ("forward p50 ms, c50", "c50_p50", 2, "diff", "", None),
    ("forward p99 ms, c50", "c50_p99", 2, "diff", "", None),
    ("CPU ms/request, c50", "c50_cpu_ms", 3, "ratio", "", None),
    ("CONNECT+TLS+GET tunnels/s, c50", "tunnels_s", 0, "ratio", ">= 1.0", lambda r: r >= 1.0),
    ("CPU ms/tunnel", "tunnel_cpu_ms", 2, "ratio", "", None),
    ("MB/s, 100 MB through one tunnel", "mbps", 0, "ratio", ">= 0.95", lambda r: r >= 0.95),
    ("CPU s per 100 MB tunnel", "download_cpu_s", 2, "ratio", "", None),
]


BASELINE_ROWS = [  # current against --baseline: the ratio current/baseline
    ("forward req/s, c50", "c50_rps", 0, "ratio", ">= 1.0", lambda r: r >= 1.0),
    ("CONNECT+TLS+GET tunnels/s, c50", "tunnels_s", 0, "ratio", ">= 1.0", lambda r: r >= 1.0),
    ("forward p99 ms, c1", "c1_p99", 2, "ratio", "<= 1.0", lambda r: r <= 1.0),
    ("forward req/s, c1", "c1_rps", 0, "ratio", "", None),
    ("CPU ms/request, c1", "c1_cpu_ms", 3, "ratio", "", None),
    ("CPU ms/request, c50", "c50_cpu_ms", 3, "ratio", "", None),
    ("CPU ms/tunnel", "tunnel_cpu_ms", 2, "ratio", "", None),
]
WORKER_ROWS = [  # --workers-compare: issue 15's targets, workers against one worker
    ("forward req/s, c50", "c50_rps", 0, "ratio", ">= 1.7", lambda r: r >= 1.7),
    ("CONNECT+TLS+GET tunnels/s, c50", "tunnels_s", 0, "ratio", ">= 1.7", lambda r: r >= 1.7),
    ("CPU ms/forward request, c50", "c50_cpu_ms", 3, "ratio", "<= 1.15", lambda r: r <= 1.15),
    ("forward p99 ms, c1", "c1_p99", 2, "diff", "<= +1 ms", lambda d: d <= 1.0),
    ("forward p50 ms, c1", "c1_p50", 2, "diff", "", None),
    ("forward req/s, c1", "c1_rps", 0, "ratio", "", None),
    ("CPU ms/forward request, c1", "c1_cpu_ms", 3, "ratio", "", None),
    ("CPU ms/tunnel", "tunnel_cpu_ms", 2, "ratio", "", None),
]


NODE_ROWS = [  # --ledger-compare: two nodes against one (issue 16's target), same rounds
    ("forward req/s, c50 (two: c25 + c25)", "rps", 0, "ratio", ">= 1.6", lambda r: r >= 1.6),
    ("forward p50 ms, c50", "p50", 2, "diff", "", None),
    ("forward p99 ms, c50", "p99", 2, "diff", "", None),
    ("gateway CPU ms/request (all nodes)", "gateway_cpu_ms", 3, "ratio", "", None),
    ("node A CPU, % of a core", "node0_cpu_pct", 0, "diff", "", None),
    ("node B CPU, % of a core", "node1_cpu_pct", 0, "diff", "", None),
    ("PostgreSQL CPU, % of a core", "pg_cpu_pct", 1, "diff", "", None),
    ("PostgreSQL CPU ms/request", "pg_cpu_ms", 4, "ratio", "", None),
    ("Redis CPU, % of a core", "redis_cpu_pct", 1, "diff", "", None),
    ("Redis CPU ms/request", "redis_cpu_ms", 4, "ratio", "", None),
    ("Redis commands/request", "redis_cmds", 1, "ratio", "", None),
    ("ledger write transactions/s", "batches_s", 1, "ratio", "", None),
    ("requests per usage batch", "per_batch", 0, "ratio", "", None),
    ("ab CPU ms/request", "client_cpu_ms", 3, "ratio", "", None),
    ("cores idle, %", "box_idle_pct", 0, "diff", "", None),
]


def med(values: list[Any]) -> float | None:
    """The median of the values that are numbers."""
    got = [v for v in values if isinstance(v, int | float)]
    return statistics.median(got) if got else None


def per_round(
    rounds: list[dict[str, dict[str, Any]]], a: str, b: str, key: str, how: str = "ratio"
) -> list[float]:
    """Figure *key* of proxy *a* against proxy *b* in every round that has both.

    ``a / b`` (``how="ratio"``) or ``a - b`` (``"diff"``), measured in the same round:

    >>> rounds = [{"x": {"k": 3.0}, "y": {"k": 2}}, {"x": {"k": 1}}, {"x": {"k": 4}, "y": {"k": 0}}]
    >>> per_round(rounds, "x", "y", "k"), per_round(rounds, "x", "y", "k", "diff")
    ([1.5], [1.0, 4])
    """
    out = []
    for r in rounds:
        x, y = r.get(a, {}).get(key), r.get(b, {}).get(key)
        if isinstance(x, int | float) and isinstance(y, int | float) and (how == "diff" or y):
            out.append(x - y if how == "diff" else x / y)
    return out


def shown(v: float | None, how: str) -> str:
    """A comparison for the table: ``1.23x``, ``+0.40 ms``, ``+3.5 pts`` or ``-``."""
    if v is None:
        return "-"
    return {"diff": f"{v:+.2f} ms", "pts": f"{v:+.1f} pts"}.get(how, f"{v:.2f}x")


def mark(ok: Any, v: float | None) -> str:
    """PASS or MISS against a target test (blank without one)."""
    return "" if ok is None or v is None else ("PASS" if ok(v) else "MISS")


def summarize(bench: Bench) -> tuple[list[list[str]], dict[str, Any]]:
    """Table rows and the summary for JSON: median over rounds, ratio within each round."""
    rows, summary = [], {}
    for label, key, digits, how, target, ok in ROWS:
        bare = med([r["bare"].get(key) for r in bench.rounds])
        gw = med([r["datorus"].get(key) for r in bench.rounds])
        cmp_ = med(per_round(bench.rounds, "datorus", "bare", key, how))
        m = mark(ok, cmp_)
        rows.append([label, num(bare, digits), num(gw, digits), shown(cmp_, how), target, m])
        summary[key] = {"bare": bare, "datorus": gw, how: cmp_, "target": target, "mark": m}
    b, g = bench.proxies["bare"], bench.proxies["datorus"]
    lo, hi = bench.args.rss_at
    for n in (lo, hi):
        rows.append([f"RSS MiB after {n:,} requests", num(b.rss.get(n), 1), num(g.rss.get(n), 1)])
        rows[-1] += ["", "", ""]
    if g.rss.get(lo) and g.rss.get(hi):
        growth = g.rss[hi] - g.rss[lo]
        rows.append(
            [
                f"RSS growth {lo:,} -> {hi:,}",
                "-",
                num(growth, 1),
                "",
                "flat (< 5 MiB)",
                "PASS" if growth < 5 else "MISS",
            ]
        )
    summary["rss_mib"] = {"bare": b.rss, "datorus": g.rss}
    return rows, summary


def baseline_table(bench: Bench) -> tuple[list[list[str]], dict[str, Any]]:
    """Current against ``--baseline``: medians, the median of per-round ratios, each round's."""
    rows, summary = [], {}
    for label, key, digits, how, target, ok in BASELINE_ROWS:
        base = med([r["baseline"].get(key) for r in bench.rounds])
        cur = med([r["datorus"].get(key) for r in bench.rounds])
        each = per_round(bench.rounds, "datorus", "baseline", key, how)
        cmp_ = med(each)
        m = mark(ok, cmp_)
        spread = " ".join(f"{v:.2f}" for v in each)
        rows.append([label, num(base, digits), num(cur, digits), shown(cmp_, how), spread,
                     target, m])  # fmt: skip
        summary[key] = {"baseline": base, "current": cur, how: cmp_, "rounds": each,
                        "target": target, "mark": m}  # fmt: skip
    return rows, summary


def workers_table(bench: Bench) -> tuple[list[list[str]], dict[str, Any]]:
    """Workers+Redis against one worker (issue 15's targets), bare mitmdump and proxy.py."""
    rows, summary = [], {}
    have = bench.proxies
    for label, key, digits, how, target, ok in WORKER_ROWS:
        fig = {k: med([r.get(k, {}).get(key) for r in bench.rounds]) for k in FULL if k in have}
        vs = {
            other: med(per_round(bench.rounds, a, other, key, how))
            for a, other in (("workers", "datorus"), ("workers", "bare"), ("workers", "proxypy"))
        }
        one_ppy = med(per_round(bench.rounds, "datorus", "proxypy", key, how))
        m = mark(ok, vs["datorus"])
        rows.append([label, num(fig.get("datorus"), digits), num(fig.get("workers"), digits),
                     shown(vs["datorus"], how), target, m, num(fig.get("bare"), digits),
                     num(fig.get("proxypy"), digits), shown(vs["bare"], how),
                     shown(vs["proxypy"], how), shown(one_ppy, how)])  # fmt: skip
        summary[key] = {**fig, "workers_vs_one": vs["datorus"], "workers_vs_bare": vs["bare"],
                        "workers_vs_proxypy": vs["proxypy"], "one_vs_proxypy": one_ppy,
                        "how": how, "target": target, "mark": m}  # fmt: skip
    return rows, summary


def nodes_table(bench: Bench) -> tuple[list[list[str]], dict[str, Any]]:
    """Two nodes against one: medians, the median of per-round comparisons, each round's."""
    rows, summary = [], {}
    for label, key, digits, how, target, ok in NODE_ROWS:
        one = med([r.get("one_node", {}).get(key) for r in bench.rounds])
        two = med([r.get("two_nodes", {}).get(key) for r in bench.rounds])
        each = per_round(bench.rounds, "two_nodes", "one_node", key, how)
        cmp_ = med(each)
        how = "pts" if key.endswith("_pct") else how
        m = mark(ok, cmp_)
        spread = " ".join(f"{v:.2f}" for v in each) if how == "ratio" else ""
        rows.append([label, num(one, digits), num(two, digits), shown(cmp_, how), spread,
                     target, m])  # fmt: skip
        summary[key] = {"one": one, "two": two, how: cmp_, "rounds": each, "target": target,
                        "mark": m}  # fmt: skip
    return rows, summary


def redis_costs(bench: Bench) -> dict[str, float | None]:
    """What the shared state costs per request and tunnel: Redis commands and Redis CPU."""
    rounds, out = bench.rounds, {}
    for key in ("c1_redis_cmds", "c50_redis_cmds", "c50_redis_cpu_ms", "tunnel_redis_cmds",
                "tunnel_redis_cpu_ms", "c50_cpu_ms", "c50_rps"):  # fmt: skip
        out[key] = med([r.get("workers", {}).get(key) for r in rounds])
    cpu = out["c50_redis_cpu_ms"]
    # one Redis core's ceiling (meaningless while Redis only runs its own timers)
    out["redis_core_rps"] = 1000 / cpu if cpu and out["c50_redis_cmds"] else None
    return out


def metering_cost(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, float | None]:
    """The gateway with Metering against the same gateway without it, round by round.

    CPU per request is the steadier figure on a shared box: throughput also moves with
    whatever else runs, CPU time per request much less.
    """

    def ratio(key: str) -> float | None:
        pairs = [(r["datorus"].get(key), r["nometer"].get(key)) for r in rounds]
        return med([on / off for on, off in pairs if on and off])

    return {
        "cpu_ratio": ratio("c50_cpu_ms"),
        "rps_ratio": ratio("c50_rps"),
        "on_cpu_ms": med([r["datorus"].get("c50_cpu_ms") for r in rounds]),
        "off_cpu_ms": med([r["nometer"].get("c50_cpu_ms") for r in rounds]),
    }


def pct(ratio: float | None) -> str:
    """A ratio as a signed percentage change ('-' when missing)."""
    return "-" if ratio is None else f"{(ratio - 1) * 100:+.1f} %"


def num(v: float | None, digits: int) -> str:
    """A number for the table ('-' when missing)."""
    return "-" if v is None else f"{v:,.{digits}f}"


def render(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [header, *rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join(
        [line(header), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, rows)]
    )


def report(bench: Bench, meta: dict[str, Any]) -> dict[str, Any]:
    """Print everything; return the JSON document."""
    rows, summary = summarize(bench)
    print()
    header = ["figure (median of rounds)", "bare mitmdump", "datorus", "ratio", "target", ""]
    print(render(rows, header))
    print()
    rounds = bench.rounds
    x = bench.extra
    if "baseline" in bench.proxies:
        rows, x["baseline"] = baseline_table(bench)
        sha = bench.args.baseline_sha or "(metrics off)"
        print(f"against the baseline {bench.args.baseline_label}, same rounds:")
        print(render(rows, ["figure (median of rounds)", f"baseline {sha}", "current",
                            "current/baseline", "each round", "target", ""]))  # fmt: skip
        print()
    if "workers" in bench.proxies:
        n = bench.args.workers
        rows, x["workers"] = workers_table(bench)
        rc = x["redis_costs"] = redis_costs(bench)
        state = "its hot state in Redis" if rc["c50_redis_cmds"] else "a Redis URL Redis never saw"
        print(f"datorus serve --workers {n} with {state}, against one worker, same rounds:")
        print(render(rows, ["figure (median of rounds)", "1 worker", f"{n} workers", "ratio",
                            "target", "", "bare mitmdump", "proxy.py", f"{n}w/bare",
                            f"{n}w/proxy.py", "1w/proxy.py"]))  # fmt: skip
        fig = lambda k, key: med([r.get(k, {}).get(key) for r in rounds])  # noqa: E731
        idle = {k: fig(k, "c50_box_idle_pct") for k in FULL}
        t_idle = {k: fig(k, "tunnel_box_idle_pct") for k in FULL}
        ab, tc = fig("datorus", "c50_client_cpu_ms"), fig("datorus", "tunnel_client_cpu_ms")
        x["box"] = {"c50_idle_pct": idle, "tunnel_idle_pct": t_idle, "ab_cpu_ms_per_req": ab,
                    "tunnel_client_cpu_ms": tc}  # fmt: skip
        for what, d in (("c50 forward runs", idle), ("tunnel runs", t_idle)):
            print(
                f"box: cores idle during the {what}: one worker {num(d['datorus'], 0)} %,"
                f" {n} workers {num(d['workers'], 0)} %, bare {num(d['bare'], 0)} %, proxy.py"
                f" {num(d.get('proxypy'), 0)} %"
            )
        print(
            f"clients: ab {num(ab, 3)} CPU ms/request, the tunnel client {num(tc, 2)} CPU"
            " ms/tunnel (they share the cores with the proxies)"
        )
        if not rc["c50_redis_cmds"]:
            bench.notes.append(
                "Redis processed no command during the workers' runs: on this tree the"
                " workers keep their hot state in process (the Redis state is not here yet)"
            )
        print(
            f"redis: {num(rc['c50_redis_cmds'], 1)} commands per forward request at c50"
            f" ({num(rc['c1_redis_cmds'], 1)} at c1), {num(rc['tunnel_redis_cmds'], 1)} per"
            f" tunnel; Redis CPU {num(rc['c50_redis_cpu_ms'], 4)} ms per forward request"
            f" (of {num(rc['c50_cpu_ms'], 3)} in all), {num(rc['tunnel_redis_cpu_ms'], 4)} ms"
            f" per tunnel: one Redis core would saturate near {num(rc['redis_core_rps'], 0)}"
            " forward req/s"
        )
        print()
    if bench.nodes is not None:
        rows, x["nodes"] = nodes_table(bench)
        print(
            "two gateway nodes (two mitmdump on two ports, one PostgreSQL ledger, one Redis,"
            " datorus_redis_url on both) against node A alone, same rounds:"
        )
        print(render(rows, ["figure (median of rounds)", "one node", "two nodes", "two/one",
                            "each round", "target", ""]))  # fmt: skip
        print()
    if "scale" in bench.proxies:
        gw_rps = med([r["datorus"].get("c50_rps") for r in rounds])
        sc_rps = med([r["scale"].get("c50_rps") for r in rounds])
        gw_cpu = med([r["datorus"].get("c50_cpu_ms") for r in rounds])
        sc_cpu = med([r["scale"].get("c50_cpu_ms") for r in rounds])
        x["scale_10k"] = {
            "accounts": bench.args.accounts,
            "c50_rps": sc_rps,
            "c50_cpu_ms": sc_cpu,
            "ratio_to_1_account": sc_rps / gw_rps if sc_rps and gw_rps else None,
        }
        print(
            f"scale: {bench.args.accounts:,} accounts+credentials in the ledger: {num(sc_rps, 0)}"
            f" req/s c50, {num(sc_cpu, 3)} CPU ms/req (1 account: {num(gw_rps, 0)} req/s,"
            f" {num(gw_cpu, 3)} ms/req)"
        )
    if "nometer" in bench.proxies:
        x["metering"] = metering_cost(rounds)
        m = x["metering"]
        print(
            f"metering: CPU per request {pct(m['cpu_ratio'])} and throughput {pct(m['rps_ratio'])}"
            f" against the same gateway without Metering (c50, median of per-round ratios;"
            f" {num(m['off_cpu_ms'], 3)} -> {num(m['on_cpu_ms'], 3)} CPU ms/req)"
        )
    st = x.get("sticky_100k")
    if st:
        print(
            f"scale: 100,000 live sticky sessions take {st['mb_total']} MB"
            f" ({st['bytes_per_session']} B each, ids included); a lookup {st['get_us']} us,"
            f" a weighted pick among 1,000 egress {st['pick_us_1000_egress']} us"
        )
    else:
        print("scale: 100,000 live sticky sessions: not measured (see the log)")
    if "ledger" in x:
        lr, aged = x["ledger"], x["ledger_aged"]
        print(
            f"ledger: the usage writer sustains {lr['events_per_s']:,.0f} events/s (batches of"
            f" {lr['batch']:,} with a receipt each, over {lr['accounts']:,} accounts);"
            f" {aged['events_per_s']:,.0f} events/s with {aged['receipts_before']:,} receipts"
            " already written"
        )
    if "ledger_pg" in x:
        pg, aged = x["ledger_pg"], x["ledger_pg_aged"]
        ok = "PASS" if pg["events_per_s"] >= 10_000 else "MISS"
        print(
            f"ledger: on PostgreSQL (fsync on) the same writer sustains"
            f" {pg['events_per_s']:,.0f} events/s (target >= 10,000: {ok}),"
            f" {aged['events_per_s']:,.0f} with {aged['receipts_before']:,} receipts already"
            f" written; 'datorus ledger copy' moved that ledger ({pg['accounts']:,} accounts)"
            f" there in {pg['copy_s']:.1f} s"
        )
        print(
            f"ledger: CPU per usage event written: on PostgreSQL the writer"
            f" {pg['client_us_per_event']:.1f} us and the server {pg['server_us_per_event']:.1f}"
            f" us; on SQLite {x['ledger']['client_us_per_event']:.1f} us in all (in-process)"
        )
    if x.get("profile"):
        pr = x["profile"]
        print(
            f"profile: gateway at c50, {pr['samples']:,} py-spy samples, "
            f"{pr['cpu_ms_per_req']:.3f} CPU ms/req; share of CPU by addon file:"
        )
        for k, v in pr["share_pct"].items():
            print(f"    {k:<32} {v:5.1f} %   ~{pr['ms_per_req'][k]:.4f} ms/req")
    print()
    for k, v in meta.items():
        print(f"{k:>10}: {v}")
    for n in dict.fromkeys(bench.notes):
        print(f"      note: {n}")
    return {"meta": meta, "summary": summary, "extra": x, "rounds": rounds, "notes": bench.notes}


# -- orchestration -----------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run (about a minute)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    ap.add_argument("--seconds", type=float, help="seconds per forward run (default 2; --quick 1)")
    ap.add_argument("--tunnels", type=int, help="tunnels per run (default 200; --quick 60)")
    ap.add_argument(
        "--accounts", type=int, help="accounts in the scale ledger (default 10000; 0 skips)"
    )
    ap.add_argument(
        "--no-metering-run", action="store_true", help="skip the gateway-without-metering runs"
    )
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    ap.add_argument("--python-origin", action="store_true", help="use bench_origin.py, not nginx")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get or pip")
    ap.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, profile)")
    ap.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the gateway of git commit REF (a throwaway worktree), interleaved,"
        " and print current/baseline ratios",
    )
    ap.add_argument(
        "--metrics-compare",
        action="store_true",
        help="in the baseline's place, the same gateway with metrics off (metrics_port=0),"
        " interleaved: the ratios are metrics on / metrics off",
    )
    ap.add_argument(
        "--workers-compare",
        action="store_true",
        help="also run 'datorus serve --workers N' with Redis and proxy.py 2.4 (a throwaway"
        " venv), interleaved, against the one-worker gateway",
    )
    ap.add_argument(
        "--workers", type=int, default=2, help="workers for --workers-compare (default 2)"
    )
    ap.add_argument(
        "--ledger-compare",
        action="store_true",
        help="also start a throwaway PostgreSQL (fsync on): the usage writer on SQLite and on"
        " PostgreSQL, and two gateway nodes sharing it and one Redis against one node",
    )
    ap.add_argument(
        "--sources",
        action="store_true",
        help="only the sources bench (scripts/bench_sources.py): the gateway idle against the"
        " same gateway while a 10,000-proxy source is scraped and fully checked",
    )
    a = ap.parse_args(argv)
    if a.workers < 2:
        ap.error("--workers must be at least 2 (one worker is the gateway itself)")
    if a.baseline is not None and not a.baseline.strip():
        ap.error("--baseline needs a git ref")
    if a.baseline is not None and a.metrics_compare:
        ap.error("--metrics-compare takes the baseline's place: give one or the other")
    a.baseline_sha = None
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.seconds = a.seconds or (1.0 if q else 2.0)
    a.tunnels = a.tunnels or (60 if q else 200)
    a.accounts = (2000 if q else 10_000) if a.accounts is None else a.accounts
    a.rss_at = (2_000, 10_000) if q else (20_000, 100_000)
    return a


def start_comparison(bench: Bench, db: Path, creds: tuple[str, str]) -> None:
    """``--workers-compare``: the workers with Redis and proxy.py (each skipped, saying why)."""
    args, tmp, children = bench.args, bench.tmp, bench.children
    why = serve_missing()
    if why:
        log(f"workers comparison skipped: {why}")
        bench.notes.append(f"workers comparison skipped: {why}")
        return
    w_db = tmp / "workers.db"
    copy_db(db, w_db)
    bench.proxies["workers"] = start_workers(children, tmp, w_db, creds, args.workers)
    if args.no_install:
        bench.notes.append("proxy.py skipped: --no-install (it is pip-installed per run)")
        return
    exe, version = install_proxypy(tmp)
    bench.extra["proxypy_version"] = version
    if exe is None:
        bench.notes.append(f"proxy.py skipped: {version}")
        return
    bench.proxies["proxypy"] = start_proxypy(children, tmp, exe)


def execute(args: argparse.Namespace, tmp: Path, children: Children) -> dict[str, Any]:
    """The whole run; returns the JSON document."""
    installed = ensure_tools(
        not args.no_install,
        redis=args.workers_compare or args.ledger_compare,
        postgres=args.ledger_compare,
    )
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"note: load average {load:.1f} before the run: other work shares the cores")
        bench_note = f"load average {load:.1f} at the start: figures are noisy"
    else:
        bench_note = ""
    bench = Bench(args, tmp, children)
    bench.origin = origin = start_origin(children, tmp, args.python_origin)
    if bench_note:
        bench.notes.append(bench_note)
    log(f"origin: {origin.kind} on :{origin.http} (HTTP) and :{origin.https} (HTTPS)")
    db = tmp / "bench.db"
    creds = prepare_ledger(db)
    bench.proxies["bare"] = start_proxy(children, tmp, "bare")
    bench.proxies["datorus"] = start_proxy(
        children, tmp, "datorus", "addons/datorus.py", db, creds, metrics=True
    )
    if not args.no_metering_run:
        nm_db = tmp / "nometer.db"
        copy_db(db, nm_db)
        nm_script = "scripts/bench_no_metering.py"
        bench.proxies["nometer"] = start_proxy(children, tmp, "nometer", nm_script, nm_db, creds)
    if args.metrics_compare:
        # the same tree with metrics_port 0, in the baseline's place: the ratios printed
        # are then metrics on / metrics off, interleaved round by round
        args.baseline_sha = None
        args.baseline_label = "this tree with metrics off (metrics_port=0)"
        log(f"baseline: {args.baseline_label}")
        mo_db = tmp / "metrics-off.db"
        copy_db(db, mo_db)
        bench.proxies["baseline"] = start_proxy(
            children, tmp, "baseline", "addons/datorus.py", mo_db, creds, metrics=False
        )
    elif args.baseline:
        tree, sha = add_baseline_tree(args.baseline, tmp)
        args.baseline_sha = sha
        args.baseline_label = args.baseline if args.baseline == sha else f"{args.baseline} ({sha})"
        log(f"baseline: {args.baseline_label} checked out in {tree}")
        bl_db = tmp / "baseline.db"
        bl_creds = prepare_ledger_in(tree, bl_db)
        script = "addons/datorus.py"
        bench.proxies["baseline"] = start_proxy(
            children, tmp, "baseline", script, bl_db, bl_creds, tree=tree
        )
    if args.workers_compare:
        start_comparison(bench, db, creds)
    if args.ledger_compare:
        log("ledger compare: a PostgreSQL cluster, its ledger, Redis and two gateway nodes")
        start_nodes(bench, db, creds)
    if args.accounts:  # seeded while the others start
        scale_db = tmp / "scale.db"
        copy_db(db, scale_db)
        log(f"seeding {args.accounts:,} accounts and credentials")
        seed_accounts(scale_db, args.accounts)
        scale = start_proxy(children, tmp, "scale", "addons/datorus.py", scale_db, creds)
        bench.proxies["scale"] = scale
    for p in bench.proxies.values():
        children.wait_port(p.proc, p.key, p.port, 60)
        probe(p, origin)
    for p in bench.proxies.values():  # warm-up: first-use costs stay out of round 1
        bench.forward(p, 10, count=500)
        if p.key in FULL:
            bench.tunnels(p, 20)
    log("proxies ready: " + ", ".join(f"{k} :{p.port}" for k, p in bench.proxies.items()))
    for _ in range(args.rounds):
        bench.round()
    bench.fill_rss(args.rss_at)
    if args.accounts or bench.pg is not None:
        log("ledger write rate")
        secs, old = (2.0, 50_000) if args.quick else (3.0, 300_000)
        src = tmp / "scale.db" if args.accounts else db
        x = bench.extra
        x["ledger"] = ledger_write_rate(rate_ledger(src), secs)
        if bench.pg is not None:
            log("ledger write rate on PostgreSQL")
            t0 = time.perf_counter()
            target = rate_ledger(src, pg=bench.pg)
            took = time.perf_counter() - t0  # createdb and datorus ledger copy
            x["ledger_pg"] = ledger_write_rate(target, secs, server=bench.pg) | {"copy_s": took}
        x["ledger_aged"] = ledger_write_rate(rate_ledger(src, old), secs, receipts=old)
        if bench.pg is not None:
            aged = rate_ledger(src, old, bench.pg)
            x["ledger_pg_aged"] = ledger_write_rate(aged, secs, old, bench.pg)
    bench.extra["sticky_100k"] = sticky_sessions_figure(bench)
    if not args.no_profile:
        log("profiling the gateway with py-spy")
        bench.extra["profile"] = profile(bench, 3.0 if args.quick else 4.0)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "load avg": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "mitmproxy": run([tool("mitmdump") or "mitmdump", "--version"], 30).stdout.split("\n")[0],
        "command": os.environ.get("DATORUS_BENCH_COMMAND")
        or shlex.join(["scripts/bench", *sys.argv[1:]]),
        "origin": origin.kind,
        "clients": "ab -k (forward), Python asyncio (tunnels), curl (100 MB)",
        "rounds": f"{args.rounds} x {args.seconds:g} s forward runs, {args.tunnels} tunnels/run",
        "installed": installed,
        "elapsed": f"{time.monotonic() - T0:.0f} s",
    }
    if args.baseline:
        meta["baseline"] = f"{args.baseline_label}, a throwaway worktree of its commit"
    if args.metrics_compare:
        meta["baseline"] = args.baseline_label
    if "workers" in bench.proxies:
        redis = run(["redis-server", "--version"], 30).stdout.split()
        meta["workers"] = (
            f"datorus serve --workers {args.workers}, hot state in redis-server"
            f" {(redis[2:3] or ['?'])[0].removeprefix('v=')} (no persistence); CPU = launcher +"
            " workers + Redis"
        )
    if bench.pg is not None:
        meta["postgres"] = (
            f"{bench.pg.version()}, a throwaway cluster (initdb in the temp dir), loopback TCP,"
            " fsync, synchronous_commit and full_page_writes on"
        )
    if "proxypy" in bench.proxies:
        meta["proxy.py"] = f"{bench.extra['proxypy_version']}, default workers ({os.cpu_count()})"
    return report(bench, meta)


def bench_main(argv: list[str]) -> int:
    """``scripts/bench``: run the benchmark, print the report, optionally write JSON."""
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="datorus-bench-"))
    children = Children(tmp)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if args.sources:
            import bench_sources

            doc = bench_sources.run_sources(args, tmp, children)
        else:
            doc = execute(args, tmp, children)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
            print(f"      json: {args.json}")
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping what it started", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        if (tmp / "baseline").exists():
            remove_baseline_tree(tmp / "baseline")
        if args.keep_tmp:
            print(f"  temp dir: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# -- the tunnel client (a separate process) ----------------------------------------------


async def tunnel_client(
    proxy_port: int, port: int, ca: str, count: int, auth: str
) -> dict[str, Any]:
    """COUNT x (CONNECT, TLS verified against the bench CA, GET /1k, close), 50 at once."""
    ctx = ssl.create_default_context(cafile=ca)
    target = f"{HOST}:{port}"
    connect = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    connect += (f"Proxy-Authorization: Basic {auth}\r\n" if auth else "") + "\r\n"
    get = f"GET /1k HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode()
    state: dict[str, Any] = {"ok": 0, "failed": 0, "error": None}
    sem = asyncio.Semaphore(C50)

    async def one() -> None:
        reader, writer = await asyncio.open_connection(HOST, proxy_port)
        try:
            writer.write(connect.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if head.split(b" ", 2)[1] != b"200":
                raise ValueError(head.split(b"\r\n")[0].decode(errors="replace"))
            await writer.start_tls(ctx, server_hostname=HOST)
            writer.write(get)
            body = (await reader.read()).partition(b"\r\n\r\n")[2]
            if len(body) != 1024:
                raise ValueError(f"{len(body)} body bytes")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def guarded() -> None:
        async with sem:
            try:
                await asyncio.wait_for(one(), 30)
                state["ok"] += 1
            except (
                OSError,
                ValueError,
                IndexError,
                TimeoutError,
                asyncio.IncompleteReadError,
            ) as e:
                state["failed"] += 1
                state["error"] = f"{state['failed']} failed, last: {type(e).__name__}: {e}"

    t0 = time.perf_counter()
    await asyncio.gather(*(guarded() for _ in range(count)))
    state["rate"] = state["ok"] / (time.perf_counter() - t0)
    return state


def main() -> None:
    """Dispatch: the ``_tunnels`` client, or the benchmark itself."""
    argv = sys.argv[1:]
    # the gateways it starts (often several at once) leave the SOCKS5 entry's port alone
    os.environ.setdefault("DATORUS_SOCKS5_PORT", "0")
    if argv[:1] == ["_ledger"]:  # with the baseline's tree first on sys.path
        sys.path.insert(0, argv[1])
        import datorus_core

        user, password = prepare_ledger(Path(argv[2]))
        print(json.dumps({"username": user, "password": password, "code": datorus_core.__file__}))
        return
    if argv[:1] == ["_tunnels"]:
        pp, port, ca, count, auth = argv[1:6]
        print(json.dumps(asyncio.run(tunnel_client(int(pp), int(port), ca, int(count), auth))))
        return
    sys.exit(bench_main(argv))


if __name__ == "__main__":
    main()
