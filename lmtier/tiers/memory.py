"""A tier in device memory: ``cuda``/``cuda:N`` (the GPU tier) or ``cpu`` (pinned, the CPU tier).

A CPU tier keeps its entries in a ``HostSlab`` (pieces touched and pinned once, carved into
ranges); a GPU tier reuses the memory of removed entries through a pool of buffers by size.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from lmtier.evictor import BaseEvictor
from lmtier.keys import KeyLike
from lmtier.tiers.base import Tier
from lmtier.tiers.batch_copies import plan_to_host, run_steps
from lmtier.tiers.copies import copy_async
from lmtier.tiers.host_slab import PIECE_BYTES, HostSlab

__all__ = ["MemoryTier"]

log = logging.getLogger(__name__)

_said_unpinned = False


class MemoryTier(Tier):
    """Entries are tensors on ``device`` that the tier owns (copied in, never the caller's)."""

    def __init__(
        self,
        name: str,
        evictor: BaseEvictor,
        device: torch.device,
        pinned: bool = True,
        piece_bytes: int = PIECE_BYTES,
    ) -> None:
        super().__init__(name, evictor)
        self.device = device
        self.pinned = pinned and device.type == "cpu" and torch.cuda.is_available()
        if pinned and device.type == "cpu" and not self.pinned:
            _say_unpinned_once()
        self._pool: dict[int, deque[torch.Tensor]] = {}
        self._pool_bytes = 0
        #: Host memory of a CPU tier: the budget plus one piece, the room a full tier needs
        #: to stage a batch before its placements evict anything.
        self.slab: HostSlab | None = None
        if device.type == "cpu":
            headroom = min(self.budget, piece_bytes)
            self.slab = HostSlab(self.budget + headroom, self.pinned, piece_bytes)
        self._staged: dict[int, torch.Tensor] = {}  # by id: staged views not yet adopted

    @property
    def home_device(self) -> torch.device:
        return self.device

    async def reserve(self, size: int, timeout: float) -> None:
        await super().reserve(size, timeout)
        if self.slab is None:
            self._trim_pool(keep=size)

    async def _write(self, key: KeyLike, tensor: torch.Tensor) -> torch.Tensor:
        if self._staged.pop(id(tensor), None) is tensor:
            return tensor  # staged here by ``stage``: already a copy the tier owns
        # Allocated here, on the event loop: the slab and pool are only touched from the loop.
        stored = self._allocate(tensor)
        await copy_async(stored, tensor.detach())
        return stored

    async def stage(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Copies of ``tensors`` in the slab, made as one batch: one run of consecutive ranges
        where one is free (one gather and one copy from a GPU), else a range each where free
        (None for the others).  A CPU tier only; ``Tier.stage`` says the rest."""
        if self.slab is None or not tensors:
            return [None] * len(tensors)
        slab = self.slab
        run = slab.allocate_run([t.nbytes for t in tensors])
        flats: list[torch.Tensor | None] = (
            list(run)
            if run is not None
            else [slab.allocate(t.nbytes, standalone=False) for t in tensors]
        )
        del run
        views: list[torch.Tensor | None] = [
            None if f is None else slab.as_entry(f, t) for f, t in zip(flats, tensors, strict=True)
        ]
        del flats
        pairs = [(v, t.detach()) for v, t in zip(views, tensors, strict=True) if v is not None]
        try:
            await run_steps(plan_to_host([v for v, _ in pairs], [t for _, t in pairs]))
        except BaseException:
            for view, _ in pairs:
                slab.free(view)
            raise
        for each in views:
            if each is not None:
                self._staged[id(each)] = each
        return views

    def release_staged(self, tensor: torch.Tensor) -> None:
        if self._staged.pop(id(tensor), None) is tensor:
            assert self.slab is not None
            self.slab.free(tensor)

    def _allocate(self, like: torch.Tensor) -> torch.Tensor:
        if self.slab is not None:
            flat = self.slab.allocate(like.nbytes)
            assert flat is not None
            return self.slab.as_entry(flat, like)
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
        """Give the tensor's memory back to the slab, or keep it for a later write of the same
        size (see ``_take_buffer``)."""
        assert isinstance(obj, torch.Tensor)
        if self.slab is not None:
            self.slab.free(obj)
            return
        nbytes = obj.nbytes
        self._pool.setdefault(nbytes, deque()).append(obj)
        self._pool_bytes += nbytes
        self._trim_pool()

    async def close(self) -> None:
        self._pool.clear()
        self._pool_bytes = 0
        self._staged.clear()
        if self.slab is not None:
            self.slab.close()

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
