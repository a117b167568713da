"""Every reach of Datorus into mitmproxy's internals, in one place.

mitmproxy 12.2.3 (pinned in pyproject.toml) gives addons hooks and a documented API.
Datorus needs a few things beyond them: shared listening sockets, bounded HTTP/1 heads,
its own error pages, a cheaper hook dispatch, the sockets of a connection (to count,
cut and route), the values of ``--set`` before its options exist. Each one is a small
function or install step here, named for what it does, whose docstring says which
internal it touches, why Datorus needs it and which test guards it. The feature addons
call these functions and keep their decisions (what to count, which page to write,
when to cut) to themselves; no other module in ``addons/`` touches a mitmproxy
internal (``tests/unit/test_patches.py`` checks that too).

**Upgrading mitmproxy:** ``tests/unit/test_patches.py`` checks that every internal in
the table below still exists with the shape the function here relies on, and fails
with a message naming both; the tests each docstring names show the behaviour it
gives, and that test file checks they exist.

Where the names below live: ``mode_servers``, ``layers``, ``server`` (with
``ConnectionHandler``) and ``context`` are in ``mitmproxy.proxy``; ``_http1``, ``_events``
and ``HttpStream`` in ``mitmproxy.proxy.layers.http``; ``AddonManager`` in
``mitmproxy.addonmanager``; ``connection`` and ``optmanager`` are ``mitmproxy.connection``
and ``mitmproxy.optmanager``; ``Proxyserver`` is the built-in addon
``mitmproxy.addons.proxyserver`` (its ``servers`` a ``Servers``); ``ReceiveBuffer`` and
``blank_line_regex`` are h11's (``h11._receivebuffer``), which mitmproxy's HTTP/1 layers
buffer in. How: *replaced* (ours instead), *wrapped* (ours around mitmproxy's),
*shadowed* (on one instance), *read*, *set*, *called*, *cancelled*, *bypassed*, *built*.
The tests that guard each one are named in its function's docstring.

====  ============================================  ==========  =================================
#     mitmproxy internal                            how         function here (caller)
====  ============================================  ==========  =================================
1     mode_servers.AsyncioServerInstance.listen     replaced    share_listening_sockets
                                                                (serve_worker)
2     _http1.Http1Server.read_headers               wrapped     bound_request_heads (hardening)
3     _http1.Http1Client.read_headers               wrapped     bound_response_heads (hardening)
4     _http1.Http1Server.wait                       wrapped     bound_pipelined_bytes (hardening)
5     HttpStream.state_consume_request_body         wrapped     drop_answered_request_bodies
                                                                (hardening)
6     h11: ReceiveBuffer._data, blank_line_regex    read        head_too_large (for 2 and 3)
7     _http1.make_error_response                    replaced    replace_parse_error_page
                                                                (errors)
8     _http1.Http1Server.send                       wrapped     replace_upstream_error_page
      (for ResponseProtocolError)                               (errors)
9     _events.ErrorCode                             read        client_error (errors)
10    AddonManager.trigger_event,                   shadowed    LeanDispatch (lean)
      handle_lifecycle, register, remove;
      addonmanager.safecall, traverse
11    AddonManager.chain                            read, set   addon_chain, set_addon_chain
                                                                (lean)
12    Proxyserver.connections                       read        open_client_connections
                                                                (handoff); 13-17 too
13    ConnectionHandler.transports[client]          cancelled   cancel_client_connection
      .handler (an asyncio.Task)                                (context: cut_client)
14    ConnectionHandler.transports[server]          cancelled   abort_server_connections
      .handler                                                  (context: abort_upstream)
15    ConnectionHandler.transports[server]          replaced    wrap_server_streams
      .reader, .writer                                          (metering)
16    ConnectionHandler.transports[server]          read        server_streams (egress)
      .reader, .writer
17    ConnectionHandler.close_connection            called      close_server_connections
                                                                (egress)
18    connection.Server.__setattr__                 bypassed    restore_server_address
      (its guard on address)                                    (egress)
19    Proxyserver.servers.update                    called      close_listening_sockets
                                                                (context: stop_listening)
20    Proxyserver.listen_addrs                      called      listening_addresses (handoff)
21    optmanager.OptManager.deferred                read, set   deferred_options (options)
22    context.Context.layers                        read        inside_connect_tunnel (relay)
23    layers.TCPLayer(context, ignore=True)         built       relay_raw_tcp (relay)
24    mode_servers.Socks5Instance.make_top_layer,   replaced,   serve_socks5 (socks)
      layers.modes.Socks5Proxy (subclassed),        built
      layers.HttpLayer(context, HTTPMode.regular)
====  ============================================  ==========  =================================

Patches of a class or module attribute are made with :func:`_replace`: installing twice
wraps mitmproxy's original once, and the returned ``Undo`` puts the original back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import socket
from collections.abc import Callable, Generator
from typing import Any, cast

from h11._receivebuffer import ReceiveBuffer, blank_line_regex
from mitmproxy import ctx, flow, hooks, http
from mitmproxy.addonmanager import AddonManager, safecall, traverse
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.exceptions import AddonHalt
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layers
from mitmproxy.proxy.layers.http import HttpStream, _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ErrorCode, RequestData, ResponseProtocolError

from datorus_core import listeners

log = logging.getLogger("datorus")

Undo = Callable[[], None]
"""Puts back what an install step replaced."""


# -- replacing attributes --------------------------------------------------------------

_originals: dict[tuple[Any, str], Any] = {}


def _replace(owner: Any, attr: str, make: Callable[[Any], Any]) -> Undo:
    """Set ``owner.attr`` to ``make(original)``; return the step that puts the original back.

    Installing twice wraps mitmproxy's original once (not the first wrapper).
    """
    key = (owner, attr)
    original = _originals.setdefault(key, getattr(owner, attr))
    setattr(owner, attr, make(original))

    def undo() -> None:
        if key in _originals:
            setattr(owner, attr, _originals.pop(key))

    return undo


# -- 1. shared listening sockets (datorus serve) ----------------------------------------


async def _shared_listen(self: Any, host: str, port: int) -> list[Any]:
    """``AsyncioServerInstance.listen`` for a ``datorus serve`` worker."""
    from mitmproxy.proxy import mode_servers

    original = _originals[(mode_servers.AsyncioServerInstance, "listen")]
    if self.mode.transport_protocol != "tcp" or not port:
        return await original(self, host, port)
    socks = listeners.take(host, port)
    if socks:
        return [await asyncio.start_server(self.handle_stream, sock=s) for s in socks]
    log.info("datorus: %s:%d was not opened by datorus serve; binding it here", host, port)
    return [await asyncio.start_server(self.handle_stream, host or None, port, reuse_port=True)]


def share_listening_sockets() -> Undo:
    """Make mitmproxy's TCP proxy modes listen on the launcher's shared sockets (idempotent).

    **Internal:** ``mode_servers.AsyncioServerInstance.listen(self, host, port)``, the
    method that opens a proxy mode's listening sockets with
    ``asyncio.start_server(self.handle_stream, host, port)``; replaced.

    **Why:** ``datorus serve`` runs several mitmdump workers that accept on one port,
    and mitmproxy has no option for ``SO_REUSEPORT`` nor for a socket it did not open.
    Patched, a TCP mode serves the sockets its launcher opened and handed down
    (``datorus_core.listeners``: one ``SO_REUSEPORT`` socket per worker slot, kept by
    the launcher, so a restarted worker's queued connections are never reset); for an
    address the launcher did not open, it binds its own socket with ``SO_REUSEPORT``.
    UDP modes, port 0 and every process not started by ``datorus serve`` keep
    mitmproxy's own code. Installed only in workers, by ``addons/serve_worker.py``,
    before mitmproxy starts: mitmproxy opens its sockets before ``-s`` scripts are
    loaded, so an addon would be too late.

    **Guarded by:** ``tests/unit/test_patches.py::
    test_a_patched_regular_mode_serves_the_inherited_socket`` and
    ``tests/e2e/test_serve.py::test_two_workers_share_the_proxy_and_api_ports``.
    """
    from mitmproxy.proxy import mode_servers

    return _replace(mode_servers.AsyncioServerInstance, "listen", lambda _orig: _shared_listen)


# -- 2-6. bounded HTTP/1 heads and bodies (hardening) ----------------------------------


def head_too_large(buf: ReceiveBuffer, limit: int) -> bool:
    """Whether the head at the start of *buf* is (or will be) over *limit* bytes.

    True when more than *limit* bytes are buffered and no blank line ends a head within
    them.

    **Internal:** h11's ``ReceiveBuffer._data`` (the bytes buffered) and its own
    head-end pattern ``h11._receivebuffer.blank_line_regex``, read; mitmproxy's HTTP/1
    layers buffer in h11's ``ReceiveBuffer`` (``Http1Connection.buf``).

    **Why:** the size must be checked before mitmproxy parses: a head that arrives
    whole in the read that completes it would be parsed (and forwarded) before a check
    on what is left in the buffer could see it.

    **Guarded by:** ``tests/unit/test_patches.py::test_head_too_large_reads_h11s_buffer``
    and ``tests/e2e/test_hostile_input.py::
    test_oversized_request_head_is_400_without_waiting_for_its_end``.
    """
    if len(buf) <= limit:
        return False
    return blank_line_regex.search(buf._data, 0, limit) is None


def bound_request_heads(limit: int) -> Undo:
    """A client head over *limit* bytes gets a 400 page and the connection is closed.

    **Internal:** ``_http1.Http1Server.read_headers(self, event)``, the state that
    buffers a request head until its blank line, wrapped; it reads ``self.buf``,
    ``self.conn`` and ``self.state``, and sets ``self.state = self.done``. The page is
    ``_http1.make_error_response(400, ...)``, looked up when it is written: the
    envelope once :func:`replace_parse_error_page` is installed.

    **Why:** mitmproxy buffers a head with no bound at all (``_http1`` says ``FIXME:
    protect against header size DoS``). The size is checked before mitmproxy parses
    (:func:`head_too_large`) and again on what is left after it took a head (the
    start of the next one).

    **Guarded by:** ``tests/e2e/test_hostile_input.py::
    test_request_head_over_64_kib_is_400_envelope_and_never_forwarded``.
    """

    def make(orig: Any) -> Any:
        def read_headers(self: Any, event: events.Event) -> Generator[commands.Command, Any, None]:
            if not (isinstance(event, events.DataReceived) and head_too_large(self.buf, limit)):
                yield from orig(self, event)
                # what is left after mitmproxy took a head (or skipped a blank line) is the
                # start of the next one
                if not (self.state == self.read_headers and len(self.buf) > limit):
                    return
            msg = f"request head larger than {limit} bytes"
            yield commands.SendData(self.conn, _http1.make_error_response(400, msg))
            yield commands.CloseConnection(self.conn)
            self.state = self.done

        return read_headers

    return _replace(_http1.Http1Server, "read_headers", make)


def bound_response_heads(limit: int) -> Undo:
    """A target's head over *limit* bytes closes its connection and fails the request (502).

    **Internal:** ``_http1.Http1Client.read_headers(self, event)``, wrapped; it reads
    ``self.buf``, ``self.stream_id`` and ``self.state``, sets ``self.state =
    self.done``, and yields mitmproxy's own ``ReceiveHttp(ResponseProtocolError(...,
    ErrorCode.GENERIC_SERVER_ERROR))``, which the error page of
    :func:`replace_upstream_error_page` then answers.

    **Why:** as :func:`bound_request_heads`, for the target's side: a target must not
    make the gateway hold an endless head either.

    **Guarded by:** ``tests/e2e/test_hostile_input.py::
    test_target_with_oversized_response_head_is_502``.
    """

    def make(orig: Any) -> Any:
        def read_headers(self: Any, event: events.Event) -> Generator[commands.Command, Any, None]:
            if not (
                isinstance(event, events.DataReceived)
                and self.stream_id is not None
                and head_too_large(self.buf, limit)
            ):
                yield from orig(self, event)
                if not (
                    self.state == self.read_headers
                    and self.stream_id is not None
                    and len(self.buf) > limit
                ):
                    return
            yield commands.CloseConnection(self.conn)
            yield ReceiveHttp(
                ResponseProtocolError(
                    self.stream_id,
                    f"response head larger than {limit} bytes",
                    ErrorCode.GENERIC_SERVER_ERROR,
                )
            )
            self.state = self.done

        return read_headers

    return _replace(_http1.Http1Client, "read_headers", make)


def bound_pipelined_bytes(limit: int) -> Undo:
    """A client that sends more than *limit* bytes while its request is answered is closed.

    **Internal:** ``_http1.Http1Server.wait(self, event)``, the state a server
    connection is in while its request is answered (mitmproxy buffers what arrives
    meanwhile in ``self.buf``), wrapped; sets ``self.state = self.done``.

    **Why:** a client may pipeline a few requests, not park megabytes in the gateway.

    **Guarded by:** ``tests/e2e/test_hostile_input.py::
    test_client_flooding_while_its_request_is_answered_is_disconnected``.
    """

    def make(orig: Any) -> Any:
        def wait(self: Any, event: events.Event) -> Generator[commands.Command, Any, None]:
            yield from orig(self, event)
            if isinstance(event, events.DataReceived) and len(self.buf) > limit:
                yield commands.CloseConnection(self.conn)
                self.state = self.done

        return wait

    return _replace(_http1.Http1Server, "wait", make)


def drop_answered_request_bodies() -> Undo:
    """The body of a request the gateway answered itself is dropped as it comes.

    **Internal:** ``HttpStream.state_consume_request_body(self, event)``, the state
    that collects a (not streamed) request body in ``request_body_buf``, wrapped: a
    ``RequestData`` event of a flow that has a response already (``self.flow``) is
    not passed on.

    **Why:** when Datorus answers before the body arrived (407, 402, 403, 429...),
    mitmproxy would still buffer the whole body before answering.

    **Guarded by:** ``tests/e2e/test_hostile_input.py::
    test_body_of_a_refused_request_is_not_held_in_memory``.
    """

    def make(orig: Any) -> Any:
        def state_consume_request_body(
            self: Any, event: events.Event
        ) -> Generator[commands.Command, Any, None]:
            if isinstance(event, RequestData) and self.flow is not None and self.flow.response:
                return  # answered already (407, 402, 403, 429...): the body is not kept
            yield from orig(self, event)

        return state_consume_request_body

    return _replace(HttpStream, "state_consume_request_body", make)


# -- 7-9. error pages (errors) ----------------------------------------------------------


def replace_parse_error_page(page: Callable[[int, str], http.Response]) -> Undo:
    """mitmproxy's HTML page for a request it cannot parse becomes ``page(status, message)``.

    **Internal:** the module function ``_http1.make_error_response(status_code,
    message="") -> bytes``, which ``Http1Server.read_headers`` (and the other HTTP/1
    paths) look up by name when they answer an unparseable request; replaced. The
    response *page* returns is assembled as HTTP/1 here.

    **Why:** every error leaves as Datorus's envelope, never as mitmproxy's HTML.

    **Guarded by:** ``tests/e2e/test_gateway_core.py::
    test_malformed_request_is_400_validation_error`` and
    ``tests/e2e/test_hostile_input.py::
    test_malformed_request_gets_400_envelope_or_close_and_never_reaches_origin``.
    """

    def make_error_response(status_code: int, message: str = "") -> bytes:
        return http1.assemble_response(page(status_code, message))

    return _replace(_http1, "make_error_response", lambda _orig: make_error_response)


UpstreamPage = Callable[[str, int | None, str, ErrorCode], http.Response | None]


def replace_upstream_error_page(page: UpstreamPage) -> Undo:
    """mitmproxy's HTML page for a failed request becomes ``page(client_id, status, message,
    code)``.

    *page* is called for every ``ResponseProtocolError`` that reaches a client
    connection still open for writing; *status* is the page's status, or ``None``
    when no page can be written (a response has begun, or the error has no HTTP
    status): it then only learns that the request failed. The connection is closed
    after the page, as mitmproxy does.

    **Internal:** ``_http1.Http1Server.send(self, event)``, wrapped for
    ``ResponseProtocolError`` only (every other event goes to mitmproxy's own); it
    reads ``self.conn.state``, ``self.response``, ``self.context.client`` and
    ``event.code.http_status_code()``.

    **Why:** upstream failures (refused, reset, bad response, Datorus's own timeout)
    must leave as the envelope with the flow's request id and the right code; setting
    ``flow.response`` in the ``error`` hook is ignored by mitmproxy.

    **Guarded by:** ``tests/e2e/test_gateway_core.py::
    test_refused_upstream_is_502_upstream_failed`` and ``tests/e2e/test_gateway_core.py::
    test_slow_upstream_is_504_gateway_timeout``.
    """

    def make(orig: Any) -> Any:
        def send_error(self: Any, event: ResponseProtocolError) -> Any:
            if not (self.conn.state & ConnectionState.CAN_WRITE):
                return
            status = event.code.http_status_code()
            resp = page(
                self.context.client.id,
                status if not self.response else None,
                event.message,
                event.code,
            )
            if resp is not None:
                yield commands.SendData(self.conn, http1.assemble_response(resp))
            yield commands.CloseConnection(self.conn)

        def send(self: Any, event: Any) -> Any:
            if type(event) is ResponseProtocolError:
                return send_error(self, event)
            return orig(self, event)

        return send

    return _replace(_http1.Http1Server, "send", make)


_CLIENT_ERRORS = frozenset(
    {
        ErrorCode.GENERIC_CLIENT_ERROR,
        ErrorCode.REQUEST_VALIDATION_FAILED,
        ErrorCode.DESTINATION_UNKNOWN,
        ErrorCode.REQUEST_TOO_LARGE,
        ErrorCode.HTTP_1_1_REQUIRED,
    }
)


def client_error(code: ErrorCode | None) -> bool:
    """Whether mitmproxy's *code* for a failed request says the client's request was at fault.

    **Internal:** ``mitmproxy.proxy.layers.http._events.ErrorCode`` (re-exported here as
    ``ErrorCode``), the kind of failure mitmproxy passes to the page of
    :func:`replace_upstream_error_page`; its client-side members, read.

    **Why:** a request mitmproxy could not make sense of is the client's
    ``VALIDATION_ERROR`` (400), not the target's ``UPSTREAM_FAILED`` (502).

    **Guarded by:** ``tests/e2e/test_hostile_input.py::
    test_malformed_request_gets_400_envelope_or_close_and_never_reaches_origin`` and
    ``tests/e2e/test_gateway_core.py::test_malformed_upstream_response_is_502``.
    """
    return code in _CLIENT_ERRORS


# -- 10-11. lean hook dispatch (lean) ---------------------------------------------------

Group = tuple[Callable[..., Any], ...]


class LeanDispatch:
    """``trigger_event``/``handle_lifecycle`` over cached hook lists.

    **Internal:** ``AddonManager.trigger_event``, ``handle_lifecycle``, ``register``
    and ``remove``, shadowed on the manager *instance* (:meth:`install`; the class is
    untouched); the chain (``AddonManager.chain``) walked with
    ``addonmanager.traverse``, errors handled by ``addonmanager.safecall``, hook
    arguments read from the hook dataclass's fields (``Hook.args()``).

    **Why:** mitmproxy walks all of its ~35 default addons for every event, with a
    generator, a ``getattr``, a context manager and a coroutine per addon and the
    hook's arguments rebuilt per call: the largest item in a profile of the gateway.
    Here the hook functions are looked up once per event name, grouped per chain item,
    with the arguments built once per event. An exception in a group goes through
    mitmproxy's own ``safecall`` (logged, and the next item still runs; ``AddonHalt``
    stops the event), exactly as before. ``register`` and ``remove`` clear the cache.
    ``addons/lean.py`` decides when it is on and which addons stay in the chain.

    **Guarded by:** ``tests/unit/test_lean.py`` (the same hooks in the same order,
    errors, ``AddonHalt``, ``OptionsError``, the cache cleared; the internals' shapes)
    and ``tests/e2e/test_lean_gateway.py::test_gateway_leaves_idle_mitmproxy_addons_out``.
    """

    def __init__(self, manager: AddonManager) -> None:
        self.m = manager
        self.cache: dict[str, list[Group]] = {}
        self.fields: dict[type, tuple[str, ...]] = {}
        self._register, self._remove = manager.register, manager.remove

    def install(self) -> None:
        """Shadow the manager's methods on the instance."""
        m = self.m
        m.trigger_event = self.trigger_event  # type: ignore[method-assign]
        m.handle_lifecycle = self.handle_lifecycle  # type: ignore[method-assign]
        m.register = self.register  # type: ignore[method-assign]
        m.remove = self.remove  # type: ignore[method-assign]
        self.cache.clear()

    def uninstall(self) -> None:
        """Back to mitmproxy's own methods."""
        for name in ("trigger_event", "handle_lifecycle", "register", "remove"):
            self.m.__dict__.pop(name, None)
        self.cache.clear()

    def register(self, addon: Any) -> Any:
        self.cache.clear()
        return self._register(addon)

    def remove(self, addon: Any) -> None:
        self.cache.clear()
        self._remove(addon)

    def groups(self, name: str) -> list[Group]:
        """Per chain item (in order), its hook functions for *name*; items without none."""
        groups = self.cache.get(name)
        if groups is None:
            groups = []
            for item in self.m.chain:
                funcs = tuple(f for a in traverse([item]) if callable(f := getattr(a, name, None)))
                if funcs:
                    groups.append(funcs)
            self.cache[name] = groups
        return groups

    def args(self, event: hooks.Hook) -> list[Any]:
        """``event.args()`` with the dataclass field names looked up once per hook type."""
        names = self.fields.get(type(event))
        if names is None:
            # every mitmproxy hook event is a dataclass (the Hook base class is not one itself)
            fields = dataclasses.fields(cast(Any, event))
            names = self.fields[type(event)] = tuple(f.name for f in fields)
        return [getattr(event, n) for n in names]

    async def trigger_event(self, event: hooks.Hook) -> None:
        groups = self.groups(event.name)
        if not groups:
            return
        args = self.args(event)
        for funcs in groups:
            try:
                for func in funcs:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
            except AddonHalt:
                return
            except Exception:
                # the error path only: mitmproxy's safecall logs it (and re-raises
                # OptionsError) exactly as its own dispatch would
                with safecall():
                    raise

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self.groups("update"):
            message = self.args(event)[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))


def addon_chain(manager: AddonManager) -> list[Any]:
    """The addons mitmproxy calls for every event, in order.

    **Internal:** ``AddonManager.chain``, the list mitmproxy's dispatch walks (every
    registered addon is also in ``AddonManager.lookup``), read.

    **Why:** ``addons/lean.py`` leaves idle default addons out of it.

    **Guarded by:** ``tests/unit/test_lean.py::
    test_idle_default_addons_leave_the_chain_and_the_proxy_core_stays``.
    """
    chain: list[Any] = manager.chain
    return chain


def set_addon_chain(manager: AddonManager, chain: list[Any]) -> None:
    """Make *chain* the addons mitmproxy calls (a new list: a running event keeps its own).

    **Internal:** ``AddonManager.chain``, replaced. **Why:** as :func:`addon_chain`.
    **Guarded by:** ``tests/unit/test_lean.py::
    test_an_addon_whose_option_is_set_stays_and_comes_back_when_set_later``.
    """
    manager.chain = chain


# -- 12-20. connections and listening sockets (context, metering, egress, handoff) ------


def _proxyserver() -> Any:
    """The built-in ``proxyserver`` addon, if loaded (its name is public)."""
    return ctx.master.addons.get("proxyserver")


def _handler(client_id: str) -> Any:
    """mitmproxy's connection handler of a client connection, or None.

    **Internal:** ``Proxyserver.connections`` (client id -> ``ConnectionHandler``), read.
    """
    ps = _proxyserver()
    return ps.connections.get(client_id) if ps else None


def open_client_connections() -> int:
    """How many client connections the proxy has open (0 before it runs).

    **Internal:** ``Proxyserver.connections``, read. **Why:** a handed-off worker exits
    once its client connections are gone. **Guarded by:** ``tests/e2e/test_serve.py::
    test_sighup_under_load_refuses_nothing_and_bills_every_request``.
    """
    ps = _proxyserver()
    return len(ps.connections) if ps is not None else 0


def cancel_client_connection(client_id: str) -> bool:
    """Close a client connection and everything it opened; False if it is gone already.

    **Internal:** ``ConnectionHandler.transports[client].handler``, the task that
    serves the client connection, cancelled (mitmproxy then closes its server
    connections too).

    **Why:** cutting a tunnel or a download from outside the connection (an account run
    dry, a suspension, a slow client's timer, a clean stop): ``flow.kill()`` does
    nothing on a tunnel (mitmproxy issue 4711).

    **Guarded by:** ``tests/e2e/test_billing.py::
    test_tunnel_is_cut_exactly_at_trial_plus_overdraft_bound``,
    ``tests/e2e/test_hostile_input.py::
    test_slowloris_is_closed_after_header_timeout_without_starving_others`` and
    ``tests/e2e/test_limits.py::test_suspension_closes_open_tunnels_and_websockets``.
    """
    h = _handler(client_id)
    if h is None:
        return False
    io = h.transports.get(h.client)
    if io is not None and io.handler is not None:
        io.handler.cancel("datorus cut")
        return True
    return False


def abort_server_connections(client_id: str) -> None:
    """Cancel every server connection of a client connection; the client's stays open.

    **Internal:** ``ConnectionHandler.transports[server].handler`` of every connection
    but the client's, cancelled: mitmproxy then fails the request and the page of
    :func:`replace_upstream_error_page` answers it.

    **Why:** mitmproxy has no upstream timeout (Datorus's timer answers 504), and a
    forward request that runs its account dry before its response is answered 402.

    **Guarded by:** ``tests/e2e/test_gateway_core.py::
    test_slow_upstream_is_504_gateway_timeout`` and ``tests/e2e/test_billing.py::
    test_topped_up_account_below_minimum_is_402_insufficient_balance``.
    """
    h = _handler(client_id)
    if h is None:
        return
    for conn, io in list(h.transports.items()):
        if conn is not h.client and io.handler is not None:
            io.handler.cancel("datorus upstream abort")


def wrap_server_streams(
    client_id: str,
    server: Server,
    wrap_reader: Callable[[Any], Any],
    wrap_writer: Callable[[Any], Any],
) -> bool:
    """Replace a server connection's stream reader and writer by wrappers of them.

    Called in ``server_connected``, before mitmproxy reads or writes a byte; False
    (nothing wrapped) when the connection has no streams.

    **Internal:** ``ConnectionHandler.transports[server].reader`` and ``.writer``
    (``ConnectionIO``), replaced: mitmproxy reads and writes the connection through
    them.

    **Why:** metering counts the bytes that cross at the server connection's socket,
    raw (heads, bodies, framing, tunnel payload), and cuts a flow at exactly the byte
    its account allows; no hook sees every chunk of a passthrough tunnel.

    **Guarded by:** ``tests/e2e/test_billing.py::
    test_forward_get_is_metered_exactly_as_the_origin_saw_it`` and
    ``tests/e2e/test_billing.py::test_tunnel_50mb_tls_download_is_metered_exactly``.
    """
    h = _handler(client_id)
    io = h.transports.get(server) if h is not None else None
    if io is None or io.reader is None:
        return False
    io.reader = wrap_reader(io.reader)
    io.writer = wrap_writer(io.writer)
    return True


def server_streams(client_id: str, server: Server) -> tuple[Any, Any] | None:
    """A server connection's stream reader and writer as mitmproxy holds them, or None.

    **Internal:** ``ConnectionHandler.transports[server].reader`` and ``.writer``, read.

    **Why:** an egress through an upstream proxy runs its CONNECT or SOCKS5 handshake
    on the connection in ``server_connected``, before mitmproxy uses it.

    **Guarded by:** ``tests/e2e/test_egress.py::
    test_upstream_proxies_carry_forward_and_connect``.
    """
    h = _handler(client_id)
    io = h.transports.get(server) if h is not None else None
    if io is None or io.reader is None:
        return None
    return io.reader, io.writer


def close_server_connections(client_id: str, stale: Callable[[Server], bool]) -> None:
    """Close the open server connections of a client connection for which *stale* is true.

    **Internal:** the server connections in ``ConnectionHandler.transports``, closed
    with ``ConnectionHandler.close_connection(connection)``.

    **Why:** mitmproxy reuses a client's server connections by address, not by egress:
    a request whose egress differs from the last one's would leave by the old one.

    **Guarded by:** ``tests/e2e/test_egress.py::
    test_keepalive_connection_switching_sessions``.
    """
    h = _handler(client_id)
    if h is None:
        return
    for conn in list(h.transports):
        if conn is h.client or not getattr(conn, "connected", False):
            continue
        if stale(conn):
            with contextlib.suppress(Exception):
                h.close_connection(conn)


def restore_server_address(server: Server, address: tuple[str, int]) -> None:
    """Set an open server connection's ``address`` (its target, not its peer).

    **Internal:** ``connection.Server.__setattr__`` refuses to change ``address`` on an
    open connection; bypassed by writing the instance's ``__dict__``.

    **Why:** a connection through an upstream proxy is opened to the proxy's address;
    once it is open, mitmproxy's reuse check must see the target again, or the next
    request to the same target opens another connection.

    **Guarded by:** ``tests/unit/test_patches.py::
    test_an_open_servers_address_is_restored_past_its_guard`` and
    ``tests/e2e/test_egress.py::test_upstream_proxies_carry_forward_and_connect``.
    """
    server.__dict__["address"] = address


async def close_listening_sockets() -> None:
    """Close the proxy's listening sockets; the connections already open go on.

    **Internal:** ``Proxyserver.servers.update([])`` (``Servers.update(modes)``: the
    running proxy modes made to match *modes*, here none), called.

    **Why:** at the end of a clean stop's drain, or a handed-off worker's: a client that
    reconnects then is refused at once (or, under ``datorus serve``, accepted by
    another worker) instead of being accepted by a process about to exit.

    **Guarded by:** ``tests/e2e/test_startup.py::
    test_a_stopping_gateway_answers_or_refuses_never_accepts_and_resets``.
    """
    ps = _proxyserver()
    if ps is not None:
        await ps.servers.update([])


def listening_addresses() -> list[Any]:
    """The addresses the proxy listens on; empty if it does not (or is not loaded).

    **Internal:** ``Proxyserver.listen_addrs()``, called (a method of the addon, not in
    mitmproxy's documented API). **Why:** a ``datorus serve`` worker says it is ready
    only once it listens. **Guarded by:** ``tests/e2e/test_serve.py::
    test_two_workers_share_the_proxy_and_api_ports``.
    """
    ps = _proxyserver()
    return list(ps.listen_addrs()) if ps is not None else []


# -- 21. --set values before Datorus's options exist (options) -------------------------


def deferred_options() -> dict[str, Any] | None:
    """The ``--set`` values mitmproxy holds until an option of that name is declared.

    ``None`` if mitmproxy no longer keeps them there. The dict is mitmproxy's own:
    values written into it are what mitmproxy sets once the option exists.

    **Internal:** ``OptManager.deferred`` (name -> unparsed value), read and written.

    **Why:** mitmproxy parses ``--set datorus_*`` only after the addon declared its
    options, and a value it cannot parse then raises inside its script loader, which
    logs it and goes on without the addon: an open proxy. Datorus vets them first.

    **Guarded by:** ``tests/e2e/test_startup.py::
    test_faulty_start_up_stops_with_a_message_and_relays_nothing``.
    """
    deferred: dict[str, Any] | None = getattr(ctx.options, "deferred", None)
    return deferred


# -- 22-23. passthrough tunnels (relay) ------------------------------------------------


def inside_connect_tunnel(nextlayer: Any) -> bool:
    """Whether a ``next_layer`` decision is for the inside of a CONNECT tunnel.

    **Internal:** ``Context.layers`` (the layer stack; its docstring says "not intended
    for use by addons"), read: more than one layer below means a tunnel's inside.

    **Why:** tunnels are passed through as raw TCP, never decrypted.

    **Guarded by:** ``tests/e2e/test_gateway_core.py::
    test_connect_is_passthrough_client_sees_origin_certificate``.
    """
    return len(nextlayer.context.layers) > 1


def relay_raw_tcp(nextlayer: Any) -> None:
    """Relay the connection *nextlayer* is for as raw TCP, without a tcp_message per chunk.

    **Internal:** ``mitmproxy.proxy.layers.TCPLayer(context, ignore=True)``, built and
    set as ``nextlayer.layer`` (a proxy layer, not part of the addon API).

    **Why:** a tunnel's payload passes untouched and unbuffered; metering counts it at
    the socket (:func:`wrap_server_streams`).

    **Guarded by:** ``tests/e2e/test_gateway_core.py::
    test_connect_is_passthrough_client_sees_origin_certificate`` and
    ``tests/e2e/test_billing.py::test_websocket_through_connect_is_metered_exactly``.
    """
    nextlayer.layer = layers.TCPLayer(nextlayer.context, ignore=True)


# -- 24. the SOCKS5 entry as a CONNECT (socks) ----------------------------------------


class SocksGate:
    """What the SOCKS5 entry asks the Datorus addon (``addons/socks.py``): the decisions."""

    def method(self, client: Any, offered: bytes) -> int:
        """The method to select among those *offered* (0xFF: none is acceptable)."""
        raise NotImplementedError

    def connect_head(
        self, client: Any, atyp: int, host: str, port: int, user: str | None, password: str | None
    ) -> bytes | int:
        """The CONNECT request the SOCKS5 request stands for, or a SOCKS5 reply code."""
        raise NotImplementedError

    def answered(self, client: Any, status: int, body: bytes) -> int:
        """The SOCKS5 reply code for the gateway's answer to that CONNECT."""
        raise NotImplementedError

    def reply(self, code: int) -> bytes:
        """The SOCKS5 reply bytes for *code*."""
        raise NotImplementedError

    def unsupported(self, client: Any, reply: int) -> None:
        """A request refused with *reply* before it became a CONNECT (a command other than
        CONNECT, an unknown address type): the gate counts it."""
        raise NotImplementedError


def _socks5_layer_class() -> type:
    """The SOCKS5 top layer: mitmproxy's ``Socks5Proxy``, its request made a CONNECT."""
    from mitmproxy.proxy.layers import modes
    from mitmproxy.proxy.layers.http import HTTPMode

    class Socks5AsConnect(modes.Socks5Proxy):
        """RFC 1928 greeting and RFC 1929 auth as mitmproxy's own layer does them (its
        ``socks5_auth`` hook decides), except that the method is the gate's choice; then
        the request is fed, as the CONNECT it stands for, to mitmproxy's regular HTTP
        layer, whose answer becomes the SOCKS5 reply. After a success the HTTP layer
        carries the tunnel exactly as it carries a CONNECT's."""

        gate: SocksGate

        def __init__(self, context: Any) -> None:
            super().__init__(context)
            self.user: str | None = None
            self.password: str | None = None
            self.answer = b""  # the HTTP answer to the CONNECT, until it is complete
            self.early = b""  # client bytes that came before the reply
            self.outcome: int | None = None  # the reply code sent
            self.child: Any = None

        def state_greet(self) -> Generator[commands.Command, Any, None]:
            if len(self.buf) < 2:
                return
            if self.buf[0] != modes.SOCKS5_VERSION:
                yield from self.socks_err(f"Invalid SOCKS version 0x{self.buf[0]:x}")
                return
            n = self.buf[1]
            if len(self.buf) < 2 + n:
                return
            method = self.gate.method(self.context.client, bytes(self.buf[2 : 2 + n]))
            yield commands.SendData(self.context.client, bytes((modes.SOCKS5_VERSION, method)))
            if method == modes.SOCKS5_METHOD_NO_ACCEPTABLE_METHODS:
                yield commands.CloseConnection(self.context.client)
                self._handle_event = self.done  # type: ignore[method-assign]
                return
            self.buf = self.buf[2 + n :]
            self.state = (  # type: ignore[method-assign]
                self.state_auth
                if method == modes.SOCKS5_METHOD_USER_PASSWORD_AUTHENTICATION
                else self.state_connect
            )
            yield from self.state()

        state = state_greet  # the parent's points at its own greeting

        def state_auth(self) -> Generator[commands.Command, Any, None]:
            if len(self.buf) < 3:
                return
            user_len = self.buf[1]
            if len(self.buf) < 3 + user_len:
                return
            pass_len = self.buf[2 + user_len]
            if len(self.buf) < 3 + user_len + pass_len:
                return
            if self.buf[0] != 0x01:
                yield commands.SendData(self.context.client, b"\x01\x01")
                yield from self.socks_err("unknown RFC 1929 version")
                return
            user = self.buf[2 : 2 + user_len].decode("utf-8", "backslashreplace")
            password = self.buf[3 + user_len : 3 + user_len + pass_len].decode(
                "utf-8", "backslashreplace"
            )
            data = modes.Socks5AuthData(self.context.client, user, password)
            yield modes.Socks5AuthHook(data)
            if not data.valid:
                yield commands.SendData(self.context.client, b"\x01\x01")
                yield from self.socks_err("authentication failed")
                return
            yield commands.SendData(self.context.client, b"\x01\x00")
            self.user, self.password = user, password
            self.buf = self.buf[3 + user_len + pass_len :]
            self.state = self.state_connect  # type: ignore[method-assign]
            yield from self.state()

        def state_connect(self) -> Generator[commands.Command, Any, None]:
            if len(self.buf) < 5:
                return
            if self.buf[:3] != b"\x05\x01\x00":
                self.gate.unsupported(self.context.client, modes.SOCKS5_REP_COMMAND_NOT_SUPPORTED)
                yield from self.socks_err(
                    "unsupported SOCKS5 command", modes.SOCKS5_REP_COMMAND_NOT_SUPPORTED
                )
                return
            atyp = self.buf[3]
            if atyp == modes.SOCKS5_ATYP_IPV4_ADDRESS:
                size = 4 + 4 + 2
            elif atyp == modes.SOCKS5_ATYP_IPV6_ADDRESS:
                size = 4 + 16 + 2
            elif atyp == modes.SOCKS5_ATYP_DOMAINNAME:
                size = 4 + 1 + self.buf[4] + 2
            else:
                self.gate.unsupported(
                    self.context.client, modes.SOCKS5_REP_ADDRESS_TYPE_NOT_SUPPORTED
                )
                yield from self.socks_err(
                    f"unknown address type {atyp}", modes.SOCKS5_REP_ADDRESS_TYPE_NOT_SUPPORTED
                )
                return
            if len(self.buf) < size:
                return
            msg, self.early, self.buf = self.buf[:size], self.buf[size:], b""
            if atyp == modes.SOCKS5_ATYP_IPV4_ADDRESS:
                host = socket.inet_ntop(socket.AF_INET, msg[4:-2])
            elif atyp == modes.SOCKS5_ATYP_IPV6_ADDRESS:
                host = socket.inet_ntop(socket.AF_INET6, msg[4:-2])
            else:
                host = msg[5:-2].decode("ascii", "replace")
            port = int.from_bytes(msg[-2:], "big")
            head = self.gate.connect_head(
                self.context.client, atyp, host, port, self.user, self.password
            )
            self.password = None
            if isinstance(head, int):
                yield from self.socks_err(f"refused SOCKS5 target {host!r}", head)
                return
            self.child = layers.HttpLayer(self.context, HTTPMode.regular)
            self._handle_event = self.relay  # type: ignore[method-assign]
            yield from self.to_http(events.Start())
            yield from self.to_http(events.DataReceived(self.context.client, head))

        def relay(self, event: events.Event) -> Generator[commands.Command, Any, None]:
            """An event while the CONNECT is judged: the client's bytes wait for the reply."""
            if (
                self.outcome is None
                and isinstance(event, events.DataReceived)
                and event.connection == self.context.client
            ):
                self.early += event.data
                return
            yield from self.to_http(event)

        def to_http(self, event: events.Event) -> Generator[commands.Command, Any, None]:
            """*event* to the HTTP layer; its answer to the client made a SOCKS5 reply."""
            client = self.context.client
            succeeded = False
            for cmd in self.child.handle_event(event):
                to_client = (
                    isinstance(cmd, commands.SendData | commands.CloseConnection)
                    and cmd.connection == client
                )
                if self.outcome is None and to_client:
                    code = None
                    if isinstance(cmd, commands.SendData):
                        self.answer += cmd.data
                        code = self._settle()
                    else:  # closed without a (whole) answer: a general failure
                        code = self.outcome = self.gate.answered(client, 0, b"")
                    if code is not None:
                        yield commands.SendData(client, self.gate.reply(code))
                        if code:
                            yield commands.CloseConnection(client)
                        else:
                            succeeded = True
                    continue  # the HTTP answer itself never reaches the client
                if self.outcome and to_client:
                    continue  # refused: the client is closed already
                yield cmd
            if succeeded:
                # the tunnel: from here the HTTP layer gets every event directly
                self.handle_event = self.child.handle_event  # type: ignore[method-assign]
                if self.early:
                    early, self.early = self.early, b""
                    yield from self.child.handle_event(events.DataReceived(client, early))

        def _settle(self) -> int | None:
            """The reply code once the CONNECT's answer is complete (head and body)."""
            head, sep, body = self.answer.partition(b"\r\n\r\n")
            if not sep:
                return None
            lines = head.split(b"\r\n")
            try:
                status = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                status = 502
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and value.strip().isdigit():
                    length = int(value.strip())
            if len(body) < length:
                return None
            self.outcome = self.gate.answered(self.context.client, status, body[:length])
            self.answer = b""
            return self.outcome

    return Socks5AsConnect


def serve_socks5(gate: SocksGate) -> Undo:
    """mitmproxy's SOCKS5 mode serves Datorus's SOCKS5 entry: each request a CONNECT.

    **Internal:** ``mode_servers.Socks5Instance.make_top_layer(self, context)``, which
    builds the top layer of a SOCKS5 connection, replaced: it builds a subclass of
    ``layers.modes.Socks5Proxy`` (its constants, ``Socks5AuthData``/``Socks5AuthHook``,
    ``socks_err``, ``done``, ``buf`` and ``state`` used) whose request feeds a
    ``layers.HttpLayer(context, HTTPMode.regular)`` it builds, filtering that layer's
    commands to the client (``SendData``/``CloseConnection``) until its answer is in.

    **Why:** mitmproxy's SOCKS5 layer asks for username/password only when its own
    ``proxyauth`` option is set (which also turns on its proxyauth for HTTP: mitmproxy
    issue 5028), never accepts "no authentication" per client address, and always
    replies 0x04 when the connection fails. Datorus needs the method chosen per client
    (allow-listed addresses), and everything a CONNECT gets (auth, acceptable use,
    limits, billing, egress, sessions, timeouts) with each refusal as its SOCKS5 reply:
    turning the request into the CONNECT it means keeps every decision in one home.

    **Guarded by:** ``tests/unit/test_patches.py::
    test_socks5_internals_have_the_shape_the_entry_needs`` and ``tests/e2e/test_socks5.py::
    test_refused_upstream_is_0x05_unresolvable_is_0x04`` (and the rest of that file).
    """
    from mitmproxy.proxy import mode_servers

    cls: Any = _socks5_layer_class()
    cls.gate = gate

    def make(_orig: Any) -> Any:
        def make_top_layer(self: Any, context: Any) -> Any:
            return cls(context)

        return make_top_layer

    return _replace(mode_servers.Socks5Instance, "make_top_layer", make)
