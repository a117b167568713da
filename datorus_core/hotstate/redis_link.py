"""The request path's connection to Redis (:class:`RedisLink`), pipelined.

The Redis hot state sends the commands a turn of the event loop issued as one batch
(:meth:`~.redis_state.RedisHotState._command`). redis-py's pipeline object is made for
one batch at a time: each one checks a connection out of a pool (a lock, a liveness
peek at the socket, observability hooks), wraps its write in ``asyncio.wait_for`` (a
task) and each reply in a timer, and hands the connection back. Under load that was
most of what a worker's CPU paid per request for the shared state, more than Redis's
round trip itself.

A link keeps one connection of its own. Each batch is packed and written at once by
redis-py's own ``Connection.pack_commands`` and ``Connection.send_packed_command``;
one reader task reads the replies in order with ``Connection.read_response`` and hands
each to the command waiting for it (a FIFO: Redis answers in order on one connection),
so batches may be in flight together with no task, lock or timer each. One timer
bounds the wait: when the oldest command in flight has waited *timeout* seconds, the
connection is dropped and every command in flight fails with ``TimeoutError`` (a late
reply can never be taken for another command's); a broken connection fails them the
same way. The next batch connects again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

Command = tuple[Any, ...]
Entry = tuple[Command, "asyncio.Future[Any] | None"]
Resolve = Callable[[Command, "asyncio.Future[Any] | None", Any], None]


def resolve(command: Command, fut: asyncio.Future[Any] | None, reply: Any) -> None:
    """Give *fut* the *reply* (an error reply is an exception); nothing without one."""
    if fut is None or fut.done():
        return
    if isinstance(reply, BaseException):
        fut.set_exception(reply)
    else:
        fut.set_result(reply)


class RedisLink:
    """One connection to the Redis at *url* for the request path's batches.

    *timeout* bounds connecting and each command's wait for its reply; *on_reply* is
    called with each command, its future (None: nobody waits) and its reply, an error
    reply as a :class:`~redis.exceptions.ResponseError` (default: :func:`resolve`);
    *on_round_trip*, if given, with the seconds each batch took from its write to its
    last reply.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        on_reply: Resolve = resolve,
        on_round_trip: Callable[[float], None] | None = None,
    ) -> None:
        # no socket timeout on the connection: the link's own timer bounds every wait
        self.pool = aredis.ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=timeout
        )
        self.timeout = timeout
        self.on_reply = on_reply
        self.on_round_trip = on_round_trip
        self.conn: Any = None  # the connection in use (redis.asyncio.Connection)
        self._reader: asyncio.Task[None] | None = None
        # the commands written and not yet answered, in order, each with when it was sent
        self._pending: collections.deque[tuple[Command, asyncio.Future[Any] | None, float]] = (
            collections.deque()
        )
        self._timer: asyncio.TimerHandle | None = None
        self._connecting = asyncio.Lock()
        self._closing: set[asyncio.Task[Any]] = set()

    @property
    def in_flight(self) -> int:
        """Commands written and not yet answered."""
        return len(self._pending)

    async def send(self, batch: list[Entry]) -> None:
        """Write *batch* in one go; each future gets its reply through *on_reply*, or the
        error that broke the connection (never raises)."""
        conn = self.conn
        try:
            if conn is None:
                conn = await self._connect()
            packed = conn.pack_commands([c for c, _ in batch])
        except Exception as e:
            for _, fut in batch:
                resolve((), fut, e if isinstance(e, RedisError | OSError) else RedisError(e))
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._pending.extend((c, f, now) for c, f in batch)
        if self._timer is None:
            self._timer = loop.call_at(now + self.timeout, self._check)
        try:
            # written before this returns unless the socket's buffer is full
            await conn.send_packed_command(packed, check_health=False)
        except BaseException as e:
            self._break(conn, e)
            if not isinstance(e, Exception):
                raise

    async def _connect(self) -> Any:
        """The connection, made now if there is none (one at a time)."""
        async with self._connecting:
            if self.conn is None:
                conn = self.pool.make_connection()
                try:
                    async with asyncio.timeout(self.timeout):
                        await conn.connect()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
                    raise
                self.conn = conn
                self._reader = asyncio.get_running_loop().create_task(
                    self._read(conn), name="datorus redis link reader"
                )
            return self.conn

    async def _read(self, conn: Any) -> None:
        """Read the replies of *conn* in order, for as long as it is the link's."""
        pending = self._pending
        try:
            while True:
                try:
                    reply: Any = await conn.read_response(disconnect_on_error=False)
                except ResponseError as e:  # an error reply: the command's, not the link's
                    reply = e
                if conn is not self.conn:
                    return
                if not pending:
                    raise RedisConnectionError("Redis sent a reply nobody asked for")
                command, fut, sent = pending.popleft()
                self.on_reply(command, fut, reply)
                if self.on_round_trip is not None and (not pending or pending[0][2] != sent):
                    self.on_round_trip(asyncio.get_running_loop().time() - sent)  # batch done
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._break(conn, e)

    def _check(self) -> None:
        """The timer: fail the connection if its oldest command waited too long."""
        self._timer = None
        if not self._pending:
            return
        due = self._pending[0][2] + self.timeout
        loop = asyncio.get_running_loop()
        if loop.time() >= due:
            self._break(self.conn, TimeoutError(f"Redis did not answer within {self.timeout} s"))
        else:
            self._timer = loop.call_at(due, self._check)

    def _break(self, conn: Any, error: BaseException) -> None:
        """Drop *conn* (if it is still the link's) and fail every command in flight."""
        if conn is None or conn is not self.conn:
            return
        self.conn = None
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        t = asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)
        pending, self._pending = self._pending, collections.deque()
        err = error if isinstance(error, Exception) else RedisError(f"interrupted: {error!r}")
        for command, fut, _ in pending:
            resolve(command, fut, err)

    async def aclose(self) -> None:
        """Drop the connection, failing what is in flight."""
        self._break(self.conn, RedisConnectionError("the Redis link was closed"))
        if self._closing:
            await asyncio.wait(self._closing, timeout=self.timeout)
        with contextlib.suppress(Exception):
            await self.pool.aclose()
