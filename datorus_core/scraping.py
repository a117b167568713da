"""Scraping a proxy-list source: fetch the list, read it off the event loop, fill the pool.

One pipeline for every caller: ``POST /sources/{id}/scrape`` (the API's worker threads
reach the ledger), ``datorus source scrape`` (the CLI's own connection) and the
pool worker's schedule (``datorus_core.pool_worker``, a thread of its own). Each passes a
:data:`DbRun`, how it runs a ledger call without blocking an event loop.

- **Fetch** (:func:`fetch_list`): ``GET`` with httpx, at most :data:`MAX_REDIRECTS`
  redirects, ``timeout`` seconds for the whole download, the body read as a stream and
  cut off past :data:`~.sources.registry.MAX_LIST_BYTES` (10 MiB, decompressed), no
  proxy from the environment. The list is fetched by the box itself, never through the
  egress pool, and the acceptable-use policy does not apply (see
  :mod:`.sources.fields`).
- **Read** (:func:`read_list`): the parser (the source's, else the first whose
  ``supports()`` fits) and ``parse_list`` run in a worker thread.
- **Screen** (:func:`.sources.screen.screen`): a found proxy at an address the
  acceptable-use policy's built-in denials cover (loopback, private, link-local,
  metadata), unless the operator's ``source_proxy_allow`` opens it, is skipped and
  counted (``proxies_denied``); a host name is resolved first.
- **Store**: :func:`.ledger.sources.import_found` in one transaction.

A scrape holds the source's claim from start to end (:func:`.ledger.sources.claim`),
so it never overlaps itself, whoever started it. A list that fails (unreachable, an
HTTP error, too large, unreadable, empty) leaves the pool as it was; the reason is
recorded as the source's ``last_error`` and returned in the result's ``error``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from .clock import iso_utc
from .envelope import DatorusError
from .ledger import Ledger
from .ledger import sources as ledger_sources
from .policy import Policy
from .sources.fields import next_run_at
from .sources.parsers import ParseDefaults
from .sources.registry import MAX_LIST_BYTES, ParseOutcome, parse_list, pick_parser
from .sources.screen import found_proxy_policy, screen

log = logging.getLogger("datorus.sources")
# the gateway's log handlers show what is logged here; a CLI run, which has none, stays
# quiet on stderr (only its envelope or sentence goes there)
log.addHandler(logging.NullHandler())

T = TypeVar("T")
#: Runs a ledger call somewhere that may block (a worker thread) and awaits its result.
DbRun = Callable[[Callable[[Ledger], T]], Awaitable[T]]

MAX_REDIRECTS = 5
MIN_CLAIM_SECONDS = 300  # a claim outlives the slowest scrape (fetch + parse + import)


class ListError(Exception):
    """The list could not be used. ``reason`` is a stable word (``unreachable``,
    ``timeout``, ``http_status``, ``too_large``, ``no_parser``, ``unparseable``,
    ``empty``); the message says what happened, without the list's content."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Fetched:
    """A list as served: its bytes and ``Content-Type``."""

    content: bytes
    content_type: str | None


def _user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"datorus/{version('datorus')} (proxy-list source)"
    except PackageNotFoundError:
        return "datorus (proxy-list source)"


