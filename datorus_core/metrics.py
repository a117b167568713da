"""Prometheus metrics: ``GET /metrics`` on ``metrics_host:metrics_port`` (issue 20).

Two kinds of metric, collected two ways:

- **Events** (requests by status and code, bytes by kind, latency and time to first
  byte, refusals for money, ledger flushes, Redis round trips) are prometheus_client
  counters and histograms, moved by the gateway as things happen: an increment, a
  dict look-up for the label set, no I/O. :class:`Metrics` holds them.
- **State** (open tunnels, the pool's egress by state, blocked domains, usage events
  not yet written, events waiting for delivery) is read off the gateway's own objects
  once a second on its loop (:func:`addons.metrics`) into a :class:`StateSnapshot`;
  a scrape reads the last snapshot and never touches the gateway's objects from the
  HTTP thread.

**Several workers** (``datorus serve --workers N``): the launcher makes a directory per
run, hands it to every worker as ``PROMETHEUS_MULTIPROC_DIR``, and serves ``/metrics``
itself on ``metrics_port``. The workers' counters and histograms then live in
prometheus_client's memory-mapped files there (its multiprocess mode: an increment is a
write to shared memory), and each worker writes its state snapshot beside them as
``state_<pid>.json``. A scrape of the launcher sums the counters of every worker that
ever ran in this run (those of replaced workers too, so totals never go back) and
merges the snapshots of the living ones (:class:`MultiProcessState`). A gauge that
remembers a window (the accounts refused for money in the last ``REFUSED_WINDOW``
seconds) keeps a gone worker's samples until they leave the window
(``gone_<pid>.json``): a reload or a crash forgets none of them. One port, one scrape
job, whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# no `_created` series: a start time per label set is noise on a dashboard (and the
# multiprocess mode has none, so one gateway and several workers expose the same names)
disable_created_metrics()  # type: ignore[no-untyped-call]

#: prometheus_client's own switch for its multiprocess mode (read when it is imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: How many domains ``datorus_blocked_domains`` names; the rest are summed as ``(other)``.
TOP_DOMAINS = 10
OTHER = "(other)"

#: The kinds of traffic bytes and requests are counted by (a label): a SOCKS5 tunnel is
#: "socks5", a CONNECT tunnel "tunnel".
FORWARD, TUNNEL, WEBSOCKET, SOCKS5 = "forward", "tunnel", "websocket", "socks5"

#: How long an account refused for money counts in ``datorus_accounts_refused_for_money``.
REFUSED_WINDOW = 300.0

#: The codes of a request refused because its account has no money left.
MONEY_CODES = frozenset({"INSUFFICIENT_BALANCE", "TRIAL_EXHAUSTED"})

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FLUSH_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 50000)
RTT_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The gateway's counters and histograms, and the cheap calls that move them.

    *registry* is where they are registered (a fresh one per test; ``None``: a registry
    of their own, served by :func:`serve`).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "datorus_requests",
            "Requests and tunnels answered, by kind, HTTP status and Datorus error code"
            " (empty: a relayed answer or a tunnel opened).",
            ["kind", "status", "code"],
            registry=r,
        )
        self.bytes = Counter(
            "datorus_bytes",
            "Bytes relayed between clients and targets, by kind and direction (up: client"
            " to target, down: target to client).",
            ["kind", "direction"],
            registry=r,
        )
        self.duration = Histogram(
            "datorus_request_duration_seconds",
            "Forward requests: from the request head to the end of the answer;"
            " tunnels: from CONNECT to the 200.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "datorus_time_to_first_byte_seconds",
            "From the request head to the answer's head (relayed answers only).",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.money_refusals = Counter(
            "datorus_money_refusals",
            "Requests refused (402) because their account had no money left, by code.",
            ["code"],
            registry=r,
        )
        self.flush_lag = Histogram(
            "datorus_ledger_flush_lag_seconds",
            "Age of a usage batch's first event when the batch was written to the ledger.",
            buckets=FLUSH_LAG_BUCKETS,
            registry=r,
        )
        self.flush_batch = Histogram(
            "datorus_ledger_flush_batch_events",
            "Usage events per batch written to the ledger.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.flush_failures = Counter(
            "datorus_ledger_flush_failures",
            "Usage batch writes that failed (the batch is kept and written again).",
            registry=r,
        )
        self.redis_rtt = Histogram(
            "datorus_redis_rtt_seconds",
            "Round trip of one pipeline of commands to the shared hot state (Redis).",
            buckets=RTT_BUCKETS,
            registry=r,
        )
        self._answers: dict[tuple[str, int, str], Any] = {}
        self.refused_accounts: dict[int, float] = {}  # account -> when last refused for money
        self._bytes: dict[str, tuple[Any, Any]] = {}
        self._duration: dict[str, Any] = {}
        self._ttfb: dict[str, Any] = {}

    # -- the hot path: increments only ------------------------------------------------

    def answered(self, kind: str, status: int, code: str = "", account: int | None = None) -> None:
        """Count one answer (a response, a CONNECT's 200 or refusal, an error page);
        *account* is the account it was for, when known (refusals for money remember it)."""
        key = (kind, status, code)
        child = self._answers.get(key)
        if child is None:
            child = self._answers[key] = self.requests.labels(kind, str(status), code)
        child.inc()
        if code in MONEY_CODES:
            self.money_refusals.labels(code).inc()
            if account is not None:
                self.refused_accounts[account] = time.monotonic()

    def accounts_refused(self, now: float) -> list[int]:
        """Accounts refused for money within ``REFUSED_WINDOW`` seconds of *now*
        (monotonic); older ones are forgotten."""
        cutoff = now - REFUSED_WINDOW
        gone = [a for a, t in self.refused_accounts.items() if t < cutoff]
        for a in gone:
            del self.refused_accounts[a]
        return sorted(self.refused_accounts)

    def accounts_refused_at(self, now: float, wall: float) -> list[tuple[int, float]]:
        """:meth:`accounts_refused`, each with when it was last refused in wall-clock
        seconds (*wall* is *now* on that clock): what outlives this process."""
        return [(a, wall - (now - self.refused_accounts[a])) for a in self.accounts_refused(now)]

    def moved(self, kind: str, up: int, down: int) -> None:
        """Count bytes relayed."""
        pair = self._bytes.get(kind)
        if pair is None:
            pair = self._bytes[kind] = (
                self.bytes.labels(kind, "up"),
                self.bytes.labels(kind, "down"),
            )
        if up:
            pair[0].inc(up)
        if down:
            pair[1].inc(down)

    def took(self, kind: str, seconds: float) -> None:
        """Observe a request's duration."""
        child = self._duration.get(kind)
        if child is None:
            child = self._duration[kind] = self.duration.labels(kind)
        child.observe(seconds)

    def first_byte(self, kind: str, seconds: float) -> None:
        """Observe a request's time to the first byte of its answer."""
        child = self._ttfb.get(kind)
        if child is None:
            child = self._ttfb[kind] = self.ttfb.labels(kind)
        child.observe(seconds)

    # -- background work ----------------------------------------------------------------

    def flushed(self, events: int, lag: float) -> None:
        """A usage batch of *events* reached the ledger *lag* seconds after its first."""
        self.flush_batch.observe(events)
        self.flush_lag.observe(max(0.0, lag))

    def flush_failed(self) -> None:
        """A usage batch could not be written (it is kept for the next try)."""
        self.flush_failures.inc()

    def round_trip(self, seconds: float) -> None:
        """One Redis pipeline took *seconds*."""
        self.redis_rtt.observe(seconds)

    def prime(self, kinds: Sequence[str] = (FORWARD, TUNNEL, WEBSOCKET, SOCKS5)) -> None:
        """Create the per-kind series at zero, so dashboards and rate() see them from
        the start rather than from the first request of each kind."""
        for kind in kinds:
            self.moved(kind, 0, 0)
            self._duration.setdefault(kind, self.duration.labels(kind))
            self._ttfb.setdefault(kind, self.ttfb.labels(kind))
        for code in sorted(MONEY_CODES):
            self.money_refusals.labels(code)


class NullMetrics:
    """What the gateway counts with when metrics are off: nothing at all."""

    def answered(self, kind: str, status: int, code: str = "", account: int | None = None) -> None:
        """Count nothing."""

    def moved(self, kind: str, up: int, down: int) -> None:
        """Count nothing."""

    def took(self, kind: str, seconds: float) -> None:
        """Count nothing."""

    def first_byte(self, kind: str, seconds: float) -> None:
        """Count nothing."""

    def flushed(self, events: int, lag: float) -> None:
        """Count nothing."""

    def flush_failed(self) -> None:
        """Count nothing."""

    def round_trip(self, seconds: float) -> None:
        """Count nothing."""


# -- state: read off the gateway once a second -----------------------------------------------


@dataclass(frozen=True)
class StateGauge:
    """A gauge read off the gateway's state, and how workers' values combine."""

    name: str
    help: str
    labels: tuple[str, ...] = ()
    # "sum": each worker holds its own share (open tunnels); "latest": every worker sees
    # the same thing (the pool, the ledger), the freshest view is taken; "max": the
    # worst; "distinct": samples name keys, the value is how many different ones
    combine: str = "sum"
    # > 0: a sample's value is when (wall clock) it was last true, and a gone worker's
    # samples count that many seconds after it (a window the gauge reports on)
    outlives: float = 0.0


STATE_GAUGES: tuple[StateGauge, ...] = (
    StateGauge("datorus_open_tunnels", "Tunnels and WebSockets open now, by kind.", ("kind",)),
    StateGauge(
        "datorus_egress",
        "Egress in the pool by state (active, unchecked, dead, backoff: active but backing"
        " off a failure, disabled).",
        ("state",),
        "latest",
    ),
    StateGauge(
        "datorus_blocked_domains",
        f"Egress backing off a block, by destination domain: the {TOP_DOMAINS} domains"
        f" with the most, the rest summed as {OTHER}.",
        ("domain",),
        "latest",
    ),
    StateGauge(
        "datorus_accounts_refused_for_money",
        f"Accounts refused (402) for want of money at least once in the last"
        f" {REFUSED_WINDOW:.0f} s.",
        (),
        # each worker lists the accounts it refused (as a label, never exposed) with
        # when: the gateway's value is how many different ones all the workers refused,
        # those of a worker since replaced included, while in the window
        "distinct",
        REFUSED_WINDOW,
    ),
    StateGauge("datorus_ledger_events_pending", "Usage events not yet written to the ledger."),
    StateGauge(
        "datorus_ledger_pending_age_seconds",
        "Age of the oldest usage event not yet written to the ledger (0: none waiting).",
        (),
        "max",
    ),
    StateGauge(
        "datorus_events_waiting",
        "Events waiting for delivery, by queue (mail: outbox messages not sent).",
        ("queue",),
        "latest",
    ),
)
BY_GAUGE: dict[str, StateGauge] = {g.name: g for g in STATE_GAUGES}

Samples = dict[str, list[tuple[tuple[str, ...], float]]]


@dataclass
class StateSnapshot:
    """The state gauges' values at one moment (``at``: wall-clock seconds)."""

    values: Samples = field(default_factory=dict)
    at: float = 0.0

    def set(self, name: str, value: float, *labels: str) -> None:
        """Record one sample of gauge *name* (which must be in ``STATE_GAUGES``)."""
        if name not in BY_GAUGE:
            raise KeyError(f"{name} is not a state gauge")
        self.values.setdefault(name, []).append((tuple(labels), float(value)))

    def to_json(self) -> str:
        """The snapshot as a worker writes it to its state file."""
        return json.dumps(
            {
                "at": self.at,
                "values": {k: [[list(lb), v] for lb, v in s] for k, s in self.values.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> StateSnapshot:
        """Read a state file written by :meth:`to_json`."""
        data = json.loads(text)
        values: Samples = {
            k: [(tuple(str(x) for x in lb), float(v)) for lb, v in s]
            for k, s in data.get("values", {}).items()
        }
        return cls(values, float(data.get("at", 0.0)))


def top_domains(counts: Mapping[str, int], n: int = TOP_DOMAINS) -> list[tuple[str, int]]:
    """The *n* domains with the highest counts, then ``(other)`` with the rest summed.

    >>> top_domains({"a.com": 3, "b.com": 1, "c.com": 2}, n=2)
    [('a.com', 3), ('c.com', 2), ('(other)', 1)]
    >>> top_domains({})
    []
    """
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    head, rest = ranked[:n], ranked[n:]
    if rest:
        head.append((OTHER, sum(v for _, v in rest)))
    return head


def combine(snapshots: Iterable[StateSnapshot]) -> StateSnapshot:
    """Merge workers' snapshots, each gauge as its ``combine`` says.

    >>> a, b = StateSnapshot(at=1.0), StateSnapshot(at=2.0)
    >>> a.set("datorus_open_tunnels", 2, "tunnel"); b.set("datorus_open_tunnels", 3, "tunnel")
    >>> a.set("datorus_egress", 4, "active"); b.set("datorus_egress", 5, "active")
    >>> m = combine([a, b])
    >>> m.values["datorus_open_tunnels"], m.values["datorus_egress"]
    ([(('tunnel',), 5.0)], [(('active',), 5.0)])
    """
    snaps = sorted(snapshots, key=lambda s: s.at)
    out = StateSnapshot(at=snaps[-1].at if snaps else 0.0)
    for g in STATE_GAUGES:
        if g.combine == "latest":
            for s in reversed(snaps):
                if g.name in s.values:
                    out.values[g.name] = list(s.values[g.name])
                    break
            continue
        merged: dict[tuple[str, ...], float] = {}
        for s in snaps:
            for labels, v in s.values.get(g.name, []):
                if g.combine in ("max", "distinct"):  # distinct: the latest "when"
                    merged[labels] = max(merged.get(labels, v), v)
                else:
                    merged[labels] = merged.get(labels, 0.0) + v
        if merged:
            out.values[g.name] = sorted(merged.items())
    return out


def families(snapshot: StateSnapshot) -> Iterator[GaugeMetricFamily]:
    """The snapshot as metric families (every state gauge, with no samples if unknown)."""
    for g in STATE_GAUGES:
        samples = snapshot.values.get(g.name, [])
        if g.combine == "distinct":
            yield GaugeMetricFamily(g.name, g.help, value=len({lb for lb, _ in samples}))
            continue
        fam = GaugeMetricFamily(g.name, g.help, labels=list(g.labels))
        for labels, v in samples:
            fam.add_metric(list(labels), v)
        yield fam


class StateCollector(Collector):
    """One process's state gauges: the last snapshot its loop took."""

    def __init__(self) -> None:
        self.snapshot = StateSnapshot()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The last snapshot (replaced whole by the loop: no lock needed)."""
        yield from families(self.snapshot)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The gauges' names, for the registry's duplicate check."""
        yield from families(StateSnapshot())


# -- several workers: one directory per run ----------------------------------------------


STATE_PREFIX = "state_"
GONE_PREFIX = "gone_"  # what a gone worker's state leaves: its gauges that outlive it


def state_file(directory: str | Path, pid: int) -> Path:
    """Where worker *pid* writes its state snapshot."""
    return Path(directory) / f"{STATE_PREFIX}{pid}.json"


def write_state(directory: str | Path, pid: int, snapshot: StateSnapshot) -> None:
    """Write *snapshot* atomically (a reader sees the old file or the new one)."""
    path = state_file(directory, pid)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(snapshot.to_json())
    os.replace(tmp, path)


def outliving(snapshot: StateSnapshot, now: float) -> StateSnapshot:
    """What of a gone worker's *snapshot* still counts at *now* (wall clock): the
    samples of gauges that outlive it (``StateGauge.outlives``) still in their window.

    >>> s = StateSnapshot(at=100.0)
    >>> s.set("datorus_open_tunnels", 2, "tunnel")
    >>> s.set("datorus_accounts_refused_for_money", 90.0, "7")
    >>> outliving(s, 120.0).values
    {'datorus_accounts_refused_for_money': [(('7',), 90.0)]}
    >>> outliving(s, 90.0 + REFUSED_WINDOW + 1).values
    {}
    """
    out = StateSnapshot(at=snapshot.at)
    for g in STATE_GAUGES:
        if g.outlives > 0:
            kept = [(lb, v) for lb, v in snapshot.values.get(g.name, []) if now - v <= g.outlives]
            if kept:
                out.values[g.name] = kept
    return out


class MultiProcessState(Collector):
    """The launcher's view of its workers' state files: those of living workers, and
    what outlives the gone ones (``gone_<pid>.json``, dropped once out of its window)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def snapshots(self) -> list[StateSnapshot]:
        """Every state file that can be read now."""
        out = []
        for path in self.directory.glob(f"{STATE_PREFIX}*.json"):
            with contextlib.suppress(OSError, ValueError):
                out.append(StateSnapshot.from_json(path.read_text()))
        wall = now()
        for path in self.directory.glob(f"{GONE_PREFIX}*.json"):
            with contextlib.suppress(OSError, ValueError):
                kept = outliving(StateSnapshot.from_json(path.read_text()), wall)
                if kept.values:
                    out.append(kept)
                else:
                    path.unlink()
        return out

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The workers' snapshots merged."""
        yield from families(combine(self.snapshots()))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The gauges' names, for the registry's duplicate check."""
        yield from families(StateSnapshot())


def forget_worker(directory: str | Path, pid: int) -> None:
    """A worker is gone: drop its state file and its live gauges' files.

    Its counters and histograms stay, so the run's totals never go back, and so do the
    samples of the gauges that outlive it, while in their window (``gone_<pid>.json``).
    """
    from prometheus_client import multiprocess

    path = state_file(directory, pid)
    with contextlib.suppress(OSError, ValueError):
        kept = outliving(StateSnapshot.from_json(path.read_text()), now())
        if kept.values:
            gone = Path(directory) / f"{GONE_PREFIX}{pid}.json"
            tmp = gone.with_suffix(".tmp")
            tmp.write_text(kept.to_json())
            os.replace(tmp, gone)
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def multiprocess_registry(directory: str | Path) -> CollectorRegistry:
    """What the launcher serves: every worker's counters and histograms summed, and
    the living workers' state merged."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    registry.register(MultiProcessState(directory))
    return registry


# -- serving ------------------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` on a thread of its own (prometheus_client's WSGI server)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        from prometheus_client import start_http_server

        # raises OSError when the address cannot be had
        self.httpd, self.thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()  # waits for its loop's next poll (0.5 s at most)
        self.httpd.server_close()


def now() -> float:
    """Wall-clock seconds (a snapshot's ``at``)."""
    return time.time()
