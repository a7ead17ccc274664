"""A tier in device memory: ``cuda``/``cuda:N`` (the GPU tier) or ``cpu`` (pinned, the CPU tier)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from lmtier.evictor import BaseEvictor
from lmtier.keys import KeyLike
from lmtier.tiers.base import Tier

__all__ = ["MemoryTier"]

log = logging.getLogger(__name__)

# Below this, a copy costs less than the ~100 us thread hop that would keep it off the loop.
INLINE_COPY_BYTES = 1 << 20
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

    @property
    def home_device(self) -> torch.device:
        return self.device

    async def _write(self, key: KeyLike, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" or tensor.device.type == "cuda":
            return await asyncio.to_thread(self._copy_in, tensor)
        if tensor.numel() * tensor.element_size() < INLINE_COPY_BYTES:
            return self._copy_in(tensor)
        return await asyncio.to_thread(self._copy_in, tensor)

    def _copy_in(self, tensor: torch.Tensor) -> torch.Tensor:
        stored = torch.empty(
            tensor.shape, dtype=tensor.dtype, device=self.device, pin_memory=self.pinned
        )
        stored.copy_(tensor.detach())
        if self.device.type == "cuda" or tensor.device.type == "cuda":
            torch.cuda.synchronize(self.device if self.device.type == "cuda" else tensor.device)
        return stored

    async def load(self, obj: Any) -> torch.Tensor:
        assert isinstance(obj, torch.Tensor)
        return obj

    async def discard(self, obj: Any) -> None:
        """Memory is freed when the last reference to the tensor goes."""


def _say_unpinned_once() -> None:
    global _said_unpinned
    if not _said_unpinned:
        _said_unpinned = True
        log.info("CUDA is not available: CPU tiers use plain (unpinned) memory")