async def fetch_list(url: str, timeout: float, limit: int = MAX_LIST_BYTES) -> Fetched:
    """The list at *url*, or ``ListError``: a non-2xx answer, more than *limit* bytes,
    more than :data:`MAX_REDIRECTS` redirects, no answer within *timeout* seconds."""
    headers = {"User-Agent": _user_agent(), "Accept": "text/plain, application/json, text/csv, */*"}
    try:
        async with (
            asyncio.timeout(timeout),
            httpx.AsyncClient(
                timeout=timeout,
                follow_redirects=True,
                max_redirects=MAX_REDIRECTS,
                trust_env=False,
                headers=headers,
            ) as client,
            client.stream("GET", url) as resp,
        ):
            if not 200 <= resp.status_code < 300:
                raise ListError(
                    "http_status",
                    f"the list answered {resp.status_code} {resp.reason_phrase}".rstrip(),
                )
            length = resp.headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                raise ListError("too_large", f"the list is larger than {limit} bytes")
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise ListError("too_large", f"the list is larger than {limit} bytes")
            return Fetched(bytes(body), resp.headers.get("content-type"))
    except (TimeoutError, httpx.TimeoutException):
        raise ListError("timeout", f"no complete answer within {timeout:g} s") from None
    except httpx.TooManyRedirects:
        raise ListError("unreachable", f"more than {MAX_REDIRECTS} redirects") from None
    except httpx.HTTPError as e:
        why = str(e).strip() or type(e).__name__
        raise ListError("unreachable", f"the list could not be fetched: {why[:200]}") from None


async def read_list(
    fetched: Fetched, parser_name: str | None, defaults: ParseDefaults
) -> tuple[str, ParseOutcome]:
    """The parser's name and what it read, computed in a worker thread (a 10 MiB list
    keeps the event loop free); ``ListError`` when no parser reads it."""

    def work() -> tuple[str, ParseOutcome]:
        try:
            parser = pick_parser(fetched.content, fetched.content_type, parser_name)
        except DatorusError as e:  # an uninstalled parser, or none reads it
            raise ListError("no_parser", _why(e)) from None
        try:
            return parser.name, parse_list(parser, fetched.content, defaults)
        except DatorusError as e:  # no list at all (JSON that does not parse...)
            raise ListError("unparseable", _why(e)) from None

    name, outcome = await asyncio.to_thread(work)
    if not outcome.proxies:
        if outcome.skipped:
            raise ListError(
                "unparseable",
                f"none of its {outcome.skipped} entries is a proxy"
                + (f" ({outcome.problems[0]})" if outcome.problems else ""),
            )
        raise ListError("empty", "the list names no proxy")
    return name, outcome


def _why(e: DatorusError) -> str:
    return str((e.details or {}).get("reason") or e.message)


