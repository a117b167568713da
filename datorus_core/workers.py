"""What ``datorus serve`` tells each gateway worker it starts, through the environment.

A gateway started by hand (``mitmdump -s addons/datorus.py``) has none of these
variables and is worker 0 of 1. The hot state (rate limits, tunnels, reservations...)
reads :func:`worker_info` to know whether it shares the gateway with other workers.

| variable | meaning |
| --- | --- |
| ``DATORUS_WORKER_INDEX`` | this worker's slot, 0 to N-1 (a replacement keeps its slot) |
| ``DATORUS_WORKERS`` | N, the number of workers |
| ``DATORUS_SERVE_PID`` | the launcher's pid (the worker exits with it) |
| ``DATORUS_READY_FD`` | a pipe the worker writes ``ready`` to once it serves |
| ``DATORUS_LISTEN_FDS`` | the listening sockets it inherits (see ``datorus_core.listeners``) |
| ``DATORUS_SERVE_SECRET`` | a secret the workers of one ``serve`` share (:func:`serve_secret`) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

INDEX_ENV = "DATORUS_WORKER_INDEX"
COUNT_ENV = "DATORUS_WORKERS"
LAUNCHER_ENV = "DATORUS_SERVE_PID"
READY_FD_ENV = "DATORUS_READY_FD"
LISTEN_FDS_ENV = "DATORUS_LISTEN_FDS"
SECRET_ENV = "DATORUS_SERVE_SECRET"


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Which worker this process is: ``index`` of ``count``; ``launched`` by ``datorus serve``."""

    index: int = 0
    count: int = 1
    launched: bool = False


def worker_info(environ: Mapping[str, str] | None = None) -> WorkerInfo:
    """This process's place among the gateway's workers (0 of 1 outside ``datorus serve``).

    >>> worker_info({})
    WorkerInfo(index=0, count=1, launched=False)
    >>> worker_info({"DATORUS_WORKER_INDEX": "1", "DATORUS_WORKERS": "4"})
    WorkerInfo(index=1, count=4, launched=True)
    """
    env = os.environ if environ is None else environ
    if INDEX_ENV not in env:
        return WorkerInfo()
    index, count = int(env[INDEX_ENV]), int(env.get(COUNT_ENV, "1"))
    if not 0 <= index < count:
        raise ValueError(f"{INDEX_ENV}={index} is not a worker of {COUNT_ENV}={count}")
    return WorkerInfo(index, count, True)


def serve_secret(environ: Mapping[str, str] | None = None) -> str | None:
    """The secret the workers of one ``datorus serve`` share, or None outside it.

    Headers the gateway vouches for itself (``X-Datorus-Egress-Pin`` and
    ``X-Datorus-Timeout``, made by its own REST API for ``POST /proxies/test`` and
    ``POST /fetch``) must be honoured by whichever worker the request reaches.
    """
    env = os.environ if environ is None else environ
    return env.get(SECRET_ENV) or None
