"""Proxy-list sources (seed 002's ``/sources``): the operator's, behind an operator key.

Every route here needs an operator key (``datorus key create --operator``); a customer's
key gets ``404 RESOURCE_NOT_FOUND``, the answer to a route that does not exist. The
OpenAPI document marks them with the ``OperatorKey`` security scheme and
``x-datorus-operator: true``.

``POST /sources`` fetches the list only to pick its parser when ``parser_name`` is
omitted, and imports nothing: proxies arrive with a scrape, on request
(``POST /sources/{id}/scrape``) or at the source's next scheduled time (the pool
worker's schedule, ``datorus_core.pool_worker``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from fastapi.routing import APIRoute
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..egress import COUNTRY_PATTERN
from ..envelope import DatorusError, validation_error
from ..ledger import sources as ledger_sources
from ..scraping import ListError, Scraper, fetch_list, new_owner
from ..sources.fields import check_fields, next_run_at
from ..sources.registry import installed_parsers, pick_parser
from ..sources.screen import found_proxy_policy
from . import store
from .deps import OPERATOR_ONLY, Cursor, Limit, Operator, State
from .models import Body
from .state import ApiState

router = APIRouter(tags=["sources"])

_NOTE = "\n\nNeeds an operator key (`x-datorus-operator`); a customer's key gets 404."
SourceId = Annotated[int, Path(ge=1, le=2**62)]
Protocol = Literal["http", "https", "socks4", "socks5"]
Tags = Annotated[
    dict[str, str],
    Field(max_length=20, description="Tags given to the proxies it finds.", examples=[{}]),
]


class SourceIn(Body):
    """``POST /sources``: a list URL, how to read it, when to fetch it, and defaults."""

    url: str = Field(max_length=2048, examples=["https://example.com/proxies.txt"])
    name: str | None = Field(default=None, max_length=100)
    parser_name: str | None = Field(
        default=None, max_length=64, description="Omitted: picked from the fetched list."
    )
    cron_schedule: str | None = Field(
        default=None, max_length=200, examples=["*/30 * * * *"], description="Five-field cron."
    )
    default_protocol: Protocol = "http"
    default_country: str | None = Field(default=None, pattern=COUNTRY_PATTERN)
    default_weight: int = Field(default=1, ge=1, le=1000)
    tags: Tags = Field(default_factory=dict)
    is_active: bool = True


class SourcePatch(Body):
    """``PATCH /sources/{id}``: only the fields given change (``null`` clears
    ``parser_name``, then picked from each scrape's content, or ``cron_schedule``)."""

    url: str | None = Field(default=None, max_length=2048)
    name: str | None = Field(default=None, max_length=100)
    parser_name: str | None = Field(default=None, max_length=64)
    cron_schedule: str | None = Field(default=None, max_length=200)
    default_protocol: Protocol | None = None
    default_country: str | None = Field(default=None, pattern=COUNTRY_PATTERN)
    default_weight: int | None = Field(default=None, ge=1, le=1000)
    tags: Tags | None = None
    is_active: bool | None = None


def _timeout(st: ApiState) -> float:
    return float(st.settings.get("source_timeout", 30))


def _test_seconds(st: ApiState) -> int:
    return int(st.settings.get("test_schedule_seconds", 0))


def scraper(st: ApiState) -> Scraper:
    """This API process's scraper: the API's ledger threads, one claim owner."""

    async def db(fn: Any) -> Any:
        return await run_in_threadpool(lambda: fn(st.store.db()))

    owner = st.extra.setdefault("scrape_owner", new_owner())
    return Scraper(db, owner, _timeout(st), _test_seconds(st), found_proxy_policy(st.settings))


async def _pick(st: ApiState, url: str) -> str:
    """The parser that reads the list at *url* now (400 on *url* or ``parser_name``)."""
    try:
        fetched = await fetch_list(url, _timeout(st))
    except ListError as e:
        raise validation_error(
            "url",
            f"{e} (a parser_name adds the source without fetching it)",
            f"The list could not be fetched to pick its parser: {e}.",
        ) from None
    try:
        parser = await asyncio.to_thread(pick_parser, fetched.content, fetched.content_type)
    except DatorusError:
        names = ", ".join(installed_parsers().names()) or "none"
        raise validation_error(
            "parser_name",
            "no installed parser reads the list at url; name one",
            f"No installed parser reads this list ({names}): name one with parser_name.",
        ) from None
    return parser.name


@router.get("/sources", openapi_extra=OPERATOR_ONLY)
def list_sources(
    op: Operator,
    st: State,
    is_active: bool | None = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Any:
    """The sources by id, in cursor pages (``is_active`` filters)."""
    if is_active is None:
        sql, args = ledger_sources.SOURCES_SQL, []
    else:
        sql, args = ledger_sources.SOURCES_BY_STATE_SQL, [1 if is_active else 0]
    rows, nxt, total = store.page(st.store.db(), sql, args, limit, cursor)
    now = time.time()
    return store.listing([ledger_sources.source_view(r, now) for r in rows], nxt, total)


@router.post("/sources", status_code=201, openapi_extra=OPERATOR_ONLY)
async def add_source(op: Operator, st: State, body: SourceIn) -> Any:
    """Add a source. Without ``parser_name`` the list is fetched once and the first
    parser whose ``supports()`` fits is kept; nothing is imported until a scrape.

    400 ``VALIDATION_ERROR`` (``details.field``): ``parser_name`` unknown or none fits,
    ``cron_schedule`` invalid, ``url`` not http(s) or (to pick a parser) unreachable.
    """
    fields = check_fields(body.model_dump())
    if fields["parser_name"] is None:
        fields["parser_name"] = await _pick(st, fields["url"])
    fields["next_run_at"] = next_run_at(fields["cron_schedule"], time.time(), _test_seconds(st))
    row = await run_in_threadpool(lambda: ledger_sources.add_source(st.store.db(), fields))
    return ledger_sources.source_view(row, time.time())


@router.get("/sources/{source_id}", openapi_extra=OPERATOR_ONLY)
def get_source(op: Operator, st: State, source_id: SourceId) -> Any:
    """One source: its settings, the last scrape and the next scheduled run."""
    return ledger_sources.source_view(
        ledger_sources.get_source(st.store.db(), source_id), time.time()
    )


@router.patch("/sources/{source_id}", openapi_extra=OPERATOR_ONLY)
def update_source(op: Operator, st: State, source_id: SourceId, body: SourcePatch) -> Any:
    """Change the fields given; a new schedule, or enabling the source, sets the next
    run from now (missed runs are not replayed)."""
    given = body.model_dump(exclude_unset=True)
    for name in ("url", "default_protocol", "default_weight", "is_active", "tags"):
        if name in given and given[name] is None:
            raise validation_error(name, "must not be null")
    changes = check_fields(given)
    test_seconds = _test_seconds(st)
    row = ledger_sources.update_source(
        st.store.db(),
        source_id,
        changes,
        lambda cron: next_run_at(cron, time.time(), test_seconds),
    )
    return ledger_sources.source_view(row, time.time())


@router.delete("/sources/{source_id}", openapi_extra=OPERATOR_ONLY)
def delete_source(op: Operator, st: State, source_id: SourceId) -> Any:
    """Delete a source; the proxies it found stay in the pool (``proxies_kept``)."""
    return ledger_sources.delete_source(st.store.db(), source_id)


@router.post("/sources/{source_id}/scrape", openapi_extra=OPERATOR_ONLY)
async def scrape_source(op: Operator, st: State, source_id: SourceId) -> Any:
    """Scrape now, whatever the schedule: ``{"source_id", "proxies_discovered",
    "proxies_new", "proxies_updated", "proxies_skipped", "proxies_denied",
    "proxies_duplicate", "duration_ms", "parser_name", "error", "error_reason",
    "problems", "scraped_at"}``.

    A list that fails (unreachable, an HTTP error, over 10 MiB, unreadable, empty) is
    still a 200: ``error`` says why, the source's ``last_error`` keeps it, and the
    proxies it found before stay as they were. 429 ``RATE_LIMITED`` while another scrape
    of this source runs (on request or scheduled, on any gateway). A found proxy at a
    loopback, private, link-local or metadata address is skipped and counted in
    ``proxies_denied`` unless the ``source_proxy_allow`` setting opens its range.
    """
    return await scraper(st).scrape(source_id)


for _route in router.routes:  # each says in its description that it needs the key
    if isinstance(_route, APIRoute):
        _route.description += _NOTE
