"""Tensor copies between memories, kept off the event loop when they are large."""

from __future__ import annotations

import asyncio

import torch

from lmtier.errors import InvalidValueError

__all__ = ["INLINE_COPY_BYTES", "check_out", "copy_blocking", "copy_into", "copy_to"]

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
    out = torch.empty(data.shape, dtype=data.dtype, device=device)
    await asyncio.to_thread(copy_blocking, out, data)
    return out


async def copy_into(out: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Copy ``data`` into ``out`` (same shape and dtype, any devices); ``out``."""
    check_out(out, data.shape, data.dtype)
    small = data.numel() * data.element_size() < INLINE_COPY_BYTES
    if small and out.device.type == "cpu" and data.device.type == "cpu":
        return out.copy_(data)
    await asyncio.to_thread(copy_blocking, out, data)
    return out


def copy_blocking(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, returning once it is done; for a worker thread.

    A copy to or from a GPU runs on a side stream of its direction (host->device and
    device->host use separate copy engines), after the work already queued on the current
    stream (an engine's compute that wrote ``src``), so it neither waits behind nor blocks the
    engine's later kernels, and only this copy's completion is awaited.
    """
    if dst.device.type != "cuda" and src.device.type != "cuda":
        dst.copy_(src)
        return
    device = dst.device if dst.device.type == "cuda" else src.device
    stream = _side_stream(device, to_device=dst.device.type == "cuda")
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record(stream)
    done.synchronize()


_SIDE_STREAMS: dict[tuple[torch.device, bool], torch.cuda.Stream] = {}


def _side_stream(device: torch.device, to_device: bool) -> torch.cuda.Stream:
    key = (device, to_device)
    stream = _SIDE_STREAMS.get(key)
    if stream is None:
        stream = _SIDE_STREAMS.setdefault(key, torch.cuda.Stream(device))  # type: ignore[no-untyped-call]
    return stream
