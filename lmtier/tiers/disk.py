"""A tier on local disk: one safetensors file per entry, written atomically off the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from lmtier import serde
from lmtier.errors import CorruptEntryError, StorageError
from lmtier.evictor import BaseEvictor
from lmtier.keys import KeyLike, key_to_text
from lmtier.metadata import DiskCacheMetadata
from lmtier.tiers.base import Tier

__all__ = ["DiskTier"]

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
# Enough for a header and its key in one read when the index is rebuilt.
HEADER_READ_BYTES = 4096


class DiskTier(Tier):
    """Entries are files under ``root``, named by a hash of the key; ``cache_dict`` holds metadata.

    Every write goes to a new, unique file name through a temporary file and a rename, so a
    reader never sees a half-written file and a replaced entry's old file is never rewritten
    in place.  ``durability="fsync"`` also syncs the file before the rename and its folder after.
    """

    loads_are_private = True

    def __init__(
        self,
        name: str,
        evictor: BaseEvictor,
        root: str | os.PathLike[str],
        durability: str = "none",
    ) -> None:
        super().__init__(name, evictor)
        if durability not in ("none", "fsync"):
            raise ValueError(f"durability must be 'none' or 'fsync', got {durability!r}")
        self.root = Path(root).expanduser().resolve()
        self.fsync = durability == "fsync"

    @property
    def home_device(self) -> torch.device:
        return torch.device("cpu")

    async def open(self) -> None:
        await asyncio.to_thread(self._prepare_root)

    def _prepare_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{TEMP_PREFIX}probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(
                exc.errno, f"disk tier {self.name!r} cannot write to {self.root}: {exc.strerror}"
            ) from exc

    # ------------------------------------------------------------------ primitives
    def path_for(self, key: KeyLike) -> Path:
        """A new, unique file for ``key``: its name hashes the key, never contains it."""
        digest = hashlib.blake2b(key_to_text(key).encode("utf-8", "surrogatepass"), digest_size=16)
        name = digest.hexdigest()
        return self.root / name[:2] / f"{name}-{uuid.uuid4().hex[:12]}{SUFFIX}"

    async def _write(self, key: KeyLike, tensor: torch.Tensor) -> DiskCacheMetadata:
        return await asyncio.to_thread(self._write_file, key, tensor)

    def _write_file(self, key: KeyLike, tensor: torch.Tensor) -> DiskCacheMetadata:
        cpu = tensor.detach().to("cpu").contiguous()
        payload = serde.payload_view(cpu)
        checksum = serde.payload_checksum(payload)
        shape = tuple(cpu.shape)
        header = serde.encode_header(key, cpu.dtype, shape, payload.nbytes, checksum)
        path = self.path_for(key)
        path.parent.mkdir(exist_ok=True)
        temp = path.with_name(TEMP_PREFIX + path.name)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_all(fd, [header, payload])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if self.fsync:
            _fsync_dir(path.parent)
        return DiskCacheMetadata(str(path), payload.nbytes, shape, cpu.dtype, checksum)

    async def load(self, obj: Any) -> torch.Tensor | None:
        assert isinstance(obj, DiskCacheMetadata)
        return await asyncio.to_thread(self._read_file, obj)

    def _read_file(self, meta: DiskCacheMetadata) -> torch.Tensor | None:
        try:
            with open(meta.path, "rb", buffering=0) as f:
                head = f.read(HEADER_READ_BYTES)
                header = serde.decode_header(_complete_header(f, head))
                if (header.nbytes, header.dtype, header.shape, header.checksum) != (
                    meta.size,
                    meta.dtype,
                    meta.shape,
                    meta.checksum,
                ):
                    raise CorruptEntryError(f"{meta.path}: header does not match the index")
                tensor = torch.empty(header.shape, dtype=header.dtype)
                payload = serde.payload_view(tensor)
                body = head[header.payload_offset :][: header.nbytes]
                payload[: len(body)] = body
                filled = len(body)
                while filled < header.nbytes:
                    got = f.readinto(payload[filled:])
                    if not got:
                        raise CorruptEntryError(
                            f"{meta.path}: payload ends at {filled} of {header.nbytes} bytes"
                        )
                    filled += got
        except FileNotFoundError:
            return None
        if serde.payload_checksum(payload) != header.checksum:
            raise CorruptEntryError(f"{meta.path}: payload checksum mismatch")
        return tensor

    async def discard(self, obj: Any) -> None:
        assert isinstance(obj, DiskCacheMetadata)
        try:
            await asyncio.to_thread(Path(obj.path).unlink, missing_ok=True)
        except OSError as exc:  # the entry is gone from the index either way
            self.counters.errors += 1
            log.warning("disk tier %r could not remove %s: %s", self.name, obj.path, exc)


def _complete_header(f: Any, head: bytes) -> bytes:
    """``head`` extended until it holds the whole header (long keys exceed the first read)."""
    need = serde.PREFIX_BYTES + serde.header_length(head)
    if len(head) < need:
        head += f.read(need - len(head))
    return head


def _write_all(fd: int, buffers: list[bytes | memoryview]) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        written = os.writev(fd, views)
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
