"""Guards of ``addons/patches.py``: every mitmproxy internal it touches still has the shape
it was written against (an upgrade that changes one fails here, naming it, not in
production), its table and docstrings name real tests, and no other addon module
reaches into mitmproxy's internals."""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import version
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.proxy import mode_servers
from mitmproxy.proxy.layers.http import _http1

from addons import patches
from datorus_core import listeners
from datorus_core.workers import LISTEN_FDS_ENV


def test_mitmproxy_is_the_version_the_patch_was_written_for():
    assert version.VERSION == "12.2.3"


def test_mitmproxy_still_opens_tcp_modes_with_start_server_in_listen():
    src = inspect.getsource(mode_servers.AsyncioServerInstance.listen)
    assert "asyncio.start_server(self.handle_stream, host, port)" in src
    assert list(inspect.signature(mode_servers.AsyncioServerInstance.listen).parameters) == [
        "self",
        "host",
        "port",
    ]
    start = inspect.getsource(mode_servers.AsyncioServerInstance._start)
    assert "self._servers = await self.listen(host, port)" in start


def test_install_swaps_listen_and_uninstall_restores_it():
    original = mode_servers.AsyncioServerInstance.listen
    uninstall = patches.share_listening_sockets()
    patches.share_listening_sockets()  # idempotent
    try:
        assert mode_servers.AsyncioServerInstance.listen is patches._shared_listen
    finally:
        uninstall()
    assert mode_servers.AsyncioServerInstance.listen is original


