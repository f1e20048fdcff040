"""Redis result cache: the full answer of a model version for a photo, keyed so that nothing stale can be served.

Key = photo sha256 + model + resolved version and its identity (the digest of its answers to fixed probes,
version_facts.py: a number given again to another model gets another) + preprocessing version + the version's input
size. Redis trouble never fails a request: after a short timeout the request is served uncached, and a circuit
breaker skips Redis for a while before trying again.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import select
import time
from collections import deque
from collections.abc import Callable

import redis.asyncio as aioredis

from services.gateway import keys, metrics
from training_job.preprocessing import PREPROCESSING_VERSION

log = logging.getLogger("gateway.cache")
# After a connect failed, no other connection is opened beside a connected one for this long: a loop too busy to
# finish a connect within the socket timeout (a burst of requests) would fail one after another, each a connection
# Redis accepted.
BESIDE_AFTER_FAILED_CONNECT_SECONDS = 5.0


class CircuitBreaker:
    def __init__(self, failures_to_open: int = 3, open_seconds: float = 2.0):
        self.failures_to_open = failures_to_open
        self.open_seconds = open_seconds
        self.failures = 0
        self.opened_at = 0.0

    def allow(self) -> bool:
        return self.failures < self.failures_to_open or time.monotonic() - self.opened_at >= self.open_seconds

    def success(self) -> None:
        if self.failures >= self.failures_to_open:
            log.info("redis is back: cache on again")
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.failures_to_open:
            if self.failures == self.failures_to_open:
                log.warning("redis failing: serving uncached for %.1fs before retrying", self.open_seconds)
            self.opened_at = time.monotonic()
        metrics.CACHE_OUTCOMES["error"].inc()


def cache_key(sha256: str, model: str, version: int, identity: str, image_size: int) -> str:
    return keys.result(model, version, identity, PREPROCESSING_VERSION, image_size, sha256)


def explanation_key(sha256: str, model: str, version: int, identity: str, image_size: int, target: str) -> str:
    return keys.explanation(model, version, identity, PREPROCESSING_VERSION, image_size, sha256, target)


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


class _Pipe:
    """One connection carrying commands back to back: Redis answers them in the order they were written."""

    __slots__ = ("connection", "waiting", "opening", "reader", "parked", "watch", "replies", "replies_seen", "broken")

    def __init__(self, connection):
        self.connection = connection
        self.waiting: deque[asyncio.Future] = deque()  # one per command written and not answered yet, in order
        self.opening: asyncio.Task | None = None
        self.reader: asyncio.Task | None = None
        self.parked: asyncio.Future | None = None  # the reader's, while nothing is waiting
        self.watch: asyncio.TimerHandle | None = None  # the silence watch, while commands wait
        self.replies = 0  # read so far
        self.replies_seen = 0  # when the watch was armed
        self.broken: BaseException | None = None

    def reply_unread(self) -> bool:
        """Whether bytes from Redis are here and not read yet: in the stream's buffer (asyncio.StreamReader's own
        ``_buffer``) or the socket's. A loop too busy to read them is no silence of Redis."""
        stream, writer = self.connection._reader, self.connection._writer
        if stream is not None and len(stream._buffer):
            return True
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None:
            return False
        try:
            return bool(select.select([sock.fileno()], [], [], 0)[0])
        except (OSError, ValueError):  # closed meanwhile
            return False


