"""The socket side of ``ServerClient``: connecting (and mapping the regions again), the
completion ring of a connection, sending frames, and reading and filing replies without
blocking.  Kept apart from the calls an engine makes, which only submit and collect."""

from __future__ import annotations

import asyncio
import itertools
import logging
import select
import socket
import threading
import time
from pathlib import Path

import msgspec

from lmtier import errors
from lmtier.errors import LmtierError, TierUnavailableError
from lmtier.server import protocol as p
from lmtier.server.nogil import Receiver, send_now
from lmtier.server.paths import check_folder
from lmtier.server.regions import SharedRegion
from lmtier.server.ring import RING_BYTES, CompletionRing

__all__ = ["RING_REGION", "ServerConnection"]

log = logging.getLogger("lmtier.server.client")

# After a failed connect, calls fail at once for this long instead of trying again each time.
_RECONNECT_BACKOFF_S = 0.05
#: The region number of a connection's completion ring (the client numbers its own from 1).
RING_REGION = 0


class ServerConnection:
    """The connection's state and its socket-level steps (see ``ServerClient``)."""

    path: Path
    send_timeout: float
    closed: bool
    _lock: threading.RLock
    _sock: socket.socket | None
    _frames: p.FrameReader
    _receive: Receiver
    _ids: itertools.count[int]
    _regions: dict[int, SharedRegion]
    _pending: set[int]
    _done: dict[int, p.Reply | LmtierError]
    _discard: set[int]
    _async_waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]]
    _reader_fd: dict[asyncio.AbstractEventLoop, int]
    _retry_at: float
    _down_reason: str
    _ring: CompletionRing | None
    _ring_region: SharedRegion | None
    _ring_request: int
    _ring_live: bool
    _ring_seen: int
    _pumped_at: float

    def _connected(self) -> socket.socket:
        """The connection, made (and the regions mapped again) if there is none."""
        if self._sock is not None:
            return self._sock
        if self.closed:
            raise errors.StoreClosedError("the ServerClient is closed")
        now = time.monotonic()
        if now < self._retry_at:
            raise TierUnavailableError(self._down_reason)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # A socket in a folder another user controls could be anyone's: never trust it.
            check_folder(self.path.parent)
            sock.settimeout(self.send_timeout)
            sock.connect(str(self.path))
        except (OSError, LmtierError) as exc:
            sock.close()
            self._retry_at = now + _RECONNECT_BACKOFF_S
            self._down_reason = f"no lmtier server answers at {self.path}: {exc}"
            raise TierUnavailableError(self._down_reason) from None
        sock.setblocking(False)
        self._sock = sock
        self._frames = p.FrameReader()
        for region in self._regions.values():
            self._send_map(region)
        self._open_ring()
        return sock

    def _open_ring(self) -> None:
        """A fresh completion ring for this connection (a server still finishing an old
        connection's jobs may write in the old one)."""
        region = SharedRegion(RING_BYTES, RING_REGION, name="lmtier-ring")
        self._ring_region = region
        self._ring = CompletionRing(region.tensor.numpy().data)
        self._ring_live = False
        self._ring_seen = 0
        self._send_map(region)
        self._ring_request = next(self._ids)
        self._send_unclaimed(p.Doorbell(self._ring_request, RING_REGION))

    def _send_map(self, region: SharedRegion) -> None:
        request = p.MapRegion(next(self._ids), region.number, region.size, not region.sealed)
        self._send_unclaimed(request, region.fd)

    def _send_unclaimed(self, request: p.Request, fd: int | None = None) -> None:
        self._discard.add(request.id)
        self._send(request, fd)

    def _send(self, request: p.Request, fd: int | None = None) -> None:
        sock = self._connected()
        frame = memoryview(p.encode_frame(request))
        deadline = time.monotonic() + self.send_timeout
        sent = 0
        try:
            while sent < len(frame):
                try:
                    if fd is not None and sent == 0:
                        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))]
                        sent += sock.sendmsg([frame], rights)
                    else:
                        done = send_now(sock.fileno(), bytes(frame[sent:]))
                        if not done:
                            raise BlockingIOError
                        sent += done
                except (BlockingIOError, InterruptedError):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(
                            f"the server read nothing for {self.send_timeout}s"
                        ) from None
                    select.select([], [sock], [], left)
        except OSError as exc:  # a half-sent frame: the stream is lost either way
            reason = f"lost the lmtier server at {self.path}: {exc}"
            self._disconnect(reason)
            raise TierUnavailableError(reason) from None

    def _pump(self) -> None:
        """Read every reply that has come, without blocking."""
        # Read before the socket: a reply counted here is on the socket by then.
        seen = self._ring.count if self._ring is not None else 0
        sock = self._sock
        while sock is not None:
            try:
                data = self._receive(sock.fileno())
            except OSError as exc:
                self._disconnect(f"lost the lmtier server at {self.path}: {exc}")
                return
            if data is None:
                self._ring_seen = seen
                self._pumped_at = time.monotonic()
                return
            if not data:
                self._disconnect(f"the lmtier server at {self.path} closed the connection")
                return
            try:
                replies = [p.decode_reply(body) for body in self._frames.feed(data)]
            except (p.FrameError, msgspec.DecodeError) as exc:
                self._disconnect(f"the lmtier server at {self.path} sent a bad reply: {exc}")
                return
            for reply in replies:
                self._file(reply)

    def _file(self, reply: p.Reply) -> None:
        if reply.id in self._discard:
            self._discard.discard(reply.id)
            if reply.id == self._ring_request and isinstance(reply, p.Mapped):
                self._ring_live = True
            if isinstance(reply, p.Error):
                log.warning("lmtier server: %s: %s", reply.kind, reply.message)
        elif reply.id in self._pending:
            self._pending.discard(reply.id)
            self._done[reply.id] = reply
            self._wake_all()
        elif isinstance(reply, p.Error):
            self._down_reason = f"{reply.kind}: {reply.message}"
            log.warning("lmtier server: %s", self._down_reason)

    def _disconnect(self, reason: str) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        log.info("%s", reason)
        self._ring, self._ring_live = None, False
        if self._ring_region is not None:
            self._ring_region.close()
            self._ring_region = None
        for job_id in self._pending:
            self._done[job_id] = TierUnavailableError(reason)
        self._pending.clear()
        self._discard.clear()
        self._wake_all()

    def _wake_all(self) -> None:
        for loop in list(self._async_waiters):
            try:
                loop.call_soon_threadsafe(self._wake_loop, loop)
            except RuntimeError:  # a closed loop has no waiters left
                self._async_waiters.pop(loop, None)

    def _wake_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``'s thread: drop its reader, wake its waiters (each one re-reads)."""
        with self._lock:
            fd = self._reader_fd.pop(loop, None)
            waiters = self._async_waiters.pop(loop, [])
        if fd is not None:
            loop.remove_reader(fd)
        for ready in waiters:
            if not ready.done():
                ready.set_result(None)