def test_a_patched_regular_mode_serves_the_inherited_socket(monkeypatch):
    """The patched listen of a real RegularInstance accepts on the launcher's socket."""
    shared = listeners.open_shared("127.0.0.1", 0)
    port = shared[0].getsockname()[1]
    monkeypatch.setenv(LISTEN_FDS_ENV, listeners.encode([("127.0.0.1", port, shared)]))
    fd = shared[0].fileno()

    class Mode:
        transport_protocol = "tcp"

    class Fake:
        mode = Mode()

        async def handle_stream(self, reader, writer):  # noqa: ANN001
            writer.write(b"hi")
            await writer.drain()
            writer.close()

    async def run() -> bytes:
        uninstall = patches.share_listening_sockets()
        try:
            servers = await mode_servers.AsyncioServerInstance.listen(Fake(), "127.0.0.1", port)
        finally:
            uninstall()
        assert [s.sockets[0].fileno() for s in servers] == [fd]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await reader.read(2)
        writer.close()
        for s in servers:
            s.close()
        return data

    assert shared[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert asyncio.run(run()) == b"hi"
    shared[0].detach()  # the server closed the descriptor it took over


# -- every internal in addons/patches.py's table, as the function there relies on it ----

PROXY = "mitmproxy.proxy"
HTTP1 = "mitmproxy.proxy.layers.http._http1"
PROXYSERVER = "mitmproxy.addons.proxyserver"


@dataclass(frozen=True)
class Shape:
    """An internal of addons/patches.py's table: *path* in *module* exists; a callable
    takes exactly *params* (None: not checked); each of *attrs* is on it."""

    number: int
    module: str
    path: str
    function: str
    params: tuple[str, ...] | None = None
    attrs: tuple[str, ...] = ()


SHAPES = [
    Shape(1, f"{PROXY}.mode_servers", "AsyncioServerInstance.listen", "share_listening_sockets",
          ("self", "host", "port")),
    Shape(1, f"{PROXY}.mode_servers", "AsyncioServerInstance", "share_listening_sockets",
          attrs=("handle_stream", "mode", "_start")),
    Shape(2, HTTP1, "Http1Server.read_headers", "bound_request_heads", ("self", "event")),
    Shape(2, HTTP1, "Http1Server", "bound_request_heads",
          attrs=("buf", "conn", "state", "done", "read_headers")),
    Shape(3, HTTP1, "Http1Client.read_headers", "bound_response_heads", ("self", "event")),
    Shape(3, HTTP1, "Http1Client", "bound_response_heads",
          attrs=("buf", "conn", "state", "done", "stream_id")),
    Shape(4, HTTP1, "Http1Server.wait", "bound_pipelined_bytes", ("self", "event")),
    Shape(5, f"{PROXY}.layers.http", "HttpStream.state_consume_request_body",
          "drop_answered_request_bodies", ("self", "event")),
    Shape(5, f"{PROXY}.layers.http", "HttpStream", "drop_answered_request_bodies",
          attrs=("flow",)),
    Shape(6, "h11._receivebuffer", "ReceiveBuffer", "head_too_large", attrs=("_data",)),
    Shape(6, "h11._receivebuffer", "blank_line_regex", "head_too_large", attrs=("search",)),
    Shape(7, HTTP1, "make_error_response", "replace_parse_error_page",
          ("status_code", "message")),
    Shape(8, HTTP1, "Http1Server.send", "replace_upstream_error_page", ("self", "event")),
    Shape(8, HTTP1, "Http1Server", "replace_upstream_error_page",
          attrs=("conn", "context", "response")),
    Shape(8, f"{PROXY}.layers.http._events", "ResponseProtocolError",
          "replace_upstream_error_page", attrs=("code", "message", "stream_id")),
    Shape(9, f"{PROXY}.layers.http._events", "ErrorCode", "client_error",
          attrs=("GENERIC_CLIENT_ERROR", "REQUEST_VALIDATION_FAILED", "DESTINATION_UNKNOWN",
                 "REQUEST_TOO_LARGE", "HTTP_1_1_REQUIRED", "GENERIC_SERVER_ERROR",
                 "http_status_code")),
    Shape(10, "mitmproxy.addonmanager", "AddonManager.trigger_event", "LeanDispatch",
          ("self", "event")),
    Shape(10, "mitmproxy.addonmanager", "AddonManager.handle_lifecycle", "LeanDispatch",
          ("self", "event")),
    Shape(10, "mitmproxy.addonmanager", "AddonManager.register", "LeanDispatch",
          ("self", "addon")),
    Shape(10, "mitmproxy.addonmanager", "AddonManager.remove", "LeanDispatch",
          ("self", "addon")),
    Shape(10, "mitmproxy.addonmanager", "safecall", "LeanDispatch", ()),
    Shape(10, "mitmproxy.addonmanager", "traverse", "LeanDispatch", ("chain",)),
    Shape(11, "mitmproxy.addonmanager", "AddonManager", "addon_chain", attrs=("chain",)),
    Shape(12, PROXYSERVER, "Proxyserver", "open_client_connections", attrs=("connections",)),
    Shape(13, f"{PROXY}.server", "ConnectionHandler", "cancel_client_connection",
          attrs=("transports", "client")),
    Shape(13, f"{PROXY}.server", "ConnectionIO", "cancel_client_connection",
          attrs=("handler",)),
    Shape(14, f"{PROXY}.server", "ConnectionIO", "abort_server_connections",
          attrs=("handler",)),
    Shape(15, f"{PROXY}.server", "ConnectionIO", "wrap_server_streams",
          attrs=("reader", "writer")),
    Shape(16, f"{PROXY}.server", "ConnectionIO", "server_streams", attrs=("reader", "writer")),
    Shape(17, f"{PROXY}.server", "ConnectionHandler.close_connection",
          "close_server_connections", ("self", "connection", "half_close")),
    Shape(18, "mitmproxy.connection", "Server.__setattr__", "restore_server_address",
          ("self", "name", "value")),
    Shape(19, PROXYSERVER, "Proxyserver", "close_listening_sockets", attrs=("servers",)),
    Shape(19, PROXYSERVER, "Servers.update", "close_listening_sockets", ("self", "modes")),
    Shape(20, PROXYSERVER, "Proxyserver.listen_addrs", "listening_addresses", ("self",)),
    Shape(21, "mitmproxy.optmanager", "OptManager", "deferred_options",
          attrs=("deferred", "process_deferred")),
    Shape(22, f"{PROXY}.context", "Context", "inside_connect_tunnel", attrs=("layers",)),
    Shape(23, f"{PROXY}.layers", "TCPLayer.__init__", "relay_raw_tcp",
          ("self", "context", "ignore")),
    Shape(24, f"{PROXY}.mode_servers", "Socks5Instance.make_top_layer", "serve_socks5",
          ("self", "context")),
    Shape(24, f"{PROXY}.layers.modes", "Socks5Proxy", "serve_socks5",
          attrs=("buf", "state", "state_greet", "state_auth", "state_connect", "socks_err",
                 "done", "_handle_event")),
    Shape(24, f"{PROXY}.layers.modes", "Socks5AuthData", "serve_socks5",
          attrs=("client_conn", "username", "password", "valid")),
    Shape(24, f"{PROXY}.layers.modes", "Socks5AuthHook", "serve_socks5", attrs=("data",)),
    Shape(24, f"{PROXY}.layers", "modes", "serve_socks5",
          attrs=("SOCKS5_VERSION", "SOCKS5_METHOD_NO_ACCEPTABLE_METHODS",
                 "SOCKS5_METHOD_USER_PASSWORD_AUTHENTICATION", "SOCKS5_ATYP_IPV4_ADDRESS",
                 "SOCKS5_ATYP_IPV6_ADDRESS", "SOCKS5_ATYP_DOMAINNAME",
                 "SOCKS5_REP_COMMAND_NOT_SUPPORTED", "SOCKS5_REP_ADDRESS_TYPE_NOT_SUPPORTED")),
    Shape(24, f"{PROXY}.layers", "HttpLayer.__init__", "serve_socks5",
          ("self", "context", "mode")),
]  # fmt: skip


def _has(obj: object, name: str) -> bool:
    """Whether *name* is an attribute of *obj*: a class attribute, a class annotation, or
    assigned to ``self`` in the source of the class or its bases (instance attributes)."""
    if hasattr(obj, name):
        return True
    if not inspect.isclass(obj):
        return False
    for klass in obj.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return True
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(name)}\s*(:[^=\n]+)?=", src):
            return True
    return False


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.number}-{s.path}")
def test_each_internal_still_has_the_shape_its_patch_relies_on(shape: Shape) -> None:
    where = f"mitmproxy {version.VERSION}: {shape.module}.{shape.path}"
    why = f"addons/patches.py {shape.function} (table row {shape.number}) relies on it"
    try:
        obj: object = importlib.import_module(shape.module)
    except ImportError as e:
        pytest.fail(f"{where}: module gone ({e}); {why}")
    for part in shape.path.split("."):
        assert hasattr(obj, part), f"{where}: no {part!r} any more; {why}"
        obj = getattr(obj, part)
    if shape.params is not None:
        assert callable(obj), f"{where}: not callable any more; {why}"
        got = list(inspect.signature(obj).parameters)  # type: ignore[arg-type]
        assert got == list(shape.params), f"{where}: takes {got}, not {list(shape.params)}; {why}"
    missing = [a for a in shape.attrs if not _has(obj, a)]
    assert not missing, f"{where}: has no {', '.join(missing)} any more; {why}"


