"""Lean hook dispatch: only the mitmproxy addons and hooks Datorus needs on the hot path.

mitmdump loads about 35 default addons, and for every event (four or more per forward
request, nine per tunnel) mitmproxy walks all of them: a generator over each addon's
sub-addons, a ``getattr`` for the hook, a context manager and a coroutine per addon,
and ``Hook.args()`` rebuilt per call. That dispatch, not the addons' own code, was the
largest item in a profile of the gateway under load. Two things take it away:

1. **Idle addons leave the chain** once the gateway runs: an addon whose feature is off
   (``anticache``, ``map_local``, ``save_stream_file``, ... at their defaults), or that
   only offers commands nobody calls in ``mitmdump`` (``cut``, ``export``, ...), is
   dropped from ``addons.chain`` (it stays in ``addons.lookup``). Turn a feature on with
   ``--set`` and its addon stays; change such an option at run time and the full chain
   comes back and is trimmed again. Always kept: the proxy server, ``next_layer``,
   ``tlsconfig``, the script loader (Datorus itself), ``termlog``, ``block`` and
   ``disable_h2c``, and every addon this module does not know.
2. **Hook functions are looked up once per event name**, not per event: the manager's
   ``trigger_event`` and ``handle_lifecycle`` are replaced on the instance by versions
   that call a cached list of bound hooks, grouped per chain item, with the hook's
   arguments built once per event. An exception in a group goes through mitmproxy's own
   ``safecall`` (logged, and the next item still runs; ``AddonHalt`` stops the event),
   exactly as before, without its context manager on every call. ``register`` and
   ``remove`` clear the cache.

Both lean on mitmproxy internals (*internal*: ``AddonManager.chain``, ``trigger_event``,
``handle_lifecycle``, ``safecall``, ``traverse``); mitmproxy is pinned and
``tests/unit/test_lean.py`` fails when an upgrade changes them. ``datorus_lean=false``
turns all of this off.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any, cast

from mitmproxy import ctx, flow, hooks
from mitmproxy.addonmanager import AddonManager, safecall, traverse
from mitmproxy.addons import (
    anticache,
    anticomp,
    blocklist,
    browser,
    clientplayback,
    command_history,
    comment,
    core,
    cut,
    dns_resolver,
    dumper,
    errorcheck,
    export,
    keepserving,
    maplocal,
    mapremote,
    modifybody,
    modifyheaders,
    onboarding,
    proxyauth,
    readfile,
    save,
    savehar,
    serverplayback,
    stickyauth,
    stickycookie,
    strip_dns_https_records,
    update_alt_svc,
    upstream_auth,
)
from mitmproxy.exceptions import AddonHalt

from .context import Gateway

log = logging.getLogger("datorus")


def _http_modes_only(o: Any) -> bool:
    return all(m.split(":", 1)[0].split("@", 1)[0] in ("regular", "upstream") for m in o.mode)


# addon class -> "idle with these options" (safe to leave out of the chain)
IDLE: dict[type, Callable[[Any], bool]] = {
    core.Core: lambda o: True,  # option checks at start-up and commands
    browser.Browser: lambda o: True,  # commands only
    command_history.CommandHistory: lambda o: True,
    comment.Comment: lambda o: True,
    cut.Cut: lambda o: True,
    export.Export: lambda o: True,
    errorcheck.ErrorCheck: lambda o: True,  # start-up only
    keepserving.KeepServing: lambda o: not o.rfile and not o.client_replay,
    readfile.ReadFileStdin: lambda o: not o.rfile,
    onboarding.Onboarding: lambda o: True,  # a gateway forwards mitm.it like any host
    clientplayback.ClientPlayback: lambda o: not o.client_replay,
    serverplayback.ServerPlayback: lambda o: not o.server_replay,
    proxyauth.ProxyAuth: lambda o: not o.proxyauth,  # Datorus authenticates itself
    blocklist.BlockList: lambda o: not o.block_list,
    anticache.AntiCache: lambda o: not o.anticache,
    anticomp.AntiComp: lambda o: not o.anticomp,
    mapremote.MapRemote: lambda o: not o.map_remote,
    maplocal.MapLocal: lambda o: not o.map_local,
    modifybody.ModifyBody: lambda o: not o.modify_body,
    modifyheaders.ModifyHeaders: lambda o: not o.modify_headers,
    stickyauth.StickyAuth: lambda o: not o.stickyauth,
    stickycookie.StickyCookie: lambda o: not o.stickycookie,
    save.Save: lambda o: not o.save_stream_file,
    savehar.SaveHar: lambda o: not o.hardump,
    upstream_auth.UpstreamAuth: lambda o: not o.upstream_auth,
    update_alt_svc.UpdateAltSvc: _http_modes_only,  # reverse mode only
    dns_resolver.DnsResolver: _http_modes_only,
    strip_dns_https_records.StripDnsHttpsRecords: _http_modes_only,
    dumper.Dumper: lambda o: o.flow_detail == 0,  # -q: it prints nothing
}
WATCHED = {
    "rfile", "client_replay", "server_replay", "proxyauth", "block_list", "anticache",
    "anticomp", "map_remote", "map_local", "modify_body", "modify_headers", "stickyauth",
    "stickycookie", "save_stream_file", "hardump", "upstream_auth", "mode", "flow_detail",
}  # fmt: skip

Group = tuple[Callable[..., Any], ...]


class LeanDispatch:
    """``trigger_event``/``handle_lifecycle`` over cached hook lists (*internal*)."""

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


class Lean:
    """Trim the addon chain and install the cached dispatch when the gateway runs."""

    name = "datorus_lean"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.dispatch: LeanDispatch | None = None
        self.dropped: list[Any] = []
        self.full: list[Any] | None = None

    def running(self) -> None:
        if not self.gw.settings.get("lean", True):
            return
        # aiosqlite logs every statement at DEBUG, and mitmproxy's root logger lets it through
        logging.getLogger("aiosqlite").setLevel(logging.WARNING)
        m = ctx.master.addons
        self.dispatch = LeanDispatch(m)
        self.dispatch.install()
        self.trim()

    def trim(self) -> None:
        """Drop idle addons from the chain (a new list: a running event is unaffected)."""
        m, o = ctx.master.addons, ctx.options
        if self.full is not None:  # start again from everything that was there
            m.chain = self.full + [a for a in m.chain if a not in self.full]
        self.full = list(m.chain)
        keep: list[Any] = []
        self.dropped = []
        for a in m.chain:
            idle = IDLE.get(type(a))
            (self.dropped if idle is not None and idle(o) else keep).append(a)
        m.chain = keep
        if self.dispatch is not None:
            self.dispatch.cache.clear()
        log.info(
            "datorus: lean dispatch on; %d mitmproxy addons idle and left out: %s",
            len(self.dropped),
            ", ".join(sorted(type(a).__name__ for a in self.dropped)),
        )

    def configure(self, updated: set[str]) -> None:
        if self.full is None or not updated & WATCHED:
            return
        m = ctx.master.addons
        before = {id(a) for a in m.chain}
        self.trim()
        # an addon back in the chain missed this configure event (and any while it was
        # out): give it every option, as at start-up
        everything = set(ctx.options.keys())
        for a in m.chain:
            if id(a) not in before:
                m.invoke_addon_sync(a, hooks.ConfigureHook(everything))