class CommandConnections:
    """Connections for the cache's GET and SET, with the client's own settings (address, TLS, password, database,
    timeouts), at most ``max_connections`` of them, each carrying any number of commands at once (pipelined): a
    command is written at once to the connected connection with the fewest waiting, and while that one has some,
    another connects beside it (``_choose``); a reader per connection hands each reply to its command, in order. A
    burst of lookups is never a storm of connects (a connection each, which Redis answered late, each a failure for
    the breaker), no command waits for a free connection, and none for a connect while one is connected: a connect
    the loop is too busy to finish within the timeout fails no command.

    The client's pool machinery around each command (lock, retries, observability hooks, events) cost about as much
    CPU as the command itself; a cache command needs none of it, as a failed one is not retried but served uncached.
    A connection on which commands wait and Redis sends nothing for the socket timeout (no reply read, none arrived
    unread), or that fails, fails every command waiting on it and is dropped; the next command opens another. The
    silence is Redis's own: replies that came while the gateway's loop was too busy to read them (a burst of
    requests) are no failure. An error reply (e.g. Redis refusing writes) fails its command alone. The reply of a
    caller that left is read and dropped, keeping the others' in step."""

    def __init__(self, redis: aioredis.Redis, max_connections: int = 4):
        self._pool = redis.connection_pool
        self.max_connections = max(1, max_connections)
        self._pipes: list[_Pipe] = []
        self._closing: set[asyncio.Task] = set()  # disconnects under way
        self._connect_failed_at = -math.inf  # the loop's time of the last connect that failed

    def _choose(self) -> _Pipe:
        """The connected connection with the fewest commands waiting. While it has some and fewer than
        ``max_connections`` are open, another connects beside it for the commands after (not within
        BESIDE_AFTER_FAILED_CONNECT_SECONDS of a connect that failed); a command waits for a connect only when none
        is connected."""
        connected = min((p for p in self._pipes if p.opening.done()), key=lambda p: len(p.waiting), default=None)
        opening = next((p for p in self._pipes if not p.opening.done()), None)
        beside = (connected is not None and connected.waiting and len(self._pipes) < self.max_connections
                  and asyncio.get_running_loop().time() - self._connect_failed_at > BESIDE_AFTER_FAILED_CONNECT_SECONDS)
        if opening is None and (connected is None or beside):
            opening = _Pipe(self._pool.make_connection())
            self._pipes.append(opening)
            opening.opening = asyncio.get_running_loop().create_task(self._open(opening))
            opening.opening.add_done_callback(_retrieved)  # its error reaches the commands waiting, if any
        return connected if connected is not None else opening

    async def command(self, *args):
        pipe = self._choose()
        if not pipe.opening.done():
            await asyncio.shield(pipe.opening)  # one connect for every command that chose the new connection
        writer = pipe.connection._writer  # redis-py's stream, None once it closed the connection
        if pipe.broken is not None or writer is None:
            raise aioredis.ConnectionError(f"cache connection failed: {pipe.broken!r}")
        answer = asyncio.get_running_loop().create_future()
        pipe.waiting.append(answer)  # then written with no await between: the replies' order is the writes'
        writer.writelines(pipe.connection.pack_command(*args))
        if pipe.parked is not None and not pipe.parked.done():
            pipe.parked.set_result(None)
        if pipe.watch is None and pipe.connection.socket_timeout:
            pipe.replies_seen = pipe.replies
            pipe.watch = asyncio.get_running_loop().call_later(pipe.connection.socket_timeout, self._watch, pipe)
        return await answer

    def _watch(self, pipe: _Pipe) -> None:
        """Each socket timeout while commands wait: a reply read since, or one arrived unread, and the watch goes
        on; Redis silent all that time, and the connection is dropped."""
        pipe.watch = None
        if pipe.broken is not None or not pipe.waiting:
            return
        if pipe.replies != pipe.replies_seen or pipe.reply_unread():
            pipe.replies_seen = pipe.replies
            pipe.watch = asyncio.get_running_loop().call_later(pipe.connection.socket_timeout, self._watch, pipe)
            return
        self._drop_soon(pipe, aioredis.TimeoutError(
            f"Redis sent nothing for {pipe.connection.socket_timeout} s while commands waited"))

    async def _open(self, pipe: _Pipe) -> None:
        try:
            await pipe.connection.connect()
        except BaseException as exc:
            self._connect_failed_at = asyncio.get_running_loop().time()
            self._drop_soon(pipe, exc)
            raise
        pipe.reader = asyncio.get_running_loop().create_task(self._read(pipe))

    async def _read(self, pipe: _Pipe) -> None:
        try:
            while True:
                if not pipe.waiting:
                    pipe.parked = asyncio.get_running_loop().create_future()
                    await pipe.parked
                    continue
                try:  # no timeout of its own: the watch tells Redis's silence from a busy loop
                    reply, error = await pipe.connection.read_response(timeout=math.inf), None
                except aioredis.ResponseError as exc:  # an error reply: the connection is still in step
                    reply, error = None, exc
                pipe.replies += 1
                answer = pipe.waiting.popleft()
                if answer.done():  # its caller left
                    continue
                if error is None:
                    answer.set_result(reply)
                else:
                    answer.set_exception(error)
        except asyncio.CancelledError as exc:  # dropped, or close()
            self._fail(pipe, exc)
            raise
        except BaseException as exc:  # a reset
            self._drop_soon(pipe, exc)

    def _fail(self, pipe: _Pipe, exc: BaseException) -> bool:
        """Out of use, every command waiting on it failed, its reader stopped; False if it already was."""
        if pipe.broken is not None:
            return False
        pipe.broken = exc
        self._pipes.remove(pipe)
        if pipe.watch is not None:
            pipe.watch.cancel()
        if pipe.reader is not None and pipe.reader is not asyncio.current_task():
            pipe.reader.cancel()
        error = exc if isinstance(exc, (aioredis.RedisError, OSError)) else aioredis.ConnectionError(repr(exc))
        while pipe.waiting:
            answer = pipe.waiting.popleft()
            if not answer.done():
                answer.set_exception(error)
        return True

    def _drop_soon(self, pipe: _Pipe, exc: BaseException) -> None:
        """``_fail`` now, and the connection closed in the background."""
        if self._fail(pipe, exc):
            closing = asyncio.get_running_loop().create_task(pipe.connection.disconnect(nowait=True))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for pipe in list(self._pipes):
            if pipe.opening is not None and not pipe.opening.done():
                pipe.opening.cancel()
            self._fail(pipe, aioredis.ConnectionError("the cache is closing"))
            await pipe.connection.disconnect()
        await asyncio.gather(*self._closing, return_exceptions=True)