def test_the_table_and_the_shapes_name_the_same_internals() -> None:
    doc = patches.__doc__ or ""
    rows = {int(m.group(1)) for m in re.finditer(r"^(\d+)\s{2,}\S", doc, re.MULTILINE)}
    assert rows == {s.number for s in SHAPES}, "every table row has its shapes checked here"
    for s in SHAPES:
        assert s.function in doc, f"{s.function} is missing from the table"
        assert callable(getattr(patches, s.function, None)), f"patches.{s.function} is gone"


GUARD = re.compile(r"``(tests/[\w/]+\.py)::\s*(test_\w+)``")


def test_every_patch_names_its_guards_and_they_exist() -> None:
    """Each function of the table says which tests guard it, and those tests exist."""
    root = Path(__file__).resolve().parents[2]
    for name in sorted({s.function for s in SHAPES}):
        doc = inspect.getdoc(getattr(patches, name)) or ""
        guards = GUARD.findall(doc)
        assert guards, f"patches.{name}: its docstring names no guarding test"
        assert "**Internal:**" in doc and "**Why:**" in doc, f"patches.{name}: say what and why"
        for path, test in guards:
            src = (root / path).read_text()
            assert re.search(rf"^(async )?def {test}\(", src, re.MULTILINE), (
                f"patches.{name} names {path}::{test}, which does not exist"
            )


# what only addons/patches.py may do in addons/: import mitmproxy's proxy layers and
# internals or h11, use a connection handler's transports, write an object's __dict__,
# use the proxyserver addon's state, the addon chain, or the --set values mitmproxy holds
INTERNAL_MODULES = ("mitmproxy.proxy", "mitmproxy.addonmanager", "mitmproxy.connection", "h11")
INTERNAL_ATTRS = {"transports", "__dict__", "connections", "servers", "chain", "deferred"}


def reaches(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each reach into mitmproxy's internals in a module's code."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith(INTERNAL_MODULES):
                    found.append((node.lineno, f"imports {name}"))
        elif isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRS:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Constant) and node.value == "proxyserver":
            found.append((node.lineno, '"proxyserver"'))
    return found


def test_no_other_addon_module_reaches_into_mitmproxy() -> None:
    root = Path(__file__).resolve().parents[2] / "addons"
    found = [
        f"addons/{path.name}:{line}: {what}"
        for path in sorted(root.glob("*.py"))
        if path.name != "patches.py"
        for line, what in reaches(ast.parse(path.read_text()))
    ]
    assert not found, "mitmproxy internals outside addons/patches.py:\n" + "\n".join(found)


def test_the_reach_finder_sees_what_patches_does() -> None:
    """The check above can fail: it finds patches.py's own reaches."""
    source = (Path(__file__).resolve().parents[2] / "addons" / "patches.py").read_text()
    whats = {what for _line, what in reaches(ast.parse(source))}
    assert {".transports", ".__dict__", ".chain", '"proxyserver"'} <= whats
    assert "imports mitmproxy.proxy.layers.http._http1" not in whats  # from ... import _http1
    assert "imports mitmproxy.proxy.layers.http" in whats


