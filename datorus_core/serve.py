"""``datorus serve``: N gateway workers on one port, restarted one at a time, never all.

Each worker is mitmdump loading ``addons/datorus.py`` with the operator's arguments
(``addons/serve_worker.py`` puts the shared-port patch in first). The launcher opens,
for each worker slot, a listening socket on the proxy port, the SOCKS5 entry's port
(``socks5_port``) and the REST API port, all with ``SO_REUSEPORT``
(``datorus_core.listeners``), and hands them down: the kernel balances connections over
the slots, client addresses arrive unchanged, and a slot's socket outlives its worker.

Signals (what systemd's ``KillSignal`` and ``ExecReload`` send):

- SIGTERM / SIGINT: every worker drains as a single gateway does (new requests ``503``,
  those under way get ``drain_seconds``, usage flushed); exit 0 once all are gone.
- SIGHUP: replace the workers one at a time: start the new one, wait for its ``ready``
  (listening, ledger loaded), then hand the old one off (SIGUSR1, ``addons/handoff.py``):
  it stops accepting, finishes its connections and exits. No request is refused.
- A worker that dies is restarted (its exit status logged). Workers that die before
  ever becoming ready, ``CRASH_LIMIT`` times within ``CRASH_WINDOW`` seconds, stop
  ``datorus serve`` with exit status 1 and the tail of the last one's stderr.

Exit status 2: refused to start (more than one worker without ``datorus_redis_url``,
an address in use, a bad setting).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import listeners
from .settings import BY_OPTION, REPO_ROOT, SettingsError, coerce, resolve_defaults
from .workers import (
    COUNT_ENV,
    INDEX_ENV,
    LAUNCHER_ENV,
    LISTEN_FDS_ENV,
    READY_FD_ENV,
    SECRET_ENV,
)

CRASH_LIMIT = 3  # deaths before ready...
CRASH_WINDOW = 60.0  # ...within this many seconds: give up
READY_TIMEOUT = 120.0  # a replacement that is not ready by then is given up on
STOP_GRACE = 30.0  # past drain_seconds, how long a stopping worker may take before SIGKILL
TAIL_LINES = 20
REDIS_HINT = "--set datorus_redis_url=redis://127.0.0.1:6379/0"

WORKER_SCRIPT = REPO_ROOT / "addons" / "serve_worker.py"
ADDON_SCRIPT = REPO_ROOT / "addons" / "datorus.py"


class ServeError(Exception):
    """``datorus serve`` cannot start or cannot go on; ``code`` is its exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# -- the plan: what to start, from the command line and the settings -------------------------


@dataclass
class Plan:
    """What ``datorus serve`` starts: *workers* mitmdumps with *args*, sharing *addresses*."""

    workers: int
    args: list[str]
    proxy: list[tuple[str, int]]  # the proxy modes' TCP addresses
    api: tuple[str, int] | None  # the REST API's (None: api_port 0)
    settings: dict[str, Any] = field(default_factory=dict)


