"""``ServerClient``: an engine's handle on an lmtier server.

The engine's thread only encodes a job and sends it (``submit_load``, ``submit_store``), and
later reads whatever replies have come (``poll``, which never blocks): the block bytes move
between the store and the client's shared-memory regions inside the server's process.

A server that is down or goes away never yields wrong bytes: its unfinished loads complete as
misses and its other calls fail with ``TierUnavailableError``; the next call reconnects (and
maps the client's regions again) once a server answers on the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from lmtier.errors import InvalidValueError, LmtierError, TierUnavailableError
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike, check_key
from lmtier.server import client_async
from lmtier.server import protocol as p
from lmtier.server.client_socket import ServerConnection
from lmtier.server.client_wire import (
    HoldsResult,
    JobResult,
    LoadResult,
    StoreResult,
    checked,
    dtype_name,
    error_text,
    wire_keys,
)
from lmtier.server.nogil import Receiver
from lmtier.server.paths import default_socket_path
from lmtier.server.regions import SharedRegion
from lmtier.server.ring import CompletionRing

__all__ = ["HoldsResult", "LoadResult", "ServerClient", "StoreResult"]

log = logging.getLogger(__name__)

# The room a get gives an entry whose size it has not seen yet; a larger one is read again.
_FIRST_SLOT_BYTES = 1 << 20
# While jobs are in flight, poll reads the socket at least this often even when the completion
# ring has not moved: a server that died says so only on the socket.
LIVENESS_S = 0.01


class ServerClient(ServerConnection):
    """A connection to ``lmtier serve`` on ``socket_path`` (default: this user's default).

    Thread-safe.  ``send_timeout`` bounds how long a call waits for a server that does not
    read its requests; ``timeout`` how long the blocking and async calls wait for a reply.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 60.0,
        send_timeout: float = 10.0,
    ) -> None:
        self.path = Path(socket_path) if socket_path is not None else default_socket_path()
        self.timeout = timeout
        self.send_timeout = send_timeout
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._frames = p.FrameReader()
        self._receive = Receiver()
        self._ids = itertools.count(1)
        self._region_numbers = itertools.count(1)
        self._regions: dict[int, SharedRegion] = {}
        self._pending: set[int] = set()  # sent, not answered
        self._done: dict[int, p.Reply | LmtierError] = {}
        self._claimed: set[int] = set()  # finished calls a blocking or async caller takes
        self._jobs: dict[int, tuple[type[JobResult], int]] = {}  # what a failed job reports
        self._discard: set[int] = set()  # requests whose reply nobody waits for
        self._async_waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        self._reader_fd: dict[asyncio.AbstractEventLoop, int] = {}
        self._retry_at = 0.0
        self._down_reason = ""
        self._slot_hint = _FIRST_SLOT_BYTES
        self._ring: CompletionRing | None = None
        self._ring_region: SharedRegion | None = None
        self._ring_request = -1  # the Doorbell request, answered once the server uses the ring
        self._ring_live = False
        self._ring_seen = 0  # the ring's count when the socket was last read to its end
        self._pumped_at = 0.0
        self.closed = False

    # -------------------------------------------------------------- regions
    def map_region(self, size: int) -> SharedRegion:
        """A new shared region of ``size`` bytes, mapped by the server (now, or at the next
        connection if the server is down)."""
        return self._share(SharedRegion(size, next(self._region_numbers)))

    def _share(self, region: SharedRegion) -> SharedRegion:
        with self._lock:
            self._regions[region.number] = region
            if self._sock is not None:
                # A server that is gone maps it again at the next connection.
                with contextlib.suppress(TierUnavailableError):
                    self._send_map(region)
        return region

    def share_file(self, fd: int, size: int) -> SharedRegion:
        """The first ``size`` bytes of shared file ``fd`` (an engine's own shared memory, kept
        open by the caller) as a region the server maps too; the file must never shrink
        (``SharedRegion.adopt``)."""
        region = SharedRegion.adopt(fd, size, next(self._region_numbers))
        return self._share(region)

    def unmap_region(self, region: SharedRegion) -> None:
        """Stop sharing ``region`` and close it; jobs already sent finish first (server side)."""
        with self._lock:
            if self._regions.pop(region.number, None) is None:
                return
            if self._sock is not None:
                # A server that is gone dropped the mapping with the connection.
                with contextlib.suppress(TierUnavailableError):
                    self._send_unclaimed(p.UnmapRegion(next(self._ids), region.number))
        region.close()

    # -------------------------------------------------------------- the engine's calls
    def submit_load(
        self,
        keys: Sequence[KeyLike],
        region: SharedRegion,
        offsets: Sequence[int],
        sizes: Sequence[int],
    ) -> int:
        """Ask the server to copy each key's entry into ``region`` at ``offsets[i]`` (at most
        ``sizes[i]`` bytes); the job's id, at once.  ``poll`` returns its ``LoadResult``."""
        request = p.Load(
            self._new_id(), wire_keys(keys), self._number(region), list(offsets), list(sizes)
        )
        return self._submit(request, LoadResult, len(request.keys))

    def submit_store(
        self,
        keys: Sequence[KeyLike],
        region: SharedRegion,
        offsets: Sequence[int],
        sizes: Sequence[int],
        *,
        dtypes: Sequence[torch.dtype] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
    ) -> int:
        """Ask the server to store the block at ``offsets[i]`` (``sizes[i]`` bytes) under
        ``keys[i]``, as a tensor of ``dtypes[i]`` and ``shapes[i]`` (default: uint8 bytes);
        the job's id, at once.  The region's bytes must stay put until the job is polled."""
        count = len(keys)
        names = ["uint8"] * count if dtypes is None else [dtype_name(d) for d in dtypes]
        dims = [[size] for size in sizes] if shapes is None else [list(s) for s in shapes]
        request = p.Store(
            self._new_id(),
            wire_keys(keys),
            self._number(region),
            list(offsets),
            list(sizes),
            names,
            dims,
        )
        return self._submit(request, StoreResult, count)

    def submit_holds(self, keys: Sequence[KeyLike]) -> int:
        """Ask which tier holds each key (no bytes move); the job's id, at once.  ``poll``
        returns its ``HoldsResult``."""
        request = p.Holds(self._new_id(), wire_keys(keys))
        return self._submit(request, HoldsResult, len(request.keys))

    def poll(self) -> list[JobResult]:
        """The jobs that finished since the last poll; never blocks.  While the completion
        ring has not moved, this is a memory read and no system call."""
        with self._lock:
            if self._quiet():
                return []
            self._pump()
            ready = [job for job in self._done if job not in self._claimed]
            return [self._result(job, self._done.pop(job)) for job in ready]

    @property
    def ring(self) -> CompletionRing | None:
        """This connection's completion ring, once the server uses it (None before)."""
        return self._ring if self._ring_live else None

    def wait(self, job_id: int, timeout: float | None = None) -> JobResult:
        """Block until job ``job_id`` finishes (at most ``timeout`` s, default the client's)
        and return its result; poll will not return it again."""
        with self._lock:
            self._claimed.add(job_id)
        try:
            outcome = self._wait_reply(job_id, self.timeout if timeout is None else timeout)
        finally:
            with self._lock:
                self._claimed.discard(job_id)
        return self._result(job_id, outcome)

    def ping(self, timeout: float | None = None) -> int:
        """The server's pid; TierUnavailableError if none answers."""
        reply = self._call(p.Ping(self._new_id()), timeout)
        assert isinstance(reply, p.Pong)
        return reply.pid

    def server_stats(self, timeout: float | None = None) -> dict[str, Any]:
        """The store's ``stats()`` under "store", the server's own counters under "server"."""
        reply = self._call(p.Stats(self._new_id()), timeout)
        assert isinstance(reply, p.StatsReply)
        return reply.stats

    def close(self) -> None:
        """Close the connection and every region this client made."""
        with self._lock:
            self.closed = True
            self._disconnect("the client was closed")
            for region in self._regions.values():
                region.close()
            self._regions.clear()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------- the Python API (async)
    async def put(self, key: KeyLike, tensor: torch.Tensor) -> PutStatus:
        return (await self.put_many([(key, tensor)]))[0]

    async def put_many(self, items: Iterable[tuple[KeyLike, torch.Tensor]]) -> list[PutStatus]:
        """Store each tensor under its key; TierUnavailableError if the server is down."""
        return await client_async.put_many(self, items)

    async def get(self, key: KeyLike) -> torch.Tensor | None:
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[KeyLike]) -> list[torch.Tensor | None]:
        """A CPU copy of each key's entry, or None (a miss, or the server unreachable)."""
        return await client_async.get_many(self, keys)

    async def delete(self, key: KeyLike) -> bool:
        reply = await self._acall(p.Delete(self._new_id(), p.key_to_wire(check_key(key))))
        assert isinstance(reply, p.Deleted)
        return reply.existed

    async def contains(self, key: KeyLike) -> str | None:
        reply = await self._acall(p.Contains(self._new_id(), p.key_to_wire(check_key(key))))
        assert isinstance(reply, p.Contained)
        return reply.tier

    async def stats(self) -> dict[str, Any]:
        reply = await self._acall(p.Stats(self._new_id()))
        assert isinstance(reply, p.StatsReply)
        return reply.stats

    # -------------------------------------------------------------- calls and replies
    def _new_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def _number(self, region: SharedRegion) -> int:
        if self._regions.get(region.number) is not region:
            raise InvalidValueError(f"{region!r} is not a region of this client (map_region)")
        return region.number

    def _submit(self, request: p.Load | p.Store | p.Holds, kind: type[JobResult], keys: int) -> int:
        with self._lock:
            self._pending.add(request.id)
            self._jobs[request.id] = (kind, keys)
            try:
                self._send(request)
            except TierUnavailableError as exc:
                self._pending.discard(request.id)
                self._done[request.id] = exc  # finishes as misses (failed) at the next poll
        return request.id

    def _call(self, request: p.Request, timeout: float | None) -> p.Reply:
        with self._lock:
            self._pending.add(request.id)
            self._claimed.add(request.id)
            try:
                self._send(request)
            except TierUnavailableError:
                self._pending.discard(request.id)
                self._claimed.discard(request.id)
                raise
        try:
            outcome = self._wait_reply(request.id, self.timeout if timeout is None else timeout)
        finally:
            with self._lock:
                self._claimed.discard(request.id)
        return checked(outcome)

    async def _acall(self, request: p.Request) -> p.Reply:
        with self._lock:
            self._pending.add(request.id)
            self._send(request)
        return checked(await self._await_reply(request.id))

    async def _await_reply(self, job_id: int) -> p.Reply | LmtierError:
        """The reply to ``job_id``, awaited without blocking the loop: the socket's readiness
        wakes every waiter of this loop, and each one reads what came."""
        return await client_async.await_reply(self, job_id)

    def _wait_reply(self, job_id: int, timeout: float) -> p.Reply | LmtierError:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._pump()
                if job_id in self._done:
                    return self._done.pop(job_id)
                sock = self._sock
            left = deadline - time.monotonic()
            if left <= 0:
                return self._give_up(job_id)
            if sock is None or job_id not in self._pending:
                return self._give_up(job_id)  # a disconnect has finished every pending call
            # In short slices: another thread's poll may read this reply while we wait here.
            # A socket closed by another thread meanwhile: the next pump finds out.
            with contextlib.suppress(OSError, ValueError):
                select.select([sock], [], [], min(left, 0.05))

    def _give_up(self, job_id: int) -> p.Reply | LmtierError:
        with self._lock:
            if job_id in self._done:  # it came after all
                return self._done.pop(job_id)
            self._pending.discard(job_id)
            self._discard.add(job_id)
        return TierUnavailableError(
            f"the lmtier server at {self.path} did not answer within {self.timeout}s"
        )

    def _result(self, job_id: int, outcome: p.Reply | LmtierError) -> JobResult:
        kind, keys = self._jobs.pop(job_id, (LoadResult, 0))
        if isinstance(outcome, p.Loaded):
            return LoadResult(job_id, outcome.found)
        if isinstance(outcome, p.Stored):
            return StoreResult(job_id, outcome.placed)
        if isinstance(outcome, p.Held):
            return HoldsResult(job_id, outcome.tiers)
        error = error_text(outcome)
        if kind is LoadResult:
            return LoadResult(job_id, [None] * keys, error)
        if kind is HoldsResult:
            return HoldsResult(job_id, [None] * keys, error)
        return StoreResult(job_id, [False] * keys, error)

    def _quiet(self) -> bool:
        """Nothing to read: the ring has not moved since the socket was last read to its end,
        and no job has waited long enough for the server's liveness to need checking."""
        ring = self._ring
        if ring is None or not self._ring_live or self._done or ring.count != self._ring_seen:
            return False
        return not self._pending or time.monotonic() - self._pumped_at < LIVENESS_S