# -- the patches' own behaviour on real mitmproxy objects ----------------------------------


def test_head_too_large_reads_h11s_buffer() -> None:
    buf = ReceiveBuffer()
    buf += b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 100
    assert not patches.head_too_large(buf, 200)  # under the limit: not yet
    assert patches.head_too_large(buf, 50)  # over it with no blank line within it
    buf += b"\r\n\r\nGET / HTTP/1.1\r\n"
    assert not patches.head_too_large(buf, 130)  # a head ends within the limit
    assert patches.head_too_large(buf, 100)  # ... but not within these 100 bytes


def test_an_open_servers_address_is_restored_past_its_guard() -> None:
    server = Server(address=("proxy.example", 3128))
    server.state = ConnectionState.OPEN
    with pytest.raises(RuntimeError):
        server.address = ("target.example", 443)  # mitmproxy's guard: still there
    patches.restore_server_address(server, ("target.example", 443))
    assert server.address == ("target.example", 443)


def test_parse_error_pages_are_found_by_name_and_upstream_ones_in_send() -> None:
    """The replaced page is looked up by name when written; send writes the upstream one."""
    reads = inspect.getsource(_http1.Http1Server.read_headers)
    assert "make_error_response(" in reads and "_http1.make_error_response" not in reads
    send = inspect.getsource(_http1.Http1Server.send)
    assert "elif isinstance(event, ResponseProtocolError):" in send
    assert "event.code.http_status_code()" in send and "if not self.response" in send


def test_installing_twice_wraps_once_and_undo_restores_mitmproxy() -> None:
    original = _http1.Http1Server.wait
    undo = patches.bound_pipelined_bytes(10)
    wrapped = _http1.Http1Server.wait
    patches.bound_pipelined_bytes(10)
    try:
        assert _http1.Http1Server.wait is not original
        assert _http1.Http1Server.wait.__code__ is wrapped.__code__  # not a wrapper's wrapper
        assert patches._originals[(_http1.Http1Server, "wait")] is original
    finally:
        undo()
    assert _http1.Http1Server.wait is original
    undo()  # twice: nothing left to restore
    assert _http1.Http1Server.wait is original


# -- 24. the SOCKS5 entry ------------------------------------------------------------------


class _Gate(patches.SocksGate):
    """A gate that refuses "no authentication" and accepts username/password."""

    def method(self, client, offered: bytes) -> int:  # noqa: ANN001
        return 0x02 if 0x02 in offered else 0xFF

    def reply(self, code: int) -> bytes:
        return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


def _socks_layer():
    from mitmproxy import options
    from mitmproxy.proxy import context
    from mitmproxy.test import tflow

    made = []

    class Instance:
        pass

    undo = patches.serve_socks5(_Gate())
    try:
        ctx = context.Context(tflow.tclient_conn(), options.Options())
        layer = mode_servers.Socks5Instance.make_top_layer(Instance(), ctx)
        made.append(layer)
    finally:
        undo()
    return made[0], ctx


def test_socks5_internals_have_the_shape_the_entry_needs() -> None:
    """The patched SOCKS5 mode builds Datorus's layer (a ``Socks5Proxy``), which picks the
    method the gate chooses, asks the ``socks5_auth`` hook, and closes on 0xFF."""
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers import modes

    original = mode_servers.Socks5Instance.make_top_layer
    layer, ctx = _socks_layer()
    assert mode_servers.Socks5Instance.make_top_layer is original  # undone
    assert isinstance(layer, modes.Socks5Proxy) and type(layer) is not modes.Socks5Proxy
    assert layer.state.__func__ is type(layer).state_greet  # not the parent's greeting
    list(layer.handle_event(events.Start()))
    cmds = list(layer.handle_event(events.DataReceived(ctx.client, b"\x05\x01\x00")))
    sent = [c.data for c in cmds if isinstance(c, commands.SendData)]
    assert sent == [b"\x05\xff"]
    assert any(isinstance(c, commands.CloseConnection) for c in cmds)
    layer, ctx = _socks_layer()
    list(layer.handle_event(events.Start()))
    cmds = list(layer.handle_event(events.DataReceived(ctx.client, b"\x05\x02\x00\x02")))
    assert [c.data for c in cmds if isinstance(c, commands.SendData)] == [b"\x05\x02"]
    cmds = list(layer.handle_event(events.DataReceived(ctx.client, b"\x01\x01u\x01p")))
    hooks = [c for c in cmds if isinstance(c, modes.Socks5AuthHook)]
    assert len(hooks) == 1 and (hooks[0].data.username, hooks[0].data.password) == ("u", "p")