class ResultCache:
    def __init__(self, redis: aioredis.Redis, ttl_seconds: int, breaker: CircuitBreaker | None = None,
                 max_connections: int = 4):
        self.redis = redis
        self.connections = CommandConnections(redis, max_connections)
        self.ttl = ttl_seconds
        self.breaker = breaker or CircuitBreaker()

    async def close(self) -> None:
        await self.connections.close()

    async def get(self, key: str, usable: Callable[[dict], bool] = lambda entry: True) -> dict | None:
        """The entry under ``key``, or None: none there (a miss), Redis out of reach, or an entry that is not a JSON
        object ``usable`` takes (damaged, or written under the same key by another release): that one is counted
        ``unreadable`` and treated as a miss, whose answer then replaces it."""
        if not self.breaker.allow():
            metrics.CACHE_OUTCOMES["bypass"].inc()
            return None
        try:
            raw = await self.connections.command("GET", key)
        except (aioredis.RedisError, OSError, asyncio.TimeoutError):
            self.breaker.failure()
            return None
        self.breaker.success()
        if raw is None:
            metrics.CACHE_OUTCOMES["miss"].inc()
            return None
        try:
            entry = json.loads(raw)
        except (ValueError, RecursionError):
            entry = None
        if not isinstance(entry, dict) or not usable(entry):
            metrics.CACHE_OUTCOMES["unreadable"].inc()
            log.warning("cache entry %s is not one this gateway can read: answered as a miss, then replaced", key)
            return None
        metrics.CACHE_OUTCOMES["hit"].inc()
        return entry

    async def put(self, key: str, value: dict) -> None:
        if not self.breaker.allow():
            return
        try:
            await self.connections.command("SET", key, json.dumps(value), "EX", self.ttl)
            self.breaker.success()
        except (aioredis.RedisError, OSError, asyncio.TimeoutError):
            self.breaker.failure()

