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
``handle_lifecycle``, ``safecall``, ``traverse``), touched only in ``addons/patches.py``
(``addon_chain``, ``set_addon_chain``, ``LeanDispatch``): this module decides which
addons are idle. mitmproxy is pinned, and ``tests/unit/test_lean.py`` and
``tests/unit/test_patches.py`` fail when an upgrade changes them. ``datorus_lean=false``
turns all of this off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, hooks
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

from .context import Gateway
from .patches import LeanDispatch, addon_chain, set_addon_chain

log = logging.getLogger("datorus")


def _http_modes_only(o: Any) -> bool:
    # the SOCKS5 entry's requests become CONNECTs: no DNS mode, no reverse mode
    kinds = ("regular", "upstream", "socks5")
    return all(m.split(":", 1)[0].split("@", 1)[0] in kinds for m in o.mode)


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
            set_addon_chain(m, self.full + [a for a in addon_chain(m) if a not in self.full])
        self.full = list(addon_chain(m))
        keep: list[Any] = []
        self.dropped = []
        for a in addon_chain(m):
            idle = IDLE.get(type(a))
            (self.dropped if idle is not None and idle(o) else keep).append(a)
        set_addon_chain(m, keep)
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
        before = {id(a) for a in addon_chain(m)}
        self.trim()
        # an addon back in the chain missed this configure event (and any while it was
        # out): give it every option, as at start-up
        everything = set(ctx.options.keys())
        for a in addon_chain(m):
            if id(a) not in before:
                m.invoke_addon_sync(a, hooks.ConfigureHook(everything))
