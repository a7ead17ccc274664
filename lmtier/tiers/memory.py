"""A tier in device memory: ``cuda``/``cuda:N`` (the GPU tier) or ``cpu`` (pinned, the CPU tier)."""

from __future__ import annotations

import logging
import sys
from collections import deque
from typing import Any

import torch

from lmtier.evictor import BaseEvictor
from lmtier.keys import KeyLike
from lmtier.tiers.base import Tier
from lmtier.tiers.copies import copy_async

__all__ = ["MemoryTier"]

log = logging.getLogger(__name__)

_said_unpinned = False


class MemoryTier(Tier):
    """Entries are tensors on ``device`` that the tier owns (copied in, never the caller's)."""

    def __init__(
        self, name: str, evictor: BaseEvictor, device: torch.device, pinned: bool = True
    ) -> None:
        super().__init__(name, evictor)
        self.device = device
        self.pinned = pinned and device.type == "cpu" and torch.cuda.is_available()
        if pinned and device.type == "cpu" and not self.pinned:
            _say_unpinned_once()
        self._pool: dict[int, deque[torch.Tensor]] = {}
        self._pool_bytes = 0

    @property
    def home_device(self) -> torch.device:
        return self.device

    async def reserve(self, size: int, timeout: float) -> None:
        await super().reserve(size, timeout)
        self._trim_pool(keep=size)

    async def _write(self, key: KeyLike, tensor: torch.Tensor) -> torch.Tensor:
        # Allocated here, on the event loop: the pool is only ever touched from the loop.
        stored = self._allocate(tensor)
        await copy_async(stored, tensor.detach())
        return stored

    def _allocate(self, like: torch.Tensor) -> torch.Tensor:
        buffer = self._take_buffer(like.nbytes)
        if buffer is not None:
            if buffer.dtype == like.dtype and buffer.shape == like.shape:
                return buffer  # the usual case, chunks of one shape: no view to make
            return buffer.reshape(-1).view(torch.uint8).view(like.dtype).view(like.shape)
        self._trim_pool()  # a buffer spared for this write is still in use: free it instead
        return torch.empty(like.shape, dtype=like.dtype, device=self.device, pin_memory=self.pinned)

    def resident_tensor(self, obj: Any) -> torch.Tensor:
        assert isinstance(obj, torch.Tensor)
        return obj

    async def load(self, obj: Any) -> torch.Tensor:
        assert isinstance(obj, torch.Tensor)
        return obj

    async def discard(self, obj: Any) -> None:
        """Keep the tensor's memory for a later write of the same size (see ``_take_buffer``)."""
        assert isinstance(obj, torch.Tensor)
        nbytes = obj.nbytes
        self._pool.setdefault(nbytes, deque()).append(obj)
        self._pool_bytes += nbytes
        self._trim_pool()

    async def close(self) -> None:
        self._pool.clear()
        self._pool_bytes = 0

    # ------------------------------------------------------------------ buffer pool
    # Fresh memory costs a page fault per page (a fresh 16 MiB copy runs at a fifth of the
    # speed of a copy into touched memory), and pinned memory is slow to allocate, so the
    # memory of removed entries is reused.  Pooled bytes count against the budget beside the
    # resident ones.  A pooled tensor is reused only once nothing but the pool refers to it:
    # every reader of a stored tensor (a get's copy, a demotion's write) holds that tensor
    # object for as long as it reads it.

    def _take_buffer(self, nbytes: int) -> torch.Tensor | None:
        """A pooled tensor of ``nbytes`` (any shape and dtype) that nobody uses, or None."""
        bucket = self._pool.get(nbytes)
        if not bucket:
            return None
        for _ in range(len(bucket)):
            candidate = bucket.popleft()
            # References: the local name and getrefcount's argument, nothing else.
            if sys.getrefcount(candidate) <= 2:
                self._pool_bytes -= nbytes
                return candidate
            bucket.append(candidate)
        return None

    def _trim_pool(self, keep: int = -1) -> None:
        """Free pooled tensors until pooled plus resident bytes fit the budget.

        ``keep`` is the size of a write just reserved: one pooled buffer of that size is spared,
        as the write will take it (its bytes are already counted as reserved).
        """
        excess = self._pool_bytes + self.resident_bytes - self.budget
        if self._pool.get(keep):
            excess -= keep
        if excess <= 0:
            return
        for nbytes in sorted(self._pool, key=lambda n: n == keep):
            bucket = self._pool[nbytes]
            while bucket and excess > 0:
                bucket.popleft()
                self._pool_bytes -= nbytes
                excess -= nbytes
            if not bucket:
                del self._pool[nbytes]


def _say_unpinned_once() -> None:
    global _said_unpinned
    if not _said_unpinned:
        _said_unpinned = True
        log.info("CUDA is not available: CPU tiers use plain (unpinned) memory")
