"""Lean dispatch: the trimmed chain and the cached hook calls behave like mitmproxy's own.

Run against a real ``DumpMaster`` (mitmdump's full default chain) and real mitmproxy
hooks; the last test pins the mitmproxy internals ``addons/lean.py`` relies on (touched in
``addons/patches.py``).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import pytest
from mitmproxy import addonmanager, hooks, options
from mitmproxy.addons import anticache, core, modifyheaders, next_layer, proxyserver, tlsconfig
from mitmproxy.exceptions import AddonHalt, OptionsError
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster

from addons.context import Gateway
from addons.lean import Lean
from addons.patches import LeanDispatch


class Recorder:
    """An addon that records the hooks it sees (optionally raising or halting)."""

    def __init__(self, name: str, calls: list[str], raise_: type[BaseException] | None = None):
        self.name = name
        self.calls = calls
        self.raise_ = raise_

    def request(self, flow) -> None:
        self.calls.append(self.name)
        if self.raise_ is not None:
            raise self.raise_("boom")


class AsyncRecorder(Recorder):
    async def request(self, flow) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.calls.append(self.name)


class Parent:
    """A chain item with sub-addons, like mitmproxy's script loader."""

    name = "parent"

    def __init__(self, *children: object) -> None:
        self.addons = list(children)


@pytest.fixture
def master() -> Iterator[DumpMaster]:
    loop = asyncio.new_event_loop()
    opts = options.Options()
    m = DumpMaster(opts, loop=loop, with_termlog=False, with_dumper=True)
    m.options.update(flow_detail=0)
    yield m
    loop.close()


def chain_types(m: DumpMaster) -> set[type]:
    return {type(a) for a in m.addons.chain}


def run(m: DumpMaster, coro) -> None:
    m.event_loop.run_until_complete(coro)


def test_idle_default_addons_leave_the_chain_and_the_proxy_core_stays(master) -> None:
    lean = Lean(Gateway())
    master.addons.add(lean)
    before = len(master.addons.chain)
    lean.running()
    kept = chain_types(master)
    assert len(master.addons.chain) < before - 20
    for needed in (proxyserver.Proxyserver, next_layer.NextLayer, tlsconfig.TlsConfig, Lean):
        assert needed in kept
    assert core.Core not in kept and anticache.AntiCache not in kept
    assert master.addons.get("anticache") is not None  # still registered, only not called


def test_an_addon_whose_option_is_set_stays_and_comes_back_when_set_later(master) -> None:
    lean = Lean(Gateway())
    master.addons.add(lean)
    master.options.update(modify_headers=["/~q/X-Bench/1"])
    lean.running()
    assert modifyheaders.ModifyHeaders in chain_types(master)
    assert anticache.AntiCache not in chain_types(master)
    master.options.update(anticache=True)
    assert anticache.AntiCache in chain_types(master)
    master.options.update(anticache=False)
    assert anticache.AntiCache not in chain_types(master)


def test_an_addon_brought_back_at_run_time_is_configured(master) -> None:
    lean = Lean(Gateway())
    master.addons.add(lean)
    lean.running()
    mh = master.addons.get("modifyheaders")
    assert type(mh) not in chain_types(master)
    master.options.update(modify_headers=["/~q/X-Bench/1"])
    assert mh in master.addons.chain
    assert len(mh.replacements) == 1


def test_lean_false_changes_nothing(master) -> None:
    gw = Gateway()
    gw.settings["lean"] = False
    lean = Lean(gw)
    master.addons.add(lean)
    chain = list(master.addons.chain)
    lean.running()
    assert master.addons.chain == chain
    assert "trigger_event" not in master.addons.__dict__


def test_cached_dispatch_calls_the_same_hooks_in_the_same_order(master) -> None:
    calls: list[str] = []
    items = [Recorder("a", calls), Parent(Recorder("b", calls), AsyncRecorder("c", calls))]
    master.addons.add(*items)
    flow = tflow.tflow()
    run(master, master.addons.handle_lifecycle(HttpRequestHook(flow)))
    original = list(calls)
    calls.clear()
    LeanDispatch(master.addons).install()
    run(master, master.addons.handle_lifecycle(HttpRequestHook(flow)))
    assert calls == original == ["a", "b", "c"]


def test_an_exception_is_logged_and_the_next_chain_item_still_runs(master, caplog) -> None:
    calls: list[str] = []
    master.addons.add(Parent(Recorder("a", calls, ValueError), Recorder("a2", calls)))
    master.addons.add(Recorder("b", calls))
    LeanDispatch(master.addons).install()
    run(master, master.addons.trigger_event(HttpRequestHook(tflow.tflow())))
    assert calls == ["a", "b"]  # as mitmproxy: the rest of a's item is skipped, b runs
    assert "Addon error: boom" in caplog.text


def test_addon_halt_stops_the_event(master) -> None:
    calls: list[str] = []
    master.addons.add(Recorder("a", calls, AddonHalt), Recorder("b", calls))
    LeanDispatch(master.addons).install()
    run(master, master.addons.trigger_event(HttpRequestHook(tflow.tflow())))
    assert calls == ["a"]


def test_an_options_error_propagates_as_in_mitmproxy(master) -> None:
    calls: list[str] = []
    master.addons.add(Recorder("a", calls, OptionsError), Recorder("b", calls))
    LeanDispatch(master.addons).install()
    with pytest.raises(OptionsError):
        run(master, master.addons.trigger_event(HttpRequestHook(tflow.tflow())))
    assert calls == ["a"]


def test_adding_or_removing_an_addon_clears_the_cache(master) -> None:
    calls: list[str] = []
    d = LeanDispatch(master.addons)
    d.install()
    first = Recorder("a", calls)
    master.addons.add(first)
    run(master, master.addons.trigger_event(HttpRequestHook(tflow.tflow())))
    master.addons.add(Recorder("b", calls))
    run(master, master.addons.trigger_event(HttpRequestHook(tflow.tflow())))
    master.addons.remove(first)
    run(master, master.addons.trigger_event(HttpRequestHook(tflow.tflow())))
    assert calls == ["a", "a", "b", "b"]
    d.uninstall()
    assert "trigger_event" not in master.addons.__dict__


def test_the_mitmproxy_internals_lean_relies_on_are_there() -> None:
    """Fails on a mitmproxy upgrade that changes what addons/lean.py replaces."""
    from mitmproxy import version

    assert version.VERSION == "12.2.3"
    m = addonmanager.AddonManager
    for name in ("trigger_event", "handle_lifecycle", "register", "remove"):
        assert callable(getattr(m, name))
    assert inspect.iscoroutinefunction(m.trigger_event)
    assert inspect.iscoroutinefunction(m.handle_lifecycle)
    assert list(inspect.signature(m.trigger_event).parameters) == ["self", "event"]
    assert callable(addonmanager.safecall) and callable(addonmanager.traverse)
    assert HttpRequestHook(tflow.tflow()).args()[0] is not None
    assert hooks.UpdateHook.name == "update"