def new_owner() -> str:
    """A claim owner naming this process: ``host:pid:random``."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


def busy(source_id: int) -> DatorusError:
    """``429 RATE_LIMITED``: the source is being scraped right now."""
    return DatorusError(
        "RATE_LIMITED",
        message="This source is being scraped right now; try again when that scrape is done.",
        details={"limit": "scrape_running", "source": source_id},
        headers={"Retry-After": "1"},
    )


@dataclass
class Scraper:
    """Scrapes sources for one process: its ledger access, claim owner and settings."""

    db: DbRun
    owner: str
    timeout: float = 30.0
    test_seconds: int = 0  # the test-only test_schedule_seconds setting
    # what found proxies are judged by (``source_proxy_allow``); the built-in denials
    policy: Policy = field(default_factory=lambda: found_proxy_policy({}))

    @property
    def hold(self) -> int:
        """How long a claim lasts: longer than any scrape may take."""
        return max(MIN_CLAIM_SECONDS, int(self.timeout) * 4)

    async def scrape(self, source_id: int, scheduled: bool = False) -> dict[str, Any] | None:
        """Scrape one source now; its result (:func:`result`).

        A scheduled run (*scheduled*) happens only if the source is due and nobody holds
        it, else None. A scrape on request raises ``RESOURCE_NOT_FOUND`` for no such
        source and ``429 RATE_LIMITED`` while another scrape of it runs.
        """
        now = int(time.time())
        won = await self.db(
            lambda d: ledger_sources.claim(
                d, source_id, self.owner, now, now + self.hold, due=scheduled
            )
        )
        if not won:
            if scheduled:
                return None
            await self.db(lambda d: ledger_sources.get_source(d, source_id))  # 404 if none
            raise busy(source_id)
        try:
            return await self._run(source_id, scheduled)
        except BaseException:
            # cancelled (a stop) or the ledger failed: let the next run take it
            task = asyncio.ensure_future(
                self.db(lambda d: ledger_sources.release(d, source_id, self.owner))
            )
            try:
                await asyncio.shield(task)
            except BaseException:
                log.warning("datorus: source %s: claim not released (it expires)", source_id)
            raise

    async def _run(self, source_id: int, scheduled: bool) -> dict[str, Any]:
        started = time.monotonic()
        src = await self.db(lambda d: ledger_sources.get_source(d, source_id))
        defaults = ParseDefaults(src["default_protocol"], src["default_country"])
        parser_name: str | None = src["parser_name"]
        outcome: ParseOutcome | None = None
        imported: ledger_sources.Imported | None = None
        error: ListError | None = None
        denied = 0
        try:
            fetched = await fetch_list(src["url"], self.timeout)
            parser_name, outcome = await read_list(fetched, parser_name, defaults)
            proxies, denied = await screen(outcome.proxies, self.policy)
            tags = _tags(src["tags"])
            imported = await self.db(
                lambda d: ledger_sources.import_found(
                    d, source_id, proxies, src["default_country"], src["default_weight"], tags
                )
            )
        except ListError as e:
            error = e
        ms = int((time.monotonic() - started) * 1000)
        record = ledger_sources.Outcome(
            error=str(error) if error else None,
            found=(imported.new + imported.updated) if imported else 0,
            new=imported.new if imported else 0,
            duration_ms=ms,
        )
        test_seconds = self.test_seconds

        def next_run(cron: str | None) -> int | None:
            return next_run_at(cron, time.time(), test_seconds)

        await self.db(
            lambda d: ledger_sources.finish(
                d, source_id, self.owner, record, next_run if scheduled else None
            )
        )
        out = result(source_id, parser_name, outcome, imported, ms, error, denied)
        _log(out, scheduled)
        return out


def _tags(text: str | None) -> dict[str, str]:
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}


def result(
    source_id: int,
    parser_name: str | None,
    outcome: ParseOutcome | None,
    imported: ledger_sources.Imported | None,
    duration_ms: int,
    error: ListError | None,
    denied: int = 0,
) -> dict[str, Any]:
    """Seed 002's scrape result and more: counts, the parser, problems, the error.

    ``proxies_discovered`` = ``proxies_new`` + ``proxies_updated`` (distinct proxies the
    pool can carry); ``proxies_skipped`` counts entries that are no proxy, proxies of
    a protocol the pool does not carry and proxies at denied addresses, the last also
    alone in ``proxies_denied``; ``proxies_duplicate`` repeated entries.
    """
    new = imported.new if imported else 0
    updated = imported.updated if imported else 0
    unsupported = imported.unsupported if imported else 0
    problems = list(outcome.problems) if outcome else []
    if unsupported:
        problems.append(f"{unsupported} proxies of a protocol the pool does not carry yet")
    if denied:
        problems.append(
            f"{denied} proxies at addresses the acceptable-use policy denies (loopback,"
            " private, link-local or metadata; see the source_proxy_allow setting)"
        )
    return {
        "source_id": source_id,
        "parser_name": parser_name,
        "proxies_discovered": new + updated,
        "proxies_new": new,
        "proxies_updated": updated,
        "proxies_skipped": (outcome.skipped if outcome else 0) + unsupported + denied,
        "proxies_denied": denied,
        "proxies_duplicate": outcome.duplicates if outcome else 0,
        "duration_ms": duration_ms,
        "scraped_at": iso_utc(),
        "error": str(error) if error else None,
        "error_reason": error.reason if error else None,
        "problems": problems,
    }


def _log(out: dict[str, Any], scheduled: bool) -> None:
    how = "scheduled" if scheduled else "on request"
    if out["error"]:
        log.warning("datorus: source %s (%s) failed: %s", out["source_id"], how, out["error"])
    else:
        log.info(
            "datorus: source %s (%s): %d proxies, %d new, %d skipped, %d ms",
            out["source_id"],
            how,
            out["proxies_discovered"],
            out["proxies_new"],
            out["proxies_skipped"],
            out["duration_ms"],
        )
