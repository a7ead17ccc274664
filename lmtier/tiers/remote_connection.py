"""The remote tier's link to its server: connecting, batching commands, backing off.

A mixin of ``RemoteTier``: it owns the connection (``_client``), sends the commands issued in
one event-loop turn as one batch (``_command``), marks the tier down on a failure and probes
the server again after a doubling backoff (``_connected``).  ``clear_prefix``, the one walk
over the server's names, is here too.  Apart from the tier because none of it knows about
entries: what a value holds, and what the index charges, is ``remote.py``'s part.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from lmtier.errors import StorageError, TierUnavailableError
from lmtier.metrics import TierCounters
from lmtier.tiers.redis_connections import large_values_connection_class, round_trip

__all__ = ["FIRST_BACKOFF_S", "RemoteConnection", "close_quietly"]

# The remote tier's own logger: the link's state is the tier's to report.
log = logging.getLogger("lmtier.tiers.remote")

FIRST_BACKOFF_S = 0.1
# Failures of the connection or the server as a whole, as opposed to one command's error.
_DOWN = (RedisError, OSError, TimeoutError, asyncio.TimeoutError)


@dataclass
class _Command:
    name: str  # the server's command: "GET", "SET", "DEL"
    args: tuple[Any, ...]
    done: asyncio.Future[Any]


class RemoteConnection:
    """The connection half of ``RemoteTier``; the tier's ``__init__`` sets its attributes."""

    # Set by the tier.
    name: str
    counters: TierCounters
    url: str
    key_prefix: str
    cluster: bool
    connect_timeout_s: float
    op_timeout_s: float
    reconnect_max_s: float
    round_trips: int
    _credentials: dict[str, str | None]
    _tls: dict[str, str]
    _client: aioredis.Redis | RedisCluster | None
    _next_probe: float
    _backoff: float
    _probing: bool
    _queue: list[_Command]
    _flushes: set[asyncio.Task[None]]
    _sends_parts: bool

    async def clear_prefix(self) -> int:
        """Delete every value under this tier's key prefix, whoever wrote it; how many.

        For a tool that owns its prefix (``lmtier stress`` runs under one of its own) and
        cleans up after itself; it walks the server (SCAN), which no store operation does.
        The index is not touched: call it on a tier that indexes nothing.
        """
        await self._connected()
        client = self._client
        assert client is not None
        loop = asyncio.get_running_loop()
        pattern = _glob_escape(self.key_prefix) + b":*"
        deleted = 0
        batch: list[bytes] = []
        try:
            # Each round trip is bounded by op_timeout_s, as every command of the tier is.
            async with asyncio.timeout(self.op_timeout_s) as deadline:
                async for name in client.scan_iter(match=pattern, count=1000):
                    batch.append(name)
                    if len(batch) >= 1000:
                        deadline.reschedule(loop.time() + self.op_timeout_s)
                        deleted += await client.delete(*batch)
                        batch = []
                    deadline.reschedule(loop.time() + self.op_timeout_s)
                if batch:
                    deleted += await client.delete(*batch)
        except _DOWN as exc:
            raise StorageError(
                f"redis tier {self.name!r}: cannot delete the values under "
                f"{self.key_prefix!r}: {_describe(exc)}"
            ) from exc
        return deleted

    async def _command(self, name: str, *args: Any) -> Any:
        """Run one command, in one batch with the others issued in this event-loop turn."""
        await self._connected()
        command = _Command(name, args, asyncio.get_running_loop().create_future())
        self._queue.append(command)
        if len(self._queue) == 1:  # the flush's first step runs after this turn's commands
            task = asyncio.ensure_future(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return await command.done

    async def _flush(self) -> None:
        batch, self._queue = self._queue, []
        client = self._client
        if client is None:  # another batch found the server down after these were queued
            self.counters.unavailable += len(batch)
            _fail(batch, TierUnavailableError(f"redis tier {self.name!r} is unavailable"))
            return
        try:
            self.round_trips += 1
            async with asyncio.timeout(self.op_timeout_s):
                results = await self._send(client, batch)
        except _DOWN as exc:
            why = _describe(exc)
            self.counters.errors += 1
            self._mark_down(client, why)
            _fail(batch, TierUnavailableError(f"redis tier {self.name!r}: {why}"))
            return
        for command, result in zip(batch, results, strict=True):
            if command.done.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):  # e.g. OOM under maxmemory noeviction
                self.counters.errors += 1
                command.done.set_exception(
                    StorageError(f"redis tier {self.name!r}: {command.name} failed: {result}")
                )
            else:
                command.done.set_result(result)

    async def _send(
        self, client: aioredis.Redis | RedisCluster, batch: list[_Command]
    ) -> list[Any]:
        """The batch's results (a command's error as its result); one round trip."""
        commands = [(command.name, *command.args) for command in batch]
        if not isinstance(client, RedisCluster):
            return await round_trip(client.connection_pool, commands)
        # A cluster routes each command by its key: redis-py's pipeline sends one batch per node.
        if len(commands) == 1:  # a lone command skips the pipeline's bookkeeping
            try:
                return [await client.execute_command(*commands[0])]
            except ResponseError as exc:
                return [exc]
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def _connected(self) -> None:
        """Return once connected; probe the server if the backoff allows, else fail at once."""
        if self._client is not None:
            return
        loop = asyncio.get_running_loop()
        if self._probing or loop.time() < self._next_probe:
            self.counters.unavailable += 1
            raise TierUnavailableError(f"redis tier {self.name!r} is unavailable ({self.url})")
        self._probing = True
        client = self._new_client()
        try:
            async with asyncio.timeout(self.connect_timeout_s + self.op_timeout_s):
                await self._probe(client)
        except _DOWN as exc:
            self.counters.unavailable += 1
            self._mark_down(None, _describe(exc))
            await close_quietly(client)
            raise TierUnavailableError(
                f"redis tier {self.name!r} cannot reach {_redact(self.url)}: {_describe(exc)}"
            ) from exc
        finally:
            self._probing = False
        self._client = client
        self._backoff = FIRST_BACKOFF_S
        log.info("redis tier %r connected to %s", self.name, _redact(self.url))

    async def _probe(self, client: aioredis.Redis | RedisCluster) -> None:
        if isinstance(client, RedisCluster):
            await client.initialize()
        await client.ping()

    def _new_client(self) -> aioredis.Redis | RedisCluster:
        # No retries inside redis-py: they would outlast the timeout, and the tier retries.
        # No socket timeout either (redis-py 8 defaults to 5 s): ``op_timeout_s``
        # bounds each round trip, and a socket timeout wraps every send in one more task.
        options: dict[str, Any] = {
            "socket_connect_timeout": self.connect_timeout_s,
            "socket_timeout": None,
            **{k: v for k, v in self._credentials.items() if v is not None},
            **self._tls,
        }
        if self.cluster:
            self._sends_parts = False
            return RedisCluster.from_url(self.url, retry=Retry(NoBackoff(), 0), **options)
        client = aioredis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), **options)
        pool = client.connection_pool
        parts_class = large_values_connection_class(pool.connection_class)
        if parts_class is not None:
            pool.connection_class = parts_class
        self._sends_parts = parts_class is not None
        return client

    def _mark_down(self, client: aioredis.Redis | RedisCluster | None, why: str) -> None:
        """Drop the connection (if given) and schedule the next probe, once per failure."""
        if client is not None:
            if client is not self._client:
                return  # another batch on the same connection already did it
            self._client = None
            task = asyncio.ensure_future(close_quietly(client))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
            log.warning("redis tier %r is unavailable: %s", self.name, why)
        self._next_probe = asyncio.get_running_loop().time() + self._backoff
        self._backoff = min(2 * self._backoff, self.reconnect_max_s)


def _fail(batch: list[_Command], error: Exception) -> None:
    for command in batch:
        if not command.done.done():
            command.done.set_exception(error)


async def close_quietly(client: aioredis.Redis | RedisCluster) -> None:
    """Close ``client``, ignoring a server that is down or a loop that is closing."""
    try:
        await asyncio.wait_for(client.aclose(), 1.0)
    except (*_DOWN, RuntimeError):
        pass


def _glob_escape(prefix: str) -> bytes:
    """``prefix`` as a SCAN pattern that matches it literally."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix).encode()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _redact(url: str) -> str:
    """``url`` without a password it may carry."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"