def _mitm_options(args: Sequence[str]) -> tuple[argparse.Namespace, dict[str, list[str]]]:
    """The few mitmdump options the launcher must know, and every ``--set name=value``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--listen-host", dest="listen_host")
    p.add_argument("-p", "--listen-port", dest="listen_port", type=int)
    p.add_argument("-m", "--mode", dest="mode", action="append")
    p.add_argument("--set", dest="setoptions", action="append", default=[])
    ns, _ = p.parse_known_args(list(args))
    sets: dict[str, list[str]] = {}
    for item in ns.setoptions:
        name, _, value = item.partition("=")
        sets.setdefault(name, []).append(value)
    return ns, sets


def make_plan(
    workers: int | None, args: Sequence[str], environ: Mapping[str, str] | None = None
) -> Plan:
    """Check the command line and the settings; raise ServeError (exit 2) to refuse."""
    n = workers if workers is not None else (os.cpu_count() or 1)
    if n < 1:
        raise ServeError("--workers must be at least 1")
    ns, sets = _mitm_options(args)
    try:
        settings = resolve_defaults(environ=environ)
        for option, values in sets.items():
            s = BY_OPTION.get(option)
            if s is not None and values:
                settings[s.name] = coerce(
                    s, values if s.type not in (str, int, bool) else values[-1]
                )
    except SettingsError as e:
        raise ServeError(str(e)) from None
    if n > 1 and not settings.get("redis_url"):
        raise ServeError(
            f"{n} workers need a Redis URL for the state they share (rate limits, tunnels,"
            f" reservations, sessions): pass {REDIS_HINT} (or set DATORUS_REDIS_URL, or"
            " redis_url in mitm.conf), or run --workers 1"
        )
    host: str | None = ns.listen_host
    if host is None and sets.get("listen_host"):
        host = sets["listen_host"][-1]
    port: int | None = ns.listen_port
    if port is None and sets.get("listen_port"):
        try:
            port = int(sets["listen_port"][-1])
        except ValueError:
            raise ServeError(f"listen_port: {sets['listen_port'][-1]!r} is not a port") from None
    modes = list(ns.mode or sets.get("mode") or ["regular"])
    if settings.get("socks5_port") and f"socks5@{settings['socks5_port']}" not in modes:
        modes.append(f"socks5@{settings['socks5_port']}")  # what each worker adds (addons/socks.py)
    proxy: list[tuple[str, int]] = []
    for spec in modes:
        try:
            proxy += listeners.proxy_addresses([spec], host, port)
        except ValueError as e:
            raise ServeError(f"--mode {spec}: {e}") from None
    api = (settings["api_host"], settings["api_port"]) if settings.get("api_port") else None
    return Plan(n, list(args), proxy, api, settings)


# -- the workers --------------------------------------------------------------------------


def _signame(rc: int | None) -> str:
    if rc is None:
        return "running"
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
        return f"killed by signal {-rc}"
    return f"exit status {rc}"


class Worker:
    """One mitmdump process of a slot."""

    def __init__(self, slot: Slot, proc: asyncio.subprocess.Process, ready_fd: int) -> None:
        self.slot = slot
        self.proc = proc
        self.pid = proc.pid
        self.ready = asyncio.Event()
        self.ready_fd = ready_fd
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.started = time.monotonic()
        self.role = "current"  # or "candidate" (a replacement not yet ready), "old"
        self.stderr_done = asyncio.Event()

    @property
    def name(self) -> str:
        return f"worker {self.slot.index} (pid {self.pid})"

    def signal(self, sig: int) -> None:
        """Send *sig* if the process still runs."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


@dataclass
class Slot:
    """A worker's place: its index and the listening sockets every worker of it inherits."""

    index: int
    shared: list[tuple[str, int, list[socket.socket]]]
    current: Worker | None = None


