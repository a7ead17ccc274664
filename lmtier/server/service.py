"""The server: one ``TieredStore`` behind a Unix socket, serving its owner's processes.

Each connection runs as a task of its own: it reads frames, maps the regions its client
sends, and runs each job as a task, so a slow job, a client that stops reading its replies or
one that sends half a frame holds up only itself.  Loads read hits straight into the client's
shared memory and stores put views of it; no payload byte crosses the socket.  After each reply
is sent, the connection's completion ring (``ring.py``) counts it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import torch

from lmtier.errors import InvalidValueError, LmtierError
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike
from lmtier.server import protocol as p
from lmtier.server.loads import load_into_region
from lmtier.server.regions import map_region
from lmtier.server.ring import CompletionRing
from lmtier.store import TieredStore

__all__ = ["Server"]

log = logging.getLogger(__name__)

_RECV_BYTES = 1 << 16
_MAX_FDS_PER_READ = 4
_FDS_SPACE = socket.CMSG_SPACE(_MAX_FDS_PER_READ * array.array("i").itemsize)
# Descriptors received and not yet claimed by a MapRegion: more means a broken peer.
_MAX_QUEUED_FDS = 16
# Requests of one connection being served at once; past it the connection is read no further
# until replies have gone out, so a client that never reads its replies stops only itself.
_MAX_IN_FLIGHT = 64
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class Server:
    """Serves ``store`` on a listening Unix socket until ``close``."""

    def __init__(self, store: TieredStore, listener: socket.socket, path: Path) -> None:
        self.store = store
        self.path = path
        # Whether a key no index holds may still be on a shared tier (another server's write).
        self.shared = any(info.shared for info in store.tier_infos())
        self._listener = listener
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # EMFILE and the like: refuse this one, keep listening
                log.warning("lmtier server: accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)  # the descriptor shortage needs time to pass
                continue
            connection = _Connection(self, sock)
            self._connections.add(connection)
            task = loop.create_task(connection.run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)

    def stats(self) -> dict[str, Any]:
        regions = [r for c in self._connections for r in c.regions.values()]
        return {
            "pid": os.getpid(),
            "connections": len(self._connections),
            "regions": len(regions),
            "region_bytes": sum(r.numel() for r in regions),
            "jobs": sum(len(c.jobs) for c in self._connections),
            "rings": sum(c.ring is not None for c in self._connections),
        }

    async def close(self) -> None:
        """Stop accepting, end every connection (their jobs finish first), remove the socket."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for connection in list(self._connections):
            connection.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _Connection:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.server = server
        self.store = server.store
        self.sock = sock
        self.regions: dict[int, torch.Tensor] = {}
        self.ring: CompletionRing | None = None
        self._ring_region = -1
        self._ring_memory: torch.Tensor | None = None
        self.jobs: set[asyncio.Task[None]] = set()
        self._fds: deque[int] = deque()
        self._frames = p.FrameReader()
        self._in_flight = asyncio.Semaphore(_MAX_IN_FLIGHT)
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._peer = "peer"

    async def run(self) -> None:
        try:
            if self._admitted():
                await self._serve()
        except (ConnectionError, OSError) as exc:
            log.info("lmtier server: %s: connection lost: %s", self._peer, exc)
        finally:
            self.close()
            # The jobs still running keep the regions they use until they end.
            if self.jobs:
                await asyncio.gather(*self.jobs, return_exceptions=True)
            self.regions.clear()
            self.ring, self._ring_memory = None, None
            self._release()
            self.server.forget(self)

    def _admitted(self) -> bool:
        """Only processes of the server's own user may use it (SO_PEERCRED)."""
        raw = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, _ = _PEERCRED.unpack(raw)
        self._peer = f"pid {pid} (uid {uid})"
        if uid == os.geteuid():
            return True
        log.warning("lmtier server: refused %s: not the server's user", self._peer)
        why = f"refused: uid {uid} is not the server's user (uid {os.geteuid()})"
        refusal = p.Error(0, "PermissionError", why)
        with contextlib.suppress(OSError):
            self.sock.send(p.encode_frame(refusal))
        return False

    async def _serve(self) -> None:
        while True:
            data = await self._receive()
            if not data:
                if self._frames.pending:
                    log.warning(
                        "lmtier server: %s closed mid-frame (%s): dropped",
                        self._peer,
                        self._frames.describe_pending(),
                    )
                return
            try:
                bodies = self._frames.feed(data)
            except p.FrameError as exc:
                log.warning("lmtier server: %s sent %s: closing its connection", self._peer, exc)
                await self._send(p.Error(0, "FrameError", f"{exc}: closing the connection"))
                return
            for body in bodies:
                await self._in_flight.acquire()
                self._dispatch(body)

    async def _receive(self) -> bytes:
        """The next bytes from the peer (b'' at its end); descriptors that come along are
        queued for the MapRegion frames they belong to."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(_RECV_BYTES, _FDS_SPACE)
            except (BlockingIOError, InterruptedError):
                ready = loop.create_future()
                fd = self.sock.fileno()
                loop.add_reader(fd, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                continue
            except ConnectionResetError:
                return b""
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                log.warning("lmtier server: %s sent too many descriptors at once", self._peer)
            if len(self._fds) > _MAX_QUEUED_FDS:
                raise ConnectionError(f"{len(self._fds)} descriptors sent without a MapRegion")
            return data

    def _dispatch(self, body: bytes) -> None:
        try:
            request = p.decode_request(body)
        except msgspec.DecodeError as exc:
            log.warning("lmtier server: %s sent a malformed message: %s", self._peer, exc)
            reply: p.Reply = p.Error(0, "MalformedMessage", f"malformed message: {exc}")
            self._start(self._reply(reply))
            return
        if isinstance(request, p.MapRegion | p.UnmapRegion | p.Doorbell):
            # At once, in order: the jobs after it in the stream must find the region.
            self._start(self._reply(self._answer(self._regions_request, request)))
        else:
            self._start(self._job(request))

    def _start(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.jobs.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.jobs.discard(task)
        self._in_flight.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("lmtier server: a job failed", exc_info=task.exception())

    async def _job(self, request: p.Request) -> None:
        try:
            reply = await self._handle(request)
        except LmtierError as exc:
            reply = p.Error(request.id, type(exc).__name__, str(exc))
        except Exception as exc:
            log.exception("lmtier server: %s: %s failed", self._peer, type(request).__name__)
            reply = p.Error(request.id, "InternalError", f"{type(exc).__name__}: {exc}")
        await self._reply(reply)

    def _answer(self, handler: Any, request: p.Request) -> p.Reply:
        try:
            reply: p.Reply = handler(request)
        except LmtierError as exc:
            reply = p.Error(request.id, type(exc).__name__, str(exc))
        return reply

    async def _reply(self, reply: p.Reply) -> None:
        await self._send(reply)

    async def _send(self, reply: p.Reply) -> None:
        if self._closed:
            return  # the client is gone: its job's effects stand, its answer has no reader
        frame = p.encode_frame(reply)
        async with self._send_lock:
            try:
                await asyncio.get_running_loop().sock_sendall(self.sock, frame)
            except OSError as exc:
                log.info("lmtier server: %s: reply lost: %s", self._peer, exc)
                self.close()
                return
            if self.ring is not None:  # only now: the reply is on the socket for the client
                self.ring.record(reply.id)

    def close(self) -> None:
        """Stop talking to the peer: the reader sees the end, a blocked reply fails."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _release(self) -> None:
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())

    # -------------------------------------------------------------- requests
    def _regions_request(self, request: p.MapRegion | p.UnmapRegion | p.Doorbell) -> p.Reply:
        if isinstance(request, p.Doorbell):
            # The ring leaves the data regions: no job may write over it.
            region = self.regions.pop(request.region, None)
            if region is None:
                raise InvalidValueError(f"region {request.region} is not mapped")
            self.ring = CompletionRing(region.numpy().data)
            self._ring_region, self._ring_memory = request.region, region
            return p.Mapped(request.id, request.region)
        if isinstance(request, p.UnmapRegion):
            if request.region == self._ring_region:
                self.ring, self._ring_region, self._ring_memory = None, -1, None
            elif self.regions.pop(request.region, None) is None:
                raise InvalidValueError(f"region {request.region} is not mapped")
            return p.Mapped(request.id, request.region)
        if not self._fds:
            raise InvalidValueError("MapRegion came without a file descriptor (SCM_RIGHTS)")
        fd = self._fds.popleft()
        if request.region in self.regions:
            os.close(fd)
            raise InvalidValueError(f"region {request.region} is mapped already")
        self.regions[request.region] = map_region(fd, request.size, sealed=not request.unsealed)
        return p.Mapped(request.id, request.region)

    async def _handle(self, request: p.Request) -> p.Reply:
        if isinstance(request, p.Load):
            return await self._load(request)
        if isinstance(request, p.Store):
            return await self._store(request)
        if isinstance(request, p.Ping):
            return p.Pong(request.id, p.PROTOCOL_VERSION, os.getpid())
        if isinstance(request, p.Delete):
            return p.Deleted(request.id, await self.store.delete(p.key_from_wire(request.key)))
        if isinstance(request, p.Contains):
            return p.Contained(request.id, await self.store.contains(p.key_from_wire(request.key)))
        if isinstance(request, p.Holds):
            return p.Held(request.id, await self._holders(request.keys))
        if isinstance(request, p.Stats):
            return p.StatsReply(
                request.id, {"store": self.store.stats(), "server": self.server.stats()}
            )
        raise InvalidValueError(f"{type(request).__name__} is not a job this server runs")

    async def _holders(self, wire: list[p.WireKey]) -> list[str | None]:
        """Each key's tier; a key no index holds is looked for on the shared tiers (another
        server's write), which index it when found."""
        keys = [p.key_from_wire(key) for key in wire]
        tiers = [self.store.holder(key) for key in keys]
        if self.server.shared and None in tiers:
            missing = [i for i, tier in enumerate(tiers) if tier is None]
            await self.store.get_many([keys[i] for i in missing])
            for i in missing:
                tiers[i] = self.store.holder(keys[i])
        return tiers

    def _blocks(
        self, region_number: int, keys: list[p.WireKey], offsets: list[int], sizes: list[int]
    ) -> tuple[torch.Tensor, list[KeyLike]]:
        region = self.regions.get(region_number)
        if region is None:
            raise InvalidValueError(f"region {region_number} is not mapped: send MapRegion first")
        if not len(keys) == len(offsets) == len(sizes):
            raise InvalidValueError(
                f"{len(keys)} keys, {len(offsets)} offsets and {len(sizes)} sizes: one each"
            )
        limit = region.numel()
        for offset, size in zip(offsets, sizes, strict=True):
            if offset < 0 or size < 0 or offset + size > limit:
                raise InvalidValueError(
                    f"block [{offset}, {offset + size}) is outside region {region_number} "
                    f"({limit} bytes)"
                )
        return region, [p.key_from_wire(key) for key in keys]

    async def _load(self, request: p.Load) -> p.Loaded:
        region, keys = self._blocks(request.region, request.keys, request.offsets, request.sizes)
        found = await load_into_region(self.store, region, keys, request.offsets, request.sizes)
        return p.Loaded(request.id, found)

    async def _store(self, request: p.Store) -> p.Stored:
        region, keys = self._blocks(request.region, request.keys, request.offsets, request.sizes)
        if not len(keys) == len(request.dtypes) == len(request.shapes):
            raise InvalidValueError(
                f"{len(keys)} keys, {len(request.dtypes)} dtypes and {len(request.shapes)} "
                "shapes: one each"
            )
        items = [
            (key, _block(region, offset, size, dtype, shape))
            for key, offset, size, dtype, shape in zip(
                keys, request.offsets, request.sizes, request.dtypes, request.shapes, strict=True
            )
        ]
        statuses = await self.store.put_many(items)
        return p.Stored(request.id, [status is PutStatus.LEGAL for status in statuses])


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _block(region: torch.Tensor, offset: int, size: int, dtype: str, shape: list[int]) -> Any:
    """The block at ``offset`` as a tensor of ``dtype`` and ``shape`` (a view, no copy)."""
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise InvalidValueError(f"{dtype!r} is not a torch dtype")
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidValueError(f"shape {shape} has a negative dimension")
        count *= dim
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    if count * itemsize != size:
        raise InvalidValueError(
            f"a {dtype} tensor of shape {shape} has {count * itemsize} bytes, the block {size}"
        )
    if offset % itemsize:
        raise InvalidValueError(f"offset {offset} is not aligned to {dtype} ({itemsize} bytes)")
    return region[offset : offset + size].view(torch_dtype).view(shape)
