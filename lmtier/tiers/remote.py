"""A tier on a Redis or Valkey server (or a Redis Cluster), shared by every store that uses it.

**Layout.**  An entry is one string value under ``{key_prefix}:{digest}``: the digest hashes
the key (key text never becomes a key name) and the prefix defaults to one derived from the
store's namespace.  The value is the disk tier's entry format (``serde``: a header with the
key, namespace, dtype, shape and a checksum of all of them and the payload, then the payload),
so a value that is truncated, corrupt, of another format version, another namespace or another
key (a str key and a CacheEngineKey of the same text included) is detected and read as a miss.
Every store pointed at the server finds every other store's entries.

**Secret.**  That checksum is unkeyed: any client that can write to the server can build a
value that passes it, and a get serves it.  With ``auth_key`` (a secret shared by the stores
that trust each other) every checksum is keyed (``serde.EntryChecksums``), so a value planted
or altered by a client without the secret fails its check: it is never served, and is counted
as corrupt.  The key names then carry a tag derived from the secret (``key_prefix`` becomes
``{key_prefix}/{tag}``), so stores with different secrets, or one without, never read,
overwrite or delete each other's values (``clear_prefix`` included).

**Accounting.**  The index (``cache_dict``) and the evictor hold what *this* store charged:
the entries it wrote, and entries that other stores wrote which a get found on the server and
adopted (``fetch`` + ``try_adopt``: adopted when it fits beside what is charged without
evicting anything, else served without being indexed).  The budget bounds this store's share
of the server; the server's ``maxmemory`` (with an ``allkeys-lru`` policy) bounds the total.
Nothing scans the server: an entry that vanished behind the index's back (another store
deleted it, the server evicted it or restarted empty) or was replaced by another store's write
is discharged when noticed, i.e. when a read finds nothing or another value.  The store then
drops it from the index, which discharges its bytes, so the evictor's charge always equals the
sizes of the indexed entries.  Entries promoted to a higher tier are left on the server for the
other stores (un-indexed here) until a put through this store replaces the key; a delete
through the store removes the server's copy too.

**Faults.**  Every round trip is bounded by ``op_timeout_s`` (an ``asyncio.timeout`` around it:
redis-py's own socket timeout would wrap every send in one more task), a reconnection by
``connect_timeout_s + op_timeout_s``.  A failure marks the tier unavailable: until a probe
succeeds, reads and writes fail at once with ``TierUnavailableError`` (counted in
``unavailable``), which the store turns into misses and puts that fall through.  The first
operation after the backoff probes the server with a PING on a new connection; the backoff
doubles from 0.1 s up to ``reconnect_max_s``.

**Batching.**  Commands issued in the same event-loop turn (``put_many``, ``get_many``, a burst
of demotions) go to the server together: one round trip (``round_trip`` on one connection; on a
cluster redis-py's pipeline, one round trip per node).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import torch
from redis.asyncio.cluster import RedisCluster

from lmtier import serde
from lmtier.errors import CorruptEntryError, StorageError, TierUnavailableError
from lmtier.evictor import BaseEvictor
from lmtier.keys import KeyLike
from lmtier.metadata import DiskCacheMetadata
from lmtier.tiers.base import Tier
from lmtier.tiers.copies import check_out, copy_to
from lmtier.tiers.disk_files import key_digest
from lmtier.tiers.redis_connections import ValueParts
from lmtier.tiers.remote_connection import (
    FIRST_BACKOFF_S,
    RemoteConnection,
    close_quietly,
)
from lmtier.tiers.remote_order import OrderedCommands
from lmtier.tiers.value_buffers import ValueBuffers

__all__ = ["RemoteEntry", "RemoteTier", "default_key_prefix"]

log = logging.getLogger(__name__)

# Checking or decoding a value costs up to ~0.15 ms per MiB (a checksum, and a copy): up to this
# size that holds the loop for less than a worker thread's hop takes on a busy machine.
INLINE_CODEC_BYTES = 4 << 20
# A keyed checksum (BLAKE3, ~0.2 ms per MiB) makes that ~0.3 ms per MiB.
KEYED_INLINE_CODEC_BYTES = 2 << 20
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class RemoteEntry(DiskCacheMetadata):
    """A remote entry: ``path`` is its key name on the server, ``size`` its payload bytes."""

    key: KeyLike = field(default="", compare=False)


def default_key_prefix(namespace: str) -> str:
    """The key prefix of a namespace: stores of other namespaces never see its entries."""
    digest = hashlib.blake2b(namespace.encode("utf-8", "surrogatepass"), digest_size=8)
    return f"lmtier:{digest.hexdigest()}"


class RemoteTier(RemoteConnection, OrderedCommands, Tier):
    """Entries are values on a Redis/Valkey server or cluster; ``cache_dict`` holds
    ``RemoteEntry`` objects.  See the module docstring for sharing, accounting and faults."""

    loads_are_private = True
    shared = True

    def __init__(
        self,
        name: str,
        evictor: BaseEvictor,
        url: str,
        *,
        namespace: str = "",
        key_prefix: str | None = None,
        username: str | None = None,
        password: str | None = None,
        cluster: bool = False,
        connect_timeout_s: float = 2.0,
        op_timeout_s: float = 2.0,
        reconnect_max_s: float = 10.0,
        tls_files: tuple[str | None, str | None, str | None] = (None, None, None),
        auth_key: bytes | None = None,
    ) -> None:
        """``tls_files``: with a rediss:// url, the CA bundle (None: the system's), then this
        client's certificate and key (None unless the server asks for them).  ``auth_key``:
        a secret that keys every checksum and tags every key name (see the module docstring)."""
        super().__init__(name, evictor)
        self.url = url
        self.namespace = namespace
        self._checksums = serde.EntryChecksums(auth_key)
        tag = self._checksums.name_tag(namespace)
        # "/" where an unkeyed prefix has ":": no tier's SCAN pattern matches another's names.
        base = key_prefix or default_key_prefix(namespace)
        self.key_prefix = base if tag is None else f"{base}/{tag}"
        self.cluster = cluster
        self.connect_timeout_s = connect_timeout_s
        self.op_timeout_s = op_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self._credentials = {"username": username, "password": password}
        tls_options = zip(("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"), tls_files, strict=True)
        self._tls = {option: path for option, path in tls_options if path is not None}
        self.round_trips = 0  # batches sent (one round trip each, one per node on a cluster)
        self._client: aioredis.Redis | RedisCluster | None = None
        self._next_probe = 0.0  # loop time before which no reconnection is tried
        self._backoff = FIRST_BACKOFF_S
        self._probing = False
        self._queue = []
        self._flushes = set()
        self._writing: Counter[KeyLike] = Counter()  # keys with a SET in flight
        self._init_order()
        self._buffers = ValueBuffers()
        self._sends_parts = False  # whether the client sends ``ValueParts`` without joining
        self._gone: set[RemoteEntry] = set()  # removed entries whose value is not theirs to delete

    @property
    def home_device(self) -> torch.device:
        return _CPU

    @property
    def available(self) -> bool:
        """Whether the tier is connected (False while the server is down or being probed)."""
        return self._client is not None

    @property
    def reachable(self) -> bool:
        """Connected, or down but due for a probe (so that the next operation tries again)."""
        if self._client is not None:
            return True
        return not self._probing and asyncio.get_running_loop().time() >= self._next_probe

    def name_for(self, key: KeyLike) -> str:
        """The key name of ``key``'s value on the server."""
        return f"{self.key_prefix}:{key_digest(key)}"

    # ------------------------------------------------------------------ open and close
    async def open(self) -> None:
        """Connect; a server that is down leaves the tier unavailable, not the store unusable."""
        try:
            await self._connected()
        except TierUnavailableError as exc:
            log.warning("redis tier %r starts unavailable: %s", self.name, exc)

    async def close(self) -> None:
        while self._flushes:
            await asyncio.gather(*list(self._flushes), return_exceptions=True)
        client, self._client = self._client, None
        self._buffers = ValueBuffers()
        if client is not None:
            await close_quietly(client)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "available": self.available, "round_trips": self.round_trips}

    # ------------------------------------------------------------------ primitives
    async def write(
        self, key: KeyLike, tensor: torch.Tensor, current: Callable[[], bool] | None = None
    ) -> RemoteEntry:
        """``_write``, whose SET is not sent once ``current()`` is false."""
        return await self._write(key, tensor, current)

    async def _write(
        self, key: KeyLike, tensor: torch.Tensor, current: Callable[[], bool] | None = None
    ) -> RemoteEntry:
        host = await copy_to(tensor, _CPU, private=True)
        payload = serde.payload_view(host)
        large = payload.nbytes > self._inline_codec_bytes()
        checksums = self._checksums
        if large:
            digest = await asyncio.to_thread(checksums.payload_digest, payload)
        else:
            digest = checksums.payload_digest(payload)
        shape = tuple(host.shape)
        checksum = checksums.entry_checksum(
            key, host.dtype, shape, payload.nbytes, digest, self.namespace
        )
        header = serde.encode_header(
            key, host.dtype, shape, payload.nbytes, checksum, self.namespace
        )
        entry = RemoteEntry(
            self.name_for(key), payload.nbytes, shape, host.dtype, checksum, key=key
        )
        # Header and payload form one value, so that a SET is atomic.
        parts = ValueParts(header, payload)
        value: ValueParts | memoryview = parts
        buffer = None
        if not self._sends_parts:  # a client that takes only whole values: join them
            buffer = self._buffers.take(parts.nbytes)
            if large:
                value = await asyncio.to_thread(parts.joined_into, memoryview(buffer))
            else:
                value = parts.joined_into(memoryview(buffer))
        # Asked once the key's earlier commands have landed: a write gone stale meanwhile (a
        # newer put of the key landed and committed, or a delete ran) sends nothing, since its
        # SET would replace the newer value, and its discard then DEL the name.
        skipped = False

        def stale() -> bool:
            nonlocal skipped
            skipped = current is not None and not current()
            return skipped

        # A removed entry of this key must not delete the value being written (same name).
        self._writing[key] += 1
        try:
            await self._in_order(
                key,
                "SET",
                entry.path,
                value,
                unless=stale,
                landed=functools.partial(self._remember, key, checksum),
            )
        finally:
            self._writing[key] -= 1
            if not self._writing[key]:
                del self._writing[key]
        del value, parts  # sent whole, or not at all: nothing refers to the buffer any more
        if buffer is not None:
            self._buffers.give_back(buffer)
        if skipped:
            self._mark_gone(entry)  # nothing of it is on the server: its discard deletes nothing
        return entry

    async def load(self, obj: Any) -> torch.Tensor | None:
        assert isinstance(obj, RemoteEntry)
        return await self._read(obj, None)

    async def load_into(self, obj: Any, out: torch.Tensor) -> torch.Tensor | None:
        """Decode straight into ``out`` when it is contiguous host memory."""
        assert isinstance(obj, RemoteEntry)
        check_out(out, obj.shape or (), obj.dtype or out.dtype)
        if not out.is_cpu or not out.is_contiguous() or out.is_neg() or out.is_conj():
            return await super().load_into(obj, out)
        return await self._read(obj, out)

    async def _read(self, entry: RemoteEntry, out: torch.Tensor | None) -> torch.Tensor | None:
        value = await self._command("GET", entry.path)
        if value is None:  # deleted by another store, evicted by the server, or a restart
            self._mark_gone(entry)
            return None
        header = self._check_header(value, entry.key)
        if (header.nbytes, header.dtype, header.shape, header.checksum) != (
            entry.size,
            entry.dtype,
            entry.shape,
            entry.checksum,
        ):
            # Another store replaced it (its value, not ours to delete), unless the value fails
            # its checksum: then it is corrupt, and counted so.
            await self._decode(value, header, None)
            self._mark_gone(entry)
            return None
        return await self._decode(value, header, out)

    async def fetch(self, key: KeyLike) -> tuple[Any, torch.Tensor] | None:
        """GET the key's value: an entry another store wrote."""
        if key in self._suspect:  # maybe older than what this store put or deleted since
            with contextlib.suppress(StorageError):
                await self._in_order(key, "DEL", self.name_for(key))
            return None
        try:
            value = await self._command("GET", self.name_for(key))
            if value is None:
                return None
            header = self._check_header(value, key)
            if self._wrote.get(key) == header.checksum:
                # This store's own write.  Indexed or being written again, it is the key's
                # current value (a put that landed while the GET was on its way): left alone.
                # Else a value it removed, or a stale move's, whose DEL did not reach the
                # server; the DEL is ordered before any SET of the key issued after this check.
                if key not in self.cache_dict and key not in self._writing:
                    await self._in_order(key, "DEL", self.name_for(key))
                return None
            tensor = await self._decode(value, header, None)
        except CorruptEntryError as exc:
            self.counters.corrupt += 1
            log.warning("redis tier %r: the value of %r is unusable: %s", self.name, key, exc)
            return None
        except StorageError:
            return None  # counted where it happened
        entry = RemoteEntry(
            self.name_for(key), header.nbytes, header.shape, header.dtype, header.checksum, key=key
        )
        return entry, tensor

    def _inline_codec_bytes(self) -> int:
        """The largest value checked and decoded on the event loop."""
        if self._checksums.keyed:
            return min(INLINE_CODEC_BYTES, KEYED_INLINE_CODEC_BYTES)
        return INLINE_CODEC_BYTES

    def _mark_gone(self, entry: RemoteEntry) -> None:
        # The store discards a dropped entry unless it moved meanwhile; bound what is left over.
        if len(self._gone) >= 4096:
            self._gone.clear()
        self._gone.add(entry)

    def _check_header(self, value: bytes, key: KeyLike) -> serde.EntryHeader:
        header = serde.decode_header(value)
        self._checksums.check_kind(header, "value")
        if header.key != key or header.namespace != self.namespace:
            raise CorruptEntryError(
                f"value holds {header.key!r} of namespace {header.namespace!r}, "
                f"not {key!r} of {self.namespace!r}"
            )
        if len(value) != header.file_size:
            raise CorruptEntryError(f"value is {len(value)} bytes, its header promises "
                                    f"{header.file_size}")  # fmt: skip
        return header

    async def _decode(
        self, value: bytes, header: serde.EntryHeader, out: torch.Tensor | None
    ) -> torch.Tensor:
        if header.nbytes > self._inline_codec_bytes():
            return await asyncio.to_thread(_decode_payload, value, header, out, self._checksums)
        return _decode_payload(value, header, out, self._checksums)

    async def discard(self, obj: Any) -> None:
        assert isinstance(obj, RemoteEntry)
        if obj in self._gone:
            self._gone.discard(obj)
            return
        if obj.key in self._writing:
            return  # a SET in flight replaces the value under the name
        indexed = self.cache_dict.get(obj.key)
        if indexed is not None and (
            indexed.checksum == obj.checksum or self._wrote.get(obj.key) != obj.checksum
        ):
            return  # the key was written again since: the name holds the newer value
        # Else this entry's SET is the last that landed: a stale move's write that landed
        # after the indexed value's overwrote it, and must not outlive the move.
        try:
            await self._in_order(obj.key, "DEL", obj.path)
        except StorageError as exc:  # the entry is gone from the index either way
            log.info("redis tier %r could not delete %s: %s", self.name, obj.path, exc)

    async def forget(self, key: KeyLike) -> bool:
        try:
            # After any SET of the key already issued; not if this store's write of it
            # committed meanwhile or is in flight: a put newer than the delete, whose value
            # the name holds (an entry adopted from another store is deleted all the same).
            return bool(
                await self._in_order(key, "DEL", self.name_for(key), unless=self._written(key))
            )
        except StorageError:
            return False

    def _written(self, key: KeyLike) -> Callable[[], bool]:
        def written() -> bool:
            indexed = self.cache_dict.get(key)
            ours = indexed is not None and self._wrote.get(key) == indexed.checksum
            return ours or key in self._writing

        return written


def _decode_payload(
    value: bytes,
    header: serde.EntryHeader,
    out: torch.Tensor | None,
    checksums: serde.EntryChecksums,
) -> torch.Tensor:
    tensor = torch.empty(header.shape, dtype=header.dtype) if out is None else out
    payload = serde.payload_view(tensor)
    payload[:] = memoryview(value)[header.payload_offset :]
    checksums.check(header, checksums.payload_digest(payload), "value")
    return tensor
