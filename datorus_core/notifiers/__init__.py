"""Notifier plugins (``datorus.notifiers`` entry points): how an event reaches someone.

A notifier has a ``name``, ``check(target) -> str`` (the target as stored, or
``ValueError`` saying what is wrong) and ``async send(delivery)`` that delivers one event
or raises :class:`DeliveryError`. The shipped ones, ``webhook`` and ``smtp``, register the
same way as any other (``pyproject.toml``); :func:`load_notifiers` loads them with the
loader every plugin kind shares (:mod:`datorus_core.plugins`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from typing import Any, Protocol, runtime_checkable

from ..plugins import Loaded, PluginFailure, load_group

__all__ = ["Delivery", "DeliveryError", "Notifier", "load_notifiers"]

GROUP = "datorus.notifiers"


class DeliveryError(Exception):
    """One delivery failed: *reason* (shown as the subscription's last failure) and the
    receiver's HTTP status when there was one."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


# (host, port) -> the address to connect to, once the acceptable-use policy allowed it
Resolver = Callable[[str, int], Awaitable[str]]


@dataclass(frozen=True)
class Delivery:
    """One event to deliver to one subscription."""

    target: str  # a URL, an email address: what the subscription names
    event: dict[str, Any]  # {"id", "type", "created_at", "data"}
    body: bytes  # the event as JSON, as signed
    secret: str | None
    timeout: float
    resolve: Resolver
    settings: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Notifier(Protocol):
    """What a notifier plugin is."""

    name: str

    def check(self, target: str) -> str:
        """*target* as it will be stored; ValueError if it cannot be one."""

    async def send(self, delivery: Delivery) -> int | None:
        """Deliver one event; raise DeliveryError when it did not arrive. The receiver's
        status when it has one (an HTTP status: shown as the delivery's ``last_status``),
        else None."""


def _load(ep: EntryPoint) -> Notifier:
    obj = ep.load()
    obj = obj() if isinstance(obj, type) else obj
    if not isinstance(obj, Notifier):
        raise TypeError("not a notifier (needs name, check() and send())")
    if obj.name != ep.name:
        raise ValueError(f"its name {obj.name!r} is not its entry point's {ep.name!r}")
    return obj


def load_notifiers(
    eps: list[EntryPoint] | None = None,
) -> tuple[dict[str, Loaded[Notifier]], list[PluginFailure]]:
    """Every notifier plugin that loads, by name, and those that did not."""
    found, failed = load_group(GROUP, "notifier", _load, eps)
    return {p.name: p for p in found}, failed