class Launcher:
    """Start, watch, replace and stop the workers of one ``datorus serve``."""

    def __init__(self, plan: Plan, out: Any = None) -> None:
        self.plan = plan
        self.out = out or sys.stderr
        self.slots: list[Slot] = []
        self.workers: set[Worker] = set()
        self.stopping = False
        self.failure: ServeError | None = None
        self.done = asyncio.Event()
        self.crashes: collections.deque[float] = collections.deque()
        # vouched headers (the API's /fetch and /proxies/test) hold on every worker
        self.secret = secrets.token_hex(16)
        self.reload_wanted = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        # GET /metrics: every worker's, summed from this run's directory (issue 20)
        self.metrics_dir: str | None = None
        self.metrics_server: Any = None

    def say(self, message: str) -> None:
        """One line on the launcher's log (stderr)."""
        print(f"datorus serve: {message}", file=self.out, flush=True)

    # -- sockets ---------------------------------------------------------------------------

    def open_sockets(self) -> None:
        """Every slot's listening sockets; a port in use refuses the start (exit 2)."""
        addresses = list(self.plan.proxy) + ([self.plan.api] if self.plan.api else [])
        for i in range(self.plan.workers):
            shared = []
            for host, port in addresses:
                try:
                    shared.append((host, port, listeners.open_shared(host, port)))
                except OSError as e:
                    self.close_sockets()
                    # the words one gateway uses for its API and SOCKS5 ports
                    what = "cannot listen"
                    if (host, port) == self.plan.api:
                        what = "REST API cannot listen"
                    elif port == self.plan.settings.get("socks5_port"):
                        what = "datorus_socks5_port: cannot listen"
                    raise ServeError(f"{what} on {host or '*'}:{port}: {e}") from None
            self.slots.append(Slot(i, shared))

    def open_metrics(self) -> None:
        """Serve ``/metrics`` for the whole gateway on ``metrics_port`` (0: off).

        The workers count into prometheus_client's multiprocess files in a directory of
        this run's own (``PROMETHEUS_MULTIPROC_DIR``); the launcher, which outlives every
        worker, sums them on each scrape. A port in use refuses the start (exit 2).
        """
        s = self.plan.settings
        port = s.get("metrics_port") or 0
        if not port:
            return
        from . import metrics

        self.metrics_dir = tempfile.mkdtemp(prefix="datorus-metrics-")
        try:
            self.metrics_server = metrics.MetricsServer(
                s["metrics_host"], port, metrics.multiprocess_registry(self.metrics_dir)
            )
        except OSError as e:
            self.close_metrics()
            raise ServeError(f"metrics cannot listen on {s['metrics_host']}:{port}: {e}") from None

    def close_metrics(self) -> None:
        """Stop serving ``/metrics`` and remove this run's directory."""
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None

    def close_sockets(self) -> None:
        """Close the launcher's copies of the listening sockets."""
        for slot in self.slots:
            for _, _, socks in slot.shared:
                for s in socks:
                    s.close()

    # -- one worker ------------------------------------------------------------------------

    async def spawn(self, slot: Slot, role: str) -> Worker:
        """Start a worker for *slot*."""
        read_fd, write_fd = os.pipe()
        fds = [s.fileno() for _, _, socks in slot.shared for s in socks]
        env = {
            **os.environ,
            INDEX_ENV: str(slot.index),
            COUNT_ENV: str(self.plan.workers),
            LAUNCHER_ENV: str(os.getpid()),
            READY_FD_ENV: str(write_fd),
            LISTEN_FDS_ENV: listeners.encode(slot.shared),
            SECRET_ENV: self.secret,
        }
        if self.metrics_dir is not None:
            from .metrics import MULTIPROC_ENV

            env[MULTIPROC_ENV] = self.metrics_dir
        cmd = [sys.executable, str(WORKER_SCRIPT), "-s", str(ADDON_SCRIPT), *self.plan.args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                pass_fds=[*fds, write_fd],
                process_group=0,  # Ctrl-C reaches the launcher, which forwards it once
            )
        finally:
            os.close(write_fd)
        w = Worker(slot, proc, read_fd)
        w.role = role
        self.workers.add(w)
        self.say(f"{w.name} started")
        self._task(self._read_stderr(w))
        self._task(self._read_ready(w))
        self._task(self._watch(w))
        return w

    def _task(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _read_stderr(self, w: Worker) -> None:
        assert w.proc.stderr is not None
        try:
            while line := await w.proc.stderr.readline():
                text = line.decode("utf-8", "replace").rstrip("\n")
                w.tail.append(text)
                print(f"[w{w.slot.index} {w.pid}] {text}", file=self.out, flush=True)
        finally:
            w.stderr_done.set()

    async def _read_ready(self, w: Worker) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(w.ready_fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            if (await reader.readline()).strip() == b"ready":
                w.ready.set()
        finally:
            transport.close()

    async def _watch(self, w: Worker) -> None:
        rc = await w.proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(w.stderr_done.wait(), 2)
        self.workers.discard(w)
        if self.metrics_dir is not None:
            from .metrics import forget_worker

            forget_worker(self.metrics_dir, w.pid)
        what = _signame(rc)
        if self.stopping:
            self.say(f"{w.name} stopped ({what})")
        elif w.role == "old":
            self.say(f"{w.name} handed off and exited ({what})")
        elif w.role == "candidate":
            self.say(f"{w.name}, a replacement, died before it was ready ({what})")
        else:
            self._died(w, what)
        if self.stopping and not self.workers:
            self.done.set()

    def _died(self, w: Worker, what: str) -> None:
        slot = w.slot
        never_ready = not w.ready.is_set()
        if never_ready and w.proc.returncode == 2:
            # the worker refused its configuration (a bad setting, a ledger it cannot
            # open): every restart would refuse it too, so stop as one gateway would
            self.say(f"{w.name} refused its configuration ({what})")
            fatal = [line for line in w.tail if "datorus: fatal: " in line]
            why = fatal[-1].split("datorus: fatal: ", 1)[1] if fatal else what
            self.fail(ServeError(why, code=2))
            return
        self.say(
            f"{w.name} died ({what})"
            + (" before it was ready" if never_ready else "")
            + "; restarting it"
        )
        if never_ready:
            now = time.monotonic()
            self.crashes.append(now)
            while self.crashes and now - self.crashes[0] > CRASH_WINDOW:
                self.crashes.popleft()
            if len(self.crashes) >= CRASH_LIMIT:
                tail = "\n".join(w.tail) or "(nothing)"
                self.fail(
                    ServeError(
                        f"workers keep dying before they are ready ({len(self.crashes)} in"
                        f" {CRASH_WINDOW:.0f} s; the last: {what}). Its stderr ended"
                        f" with:\n{tail}",
                        code=1,
                    )
                )
                return
        slot.current = None
        self._task(self._restart(slot, len(self.crashes) if never_ready else 0))

    async def _restart(self, slot: Slot, failures: int) -> None:
        await asyncio.sleep(0.25 * failures)  # back off a worker that cannot start
        if not self.stopping and slot.current is None:
            slot.current = await self.spawn(slot, "current")

    # -- the whole ------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until stopped; the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload_wanted.set)
        where = ", ".join(f"{h or '*'}:{p}" for h, p in self.plan.proxy) or "(no TCP port)"
        api = f"; REST API on {self.plan.api[0]}:{self.plan.api[1]}" if self.plan.api else ""
        if self.metrics_server is not None:
            api += f"; metrics on {self.plan.settings['metrics_host']}:{self.metrics_server.port}"
        self.say(f"starting {self.plan.workers} workers on {where}{api}")
        for slot in self.slots:
            slot.current = await self.spawn(slot, "current")
        self._task(self._announce_ready())
        self._task(self._reloads())
        await self.done.wait()
        for t in list(self.tasks):
            t.cancel()
        self.close_sockets()
        await asyncio.to_thread(self.close_metrics)
        if self.failure is not None:
            # the same words as one gateway's fatal start-up error
            print(f"datorus: fatal: {self.failure}", file=self.out, flush=True)
            return self.failure.code
        self.say("stopped")
        return 0

    async def _announce_ready(self) -> None:
        """Say so once every slot's worker is ready."""
        while waiting := [s for s in self.slots if not (s.current and s.current.ready.is_set())]:
            current = waiting[0].current
            if current is None:  # being restarted
                await asyncio.sleep(0.1)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(current.ready.wait(), 0.5)
        self.say(f"{len(self.slots)} workers ready")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Drain every worker (SIGTERM forwarded); ``run`` returns when all are gone."""
        if self.stopping:
            return
        self.stopping = True
        self.say(f"{signal.Signals(sig).name}: draining {len(self.workers)} workers")
        # no worker will replace these: let each socket close when its worker stops
        # listening at the end of its drain, so a client that connects then is refused
        # at once instead of queued on a socket nobody accepts from and reset at exit
        self.close_sockets()
        for w in list(self.workers):
            w.signal(signal.SIGTERM)
        # no worker will take a slot over now: let each slot's socket close with its
        # worker's copy, so that a worker done draining before the others leaves the
        # port to them (else the kernel goes on queueing a share of the new connections
        # in its slot, where nobody accepts them until the last worker is gone)
        self.close_sockets()
        if not self.workers:
            self.done.set()
        self._task(self._kill_after(self.plan.settings.get("drain_seconds", 5) + STOP_GRACE))

    async def _kill_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        for w in list(self.workers):
            self.say(f"{w.name} still running {seconds:.0f} s after SIGTERM: SIGKILL")
            w.signal(signal.SIGKILL)
            if self.failure is None:
                self.failure = ServeError("a worker did not stop in time", code=1)

    def fail(self, err: ServeError) -> None:
        """Give up: stop every worker and exit with *err*."""
        if self.failure is None:
            self.failure = err
        self.stop()

    async def _reloads(self) -> None:
        while True:
            await self.reload_wanted.wait()
            self.reload_wanted.clear()
            if self.stopping:
                return
            await self.reload()

    async def reload(self) -> bool:
        """Replace every worker, one slot at a time; False if a replacement failed."""
        t0 = time.monotonic()
        self.say(f"SIGHUP: replacing {len(self.slots)} workers one at a time")
        olds: list[Worker] = []
        for slot in self.slots:
            if self.stopping:
                return False
            new = await self.spawn(slot, "candidate")
            ready = asyncio.ensure_future(new.ready.wait())
            died = asyncio.ensure_future(new.proc.wait())
            await asyncio.wait({ready, died}, timeout=READY_TIMEOUT, return_when="FIRST_COMPLETED")
            ready.cancel()
            died.cancel()
            if not new.ready.is_set() or self.stopping:
                if not self.stopping:
                    self.say(f"reload stopped: {new.name} did not become ready; keeping the rest")
                new.role = "old"
                new.signal(signal.SIGTERM)
                return False
            old, slot.current, new.role = slot.current, new, "current"
            if old is not None:
                old.role = "old"
                old.signal(signal.SIGUSR1)
                olds.append(old)
        self.say(f"reload: {len(self.slots)} workers ready in {time.monotonic() - t0:.2f} s")
        await asyncio.gather(*(o.proc.wait() for o in olds), return_exceptions=True)
        self.say(f"reload done in {time.monotonic() - t0:.2f} s (old workers gone)")
        return True


def serve(workers: int | None, args: Sequence[str]) -> int:
    """``datorus serve``: plan, open the shared sockets, run the workers; the exit status."""
    try:
        plan = make_plan(workers, args)
        launcher = Launcher(plan)
        launcher.open_sockets()
        try:
            launcher.open_metrics()
        except ServeError:
            launcher.close_sockets()
            raise
    except ServeError as e:
        print(f"datorus: fatal: {e}", file=sys.stderr, flush=True)
        return e.code
    return asyncio.run(launcher.run())
