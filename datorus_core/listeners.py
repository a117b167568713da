"""Listening sockets that several gateway workers share: opened once, inherited by each.

``datorus serve`` opens, for every worker slot, its own listening socket on each shared
address (the proxy port, the REST API port), all with ``SO_REUSEPORT``: the kernel
spreads new connections over the slots, and a client's address reaches the worker
unchanged. The launcher keeps its copy of each socket, so when a worker is replaced
(SIGHUP) or dies, connections waiting in its slot's accept queue are not reset: the
next worker of the slot accepts them. A worker finds its sockets with :func:`take`.

The sockets travel in ``DATORUS_LISTEN_FDS`` as JSON: ``[[host, port, [fd, ...]], ...]``,
*host* as mitmproxy or the settings spell it (``""``: every interface).
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from .workers import LISTEN_FDS_ENV

Address = tuple[str, int]


def open_shared(host: str, port: int, backlog: int = socket.SOMAXCONN) -> list[socket.socket]:
    """Listening TCP sockets on *host*:*port* with ``SO_REUSEPORT`` (one per address family
    *host* resolves to: ``""`` gives ``0.0.0.0`` and ``::``, as asyncio's servers do)."""
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    out: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, type_, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, type_, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
    except OSError:
        for s in out:
            s.close()
        raise
    return out


def cannot_listen(host: str, port: int) -> OSError | None:
    """Why a listener on *host*:*port* could not be opened now (``None``: it could).

    A probe, bound and closed at once, as asyncio's servers bind (``SO_REUSEADDR``, one
    socket per address family): it lets a caller that hands the port to someone else
    (mitmproxy's proxy modes) refuse to start with a message of its own.

    >>> held = socket.create_server(("127.0.0.1", 0))
    >>> port = held.getsockname()[1]
    >>> cannot_listen("127.0.0.1", port).strerror
    'Address already in use'
    >>> held.close()
    >>> cannot_listen("127.0.0.1", port) is None
    True
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        for family, type_, proto, _, sockaddr in infos:
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as e:
                if e.errno == errno.EAFNOSUPPORT:
                    continue  # that family is off on this box: asyncio skips it too
                raise
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(1)
    except OSError as e:
        return e
    return None


def encode(shared: Iterable[tuple[str, int, list[socket.socket]]]) -> str:
    """The ``DATORUS_LISTEN_FDS`` value for *shared* ``(host, port, sockets)``."""
    return json.dumps([[h, p, [s.fileno() for s in socks]] for h, p, socks in shared])


def _parse(environ: Mapping[str, str]) -> dict[Address, list[int]]:
    raw = environ.get(LISTEN_FDS_ENV)
    if not raw:
        return {}
    return {(str(h), int(p)): [int(fd) for fd in fds] for h, p, fds in json.loads(raw)}


_taken: set[Address] = set()


def shared_by_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was given shared listening sockets (a ``datorus serve`` worker)."""
    return bool((os.environ if environ is None else environ).get(LISTEN_FDS_ENV))


def take(host: str, port: int, environ: Mapping[str, str] | None = None) -> list[socket.socket]:
    """The inherited listening sockets for *host*:*port*, once (a second call gets ``[]``:
    the first taker owns and closes them)."""
    fds = _parse(os.environ if environ is None else environ).get((host, port))
    if not fds or (host, port) in _taken:
        return []
    _taken.add((host, port))
    return [socket.socket(fileno=fd) for fd in fds]


def proxy_addresses(modes: Iterable[str], host: str | None, port: int | None) -> list[Address]:
    """The TCP addresses mitmproxy's proxy *modes* (``--mode`` specs) listen on, with
    *host* and *port* the ``--listen-host`` / ``--listen-port`` they default to. Raise
    ValueError for a mode mitmproxy cannot parse."""
    from mitmproxy.proxy import mode_specs

    out: list[Address] = []
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        mode_port = mode.listen_port(port)
        if mode.transport_protocol == "tcp" and mode_port:
            out.append((mode.listen_host(host), mode_port))
    return out


def gateway_sockets(
    settings: Mapping[str, Any], proxy: Iterable[Address] = (), listen_host: str = ""
) -> list[Address]:
    """Every socket the gateway listens on: the one list the acceptable-use rule
    ``gateway_self`` denies as a destination (no proxy loops, and no customer reads the
    operator's ``/metrics`` through the proxy), for the proxy, the webhook checks and the
    deliveries alike.

    *proxy* are the proxy modes' addresses (:func:`proxy_addresses`); the settings add the
    SOCKS5 entry (``socks5_port``, on *listen_host* as mitmproxy's modes are), the REST API
    (``api_host:api_port``) and ``GET /metrics`` (``metrics_host:metrics_port``, served by
    the gateway, or under ``datorus serve`` by its launcher). A port 0 is off. Host ``""``
    means every local address.

    >>> gateway_sockets({"socks5_port": 1080, "api_host": "127.0.0.1", "api_port": 8002,
    ...                  "metrics_host": "127.0.0.1", "metrics_port": 9464}, [("", 8001)])
    [('', 8001), ('', 1080), ('127.0.0.1', 8002), ('127.0.0.1', 9464)]
    >>> gateway_sockets({"socks5_port": 0, "api_port": 0, "metrics_port": 0}, [("", 8001)])
    [('', 8001)]
    """
    own = list(proxy)
    for host, port in (
        (listen_host, settings.get("socks5_port")),
        (settings.get("api_host"), settings.get("api_port")),
        (settings.get("metrics_host"), settings.get("metrics_port")),
    ):
        if port:
            own.append((str(host or ""), int(port)))
    return list(dict.fromkeys(own))
