"""Tensor copies between memories, kept off the event loop when they are large."""

from __future__ import annotations

import asyncio

import torch

from lmtier.errors import InvalidValueError

__all__ = ["INLINE_COPY_BYTES", "check_out", "copy_into", "copy_to"]

# Below this, a copy costs less than the ~100 us thread hop that would keep it off the loop.
INLINE_COPY_BYTES = 1 << 20


def check_out(out: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> None:
    """Raise unless ``out`` can receive an entry of ``shape`` and ``dtype``."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise InvalidValueError(
            f"out is {out.dtype}{list(out.shape)} but the entry is {dtype}{list(shape)}"
        )


async def copy_to(data: torch.Tensor, device: torch.device, private: bool) -> torch.Tensor:
    """``data`` on ``device`` as a tensor the caller owns (``data`` itself if ``private``)."""
    if private and data.device == device:
        return data
    if data.device.type == "cpu" and device.type == "cpu":
        if data.numel() * data.element_size() < INLINE_COPY_BYTES:
            return data.clone()
        # Allocated here, filled there: the event loop's thread reuses freed memory that a
        # worker thread's allocator would hand out fresh (and page-fault on), ~2.5x slower.
        out = torch.empty_like(data, memory_format=torch.contiguous_format)
        await asyncio.to_thread(out.copy_, data)
        return out
    return await asyncio.to_thread(_copy_across, data, device)


async def copy_into(out: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Copy ``data`` into ``out`` (same shape and dtype, any devices); ``out``."""
    check_out(out, data.shape, data.dtype)
    small = data.numel() * data.element_size() < INLINE_COPY_BYTES
    if small and out.device.type == "cpu" and data.device.type == "cpu":
        return out.copy_(data)
    await asyncio.to_thread(_copy_across, data, out.device, out)
    return out


def _copy_across(
    data: torch.Tensor, device: torch.device, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A blocking copy of ``data`` to ``device`` (into ``out`` if given), for a worker thread."""
    out = data.to(device, copy=True) if out is None else out.copy_(data)
    if out.device.type == "cuda" or data.device.type == "cuda":
        torch.cuda.synchronize(out.device if out.device.type == "cuda" else data.device)
    return out
