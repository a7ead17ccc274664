"""A tier on local disk: one safetensors file per entry, written atomically off the event loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lmtier import serde
from lmtier.errors import CorruptEntryError, StorageError
from lmtier.evictor import BaseEvictor
from lmtier.keys import KeyLike
from lmtier.metadata import DiskCacheMetadata
from lmtier.tiers.base import Tier
from lmtier.tiers.batching import ThreadBatcher
from lmtier.tiers.copies import check_out, copy_blocking
from lmtier.tiers.disk_files import (
    LOCK_NAME,
    SUFFIX,
    TEMP_PREFIX,
    key_digest,
    namespace_folder,
    open_regular,
    open_regular_stat,
    read_header,
    remove_own,
    tensor_from,
)
from lmtier.tiers.disk_recovery import (
    Recovery,
    file_id,
    lock_private_folder,
    recover,
    warn_if_short_of_room,
)
from lmtier.tiers.private_folder import (
    DEFAULT_MODE,
    check_mode,
    folder_mode,
)

__all__ = ["DiskTier", "Recovery"]

log = logging.getLogger(__name__)

# Writes smaller than this share worker-thread hops; larger ones take a thread each, so that
# several run in parallel.
BATCHED_WRITE_BYTES = 1 << 20
# Reads up to this size are first tried on the event loop, from the page cache alone
# (RWF_NOWAIT: the loop never waits on the device).  Reading and verifying 2 MiB that are
# cached takes ~0.2 ms, less than the thread hop it saves (0.2-0.37 ms on a 2-core VM), and
# no more than the host copies that run on the loop (``copies.LOOP_COPY_BYTES``).
LOOP_READ_BYTES = 4 << 20
# With a secret the checksum is keyed BLAKE3 (~0.2 ms per MiB here, xxh3 ~0.02): half the
# size holds the loop about as long as 4 MiB without (~0.45 ms), and a 2 MiB chunk still
# skips the thread hop.
KEYED_LOOP_READ_BYTES = 2 << 20
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class DiskTier(Tier):
    """Entries are files under ``root``, named by a hash of the key; ``cache_dict`` holds metadata.

    Every write goes to a new, unique file name through a temporary file and a rename, so a
    reader never sees a half-written file and a replaced entry's old file is never rewritten
    in place.  ``durability="fsync"`` also syncs the file before the rename and its folder
    after.  Each ``namespace`` has its own sub-folder; one store at a time holds it (a lock
    file, released on close or when the process dies).  Opening rebuilds the index from the
    files' headers.  The folder is the tier's alone: no link is followed out of it, only
    regular files are opened or deleted, and a folder removed or replaced behind the store's
    back is never recreated (writes fail instead, and the put goes elsewhere).  It is private:
    files get ``mode`` (0o600 unless given) and folders ``mode`` with an execute bit per read
    bit, whatever the umask; a folder another user owns or can write in is refused.

    With ``auth_key`` (a secret), every entry's checksum is keyed (``serde.EntryChecksums``):
    a file that someone without the secret wrote or altered fails its check when read, and is
    dropped, counted as corrupt and read as a miss, never served.
    """

    loads_are_private = True
    discards_behind = True

    def __init__(
        self,
        name: str,
        evictor: BaseEvictor,
        root: str | os.PathLike[str],
        durability: str = "none",
        namespace: str = "",
        mode: int = DEFAULT_MODE,
        *,
        auth_key: bytes | None = None,
    ) -> None:
        super().__init__(name, evictor)
        self._checksums = serde.EntryChecksums(auth_key)
        if durability not in ("none", "fsync"):
            raise ValueError(f"durability must be 'none' or 'fsync', got {durability!r}")
        self.namespace = namespace
        self.mode = check_mode(mode, name)
        self._folder_mode = folder_mode(mode)
        self._given_path = Path(os.path.abspath(Path(root).expanduser()))  # links unresolved
        tag = self._checksums.name_tag(namespace)
        self.root = namespace_folder(Path(root).expanduser().resolve(), namespace, tag)
        self.fsync = durability == "fsync"
        self.recovery = Recovery()
        self._lock_fd: int | None = None
        self._lock_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the lock file held
        self._lost: str | None = None  # why the folder is no longer this tier's, once it is not
        self._small_writes = ThreadBatcher()
        # Removals have their own queue: a file unlinked must never wait behind a slow write.
        self._removals = ThreadBatcher()
        self._nowait_reads = _NOWAIT != 0  # cleared on a filesystem that cannot do them
        self._last_published_ns = 0  # the mtime ``publish`` gave the last file it published

    @property
    def home_device(self) -> torch.device:
        return torch.device("cpu")

    # ------------------------------------------------------------------ open and close
    async def open(self) -> None:
        await asyncio.to_thread(self._open_folder)

    def _open_folder(self) -> None:
        started = time.perf_counter()
        try:
            self._lock_fd = lock_private_folder(self._given_path, self.root, self.mode)
        except StorageError as exc:
            raise StorageError(
                exc.errno, f"disk tier {self.name!r} refuses {self.root}: {exc.strerror or exc}"
            ) from exc
        except OSError as exc:
            raise StorageError(
                exc.errno, f"disk tier {self.name!r} cannot write to {self.root}: {exc.strerror}"
            ) from exc
        if self._lock_fd is None:
            raise StorageError(
                f"disk tier {self.name!r}: {self.root} is in use by another store "
                f"(it holds {self.root / LOCK_NAME}); that may be a store of this very process "
                "that was never closed (use `async with store` or `await store.close()`)"
            )
        try:
            self._lock_id = file_id(os.fstat(self._lock_fd))
            for key, meta in recover(
                self.root, self.namespace, self.budget, self.name, self.recovery
            ):
                self.adopt(key, meta, meta.size)
        except BaseException as exc:
            os.close(self._lock_fd)  # a retry must not find the folder "in use"
            self._lock_fd = None
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise StorageError(
                    exc.errno, f"disk tier {self.name!r} cannot open {self.root}: {exc}"
                ) from exc
            raise
        self.recovery.seconds = time.perf_counter() - started
        warn_if_short_of_room(self.name, self.budget, self.resident_bytes, self.root)
        if self.recovery.indexed or self.recovery.unreadable or self.recovery.temp_removed:
            log.info("disk tier %r reopened %s: %s", self.name, self.root, asdict(self.recovery))

    async def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # ------------------------------------------------------------------ primitives
    def path_for(self, key: KeyLike) -> Path:
        """A new, unique file for ``key``: its name hashes the key, never contains it."""
        name = key_digest(key)
        return self.root / name[:2] / f"{name}-{uuid.uuid4().hex[:12]}{SUFFIX}"

    async def _write(self, key: KeyLike, tensor: torch.Tensor) -> DiskCacheMetadata:
        # The worker lets go of the tensor before it answers: a finished executor job can
        # outlive the await it answered, and a memory tier reuses a demoted tensor's buffer
        # only once nothing else refers to it.
        if tensor.nbytes < BATCHED_WRITE_BYTES:
            return await self._small_writes.call(self._write_taken, key, [tensor])
        return await asyncio.to_thread(self._write_taken, key, [tensor])

    def _write_taken(self, key: KeyLike, holder: list[torch.Tensor]) -> DiskCacheMetadata:
        return self._write_file(key, holder.pop())

    def _write_file(self, key: KeyLike, tensor: torch.Tensor) -> DiskCacheMetadata:
        cpu = tensor.detach()
        if cpu.device.type != "cpu":
            cpu = torch.empty(cpu.shape, dtype=cpu.dtype)
            copy_blocking(cpu, tensor.detach())
        cpu = cpu.contiguous()
        payload = serde.payload_view(cpu)
        shape = tuple(cpu.shape)
        checksums = self._checksums
        checksum = checksums.entry_checksum(
            key, cpu.dtype, shape, payload.nbytes, checksums.payload_digest(payload), self.namespace
        )
        header = serde.encode_header(
            key, cpu.dtype, shape, payload.nbytes, checksum, self.namespace
        )
        path = self.path_for(key)
        self._check_folder()
        temp = _staged_name(path)
        fd = self._create(temp)
        try:
            try:
                _write_all(fd, [header, payload])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        # Staged under its temporary name: ``publish`` renames it into place once the store
        # knows the entry is still current, so a move that went stale meanwhile never leaves
        # a file that a restart would index.
        return DiskCacheMetadata(str(path), payload.nbytes, shape, cpu.dtype, checksum)

    def write_published(self, key: KeyLike, tensor: torch.Tensor) -> DiskCacheMetadata:
        """Write and publish an entry at once, blocking, outside the index (benchmarks)."""
        meta = self._write_file(key, tensor)
        self.publish(meta)
        return meta

    def publish(self, obj: Any) -> None:
        """Rename the staged file into place: from here a restart indexes it.

        Its mtime becomes the time of publication, later than any earlier publication's: a
        restart that finds two files of one key (the older one's removal failed) keeps the
        one published last, which the file system's own stamp (a clock tick of several ms,
        taken when the bytes were written) does not always tell apart.
        """
        assert isinstance(obj, DiskCacheMetadata)
        path = Path(obj.path)
        staged = _staged_name(path)
        stamp = self._last_published_ns = max(time.time_ns(), self._last_published_ns + 1)
        os.utime(staged, ns=(stamp, stamp), follow_symlinks=False)
        os.replace(staged, path)

    async def make_durable(self, obj: Any) -> None:
        """With ``durability: fsync``, sync the folder that a publish or removal changed."""
        assert isinstance(obj, DiskCacheMetadata)
        if self.fsync:
            await self._removals.call(_fsync_dir, Path(obj.path).parent)

    def _check_folder(self) -> None:
        """Raise ``StorageError`` unless the folder is still the one whose lock this tier holds.

        One stat of the lock file: a folder removed (``rm -rf``), moved or replaced behind the
        store's back no longer holds that file, and another store may own its path by now.
        """
        if self._lost is None:
            try:
                found: tuple[int, int] | None = file_id(os.lstat(self.root / LOCK_NAME))
            except FileNotFoundError:
                found = None
            if found is not None and found == self._lock_id:
                return
            self._lost = (
                f"disk tier {self.name!r}: {self.root} was removed or replaced behind the "
                "store's back; it writes there no more"
            )
            log.error("%s", self._lost)
        raise StorageError(self._lost)

    def _create(self, temp: Path) -> int:
        """A new temporary file; its shard is made if missing, never the tier's folder itself."""
        try:
            return self._create_file(temp)
        except FileNotFoundError:
            pass
        try:
            os.mkdir(temp.parent, self._folder_mode)
        except FileExistsError:
            pass
        except FileNotFoundError:
            self._check_folder()  # the folder went away since the last check
            raise
        else:
            if self.mode != DEFAULT_MODE:  # a umask may take bits that ``mode`` asks for
                # By path: no one else can put a link in the tier's own folder.
                os.chmod(temp.parent, self._folder_mode)
        return self._create_file(temp)

    def _create_file(self, temp: Path) -> int:
        """A new file of the tier's ``mode``; ``FileNotFoundError`` when its shard is missing."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, self.mode)
        if self.mode != DEFAULT_MODE:  # a umask may take bits that ``mode`` asks for
            try:
                os.fchmod(fd, self.mode)
            except BaseException:
                os.close(fd)
                raise
        return fd

    async def load(self, obj: Any) -> torch.Tensor | None:
        assert isinstance(obj, DiskCacheMetadata)
        if self._reads_on_loop(obj):
            cached = self._read_cached(obj, None)
            if cached is not None:
                return cached
        return await asyncio.to_thread(self._read_file, obj)

    def _read_file(
        self, meta: DiskCacheMetadata, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        try:
            with open(meta.path, "rb", buffering=0, opener=open_regular) as f:
                header, start = read_header(f)
                if not _matches(header, meta):
                    raise CorruptEntryError(f"{meta.path}: header does not match the index")
                return tensor_from(header, start, f, meta.path, out, self._checksums)
        except FileNotFoundError:
            return None

    async def load_into(self, obj: Any, out: torch.Tensor) -> torch.Tensor | None:
        """Read straight into ``out`` when it is contiguous host memory: no buffer between."""
        assert isinstance(obj, DiskCacheMetadata)
        check_out(out, obj.shape or (), obj.dtype or out.dtype)
        if out.device.type != "cpu" or not out.is_contiguous() or out.is_neg() or out.is_conj():
            return await super().load_into(obj, out)
        if self._reads_on_loop(obj) and self._read_cached(obj, out) is not None:
            return out
        return await asyncio.to_thread(self._read_file, obj, out)

    def load_now_into(self, obj: Any, out: torch.Tensor) -> torch.Tensor | None:
        """The on-loop read of ``load_into`` (``_read_cached``), where it applies."""
        assert isinstance(obj, DiskCacheMetadata)
        if out.dtype != obj.dtype or tuple(out.shape) != (obj.shape or ()):
            return None
        if not out.is_cpu or not out.is_contiguous() or out.is_neg() or out.is_conj():
            return None
        return self._read_cached(obj, out) if self._reads_on_loop(obj) else None

    def _reads_on_loop(self, meta: DiskCacheMetadata) -> bool:
        limit = LOOP_READ_BYTES
        if self._checksums.keyed:
            limit = min(limit, KEYED_LOOP_READ_BYTES)
        return self._nowait_reads and meta.size <= limit

    def _read_cached(
        self, meta: DiskCacheMetadata, out: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The entry, verified, if every byte of its file is in the page cache; else None, and
        the thread path (``_read_file``) reads it and judges whatever is wrong with it.

        One ``preadv`` of header and payload: the header is the file's bytes before the
        payload, whose size the index knows.  Nothing here waits on the device, and nothing
        here decides that an entry is corrupt or gone: the thread path alone does.
        """
        try:
            fd, stat = open_regular_stat(meta.path, os.O_RDONLY)
        except (OSError, CorruptEntryError):  # a link or a FIFO: the thread path judges it
            return None
        try:
            header_bytes = stat.st_size - meta.size
            if not serde.PREFIX_BYTES < header_bytes <= serde.PREFIX_BYTES + serde.MAX_HEADER_BYTES:
                return None
            tensor = torch.empty(meta.shape or (), dtype=meta.dtype) if out is None else out
            payload = serde.payload_view(tensor)
            head = bytearray(header_bytes)
            if os.preadv(fd, [head, payload], 0, _NOWAIT) != stat.st_size:
                return None  # some pages are not cached (or the file changed): read it there
        except OSError as exc:  # EAGAIN: not cached; EOPNOTSUPP: the filesystem cannot say
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait_reads = False
            return None
        finally:
            os.close(fd)
        try:
            header = serde.decode_header(bytes(head))
            if not _matches(header, meta):
                return None
            self._checksums.check(header, self._checksums.payload_digest(payload), meta.path)
        except CorruptEntryError:
            return None
        return tensor

    async def discard(self, obj: Any) -> None:
        """Remove the entry's file (or its staged file, if it was never published); with
        ``durability: fsync`` the removal is synced before this returns."""
        assert isinstance(obj, DiskCacheMetadata)
        if self._lost is not None:
            return  # the path may be another store's folder now
        try:
            await self._removals.call(_remove_file, Path(obj.path), self.fsync)
        except OSError as exc:  # the entry is gone from the index either way
            self.counters.errors += 1
            log.warning("disk tier %r could not remove %s: %s", self.name, obj.path, exc)


def _matches(header: serde.EntryHeader, meta: DiskCacheMetadata) -> bool:
    """Whether a file's header describes the entry the index holds."""
    return (header.nbytes, header.dtype, header.shape, header.checksum) == (
        meta.size,
        meta.dtype,
        meta.shape,
        meta.checksum,
    )


def _write_all(fd: int, buffers: list[bytes | memoryview]) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        written = os.writev(fd, views)
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _staged_name(path: Path) -> Path:
    return path.with_name(TEMP_PREFIX + path.name)


def _remove_file(path: Path, fsync: bool) -> None:
    """Remove an entry's file, or its staged file when it was never published (only ever a
    regular file of the tier's own, see ``remove_own``)."""
    remove_own(path if os.path.lexists(path) else _staged_name(path))
    if fsync:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
