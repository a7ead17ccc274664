"""Tensor copies between memories, kept off the event loop when they are large."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import torch

from lmtier.errors import InvalidValueError

__all__ = [
    "INLINE_COPY_BYTES",
    "LOOP_COPY_BYTES",
    "check_out",
    "copy_async",
    "copy_blocking",
    "copy_into",
    "copy_pairs",
    "copy_to",
]

# How long to poll a GPU copy's completion from the loop before waiting in a thread.
POLL_SECONDS = 300e-6
# Small host hits are cloned straight away, the cheapest copy there is.
INLINE_COPY_BYTES = 1 << 20
# Host copies below this run on the loop: 4 MiB take about 0.4 ms, no more than the two
# thread hops (~100-200 us each on a busy machine) that would keep them off it, and a
# 2 MiB put+get ran at 0.31-0.39 of raw copies with 1 MiB here, 0.50-0.64 with 4 MiB.
LOOP_COPY_BYTES = 4 << 20


def check_out(out: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> None:
    """Raise unless ``out`` can receive an entry of ``shape`` and ``dtype``."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise InvalidValueError(
            f"out is {out.dtype}{list(out.shape)} but the entry is {dtype}{list(shape)}"
        )


async def copy_to(data: torch.Tensor, device: torch.device, private: bool) -> torch.Tensor:
    """``data`` on ``device`` as a tensor the caller owns (``data`` itself if ``private``); a
    copy carries no autograd history."""
    # ``is_cpu`` where it answers: a tensor's ``device`` costs ~30 us with the caches cold, as
    # they are after every multi-MiB transfer.
    to_cpu = device.type == "cpu"
    if private and (data.is_cpu if to_cpu else data.device == device):
        return data
    data = data.detach()
    if to_cpu and data.is_cpu and data.nbytes < INLINE_COPY_BYTES:
        return data.clone()  # the hot path of small hits
    # Allocated here, on the event loop's thread, which reuses freed host memory that a worker
    # thread's allocator would hand out fresh (and page-fault on, ~2.5x slower).
    out = torch.empty(data.shape, dtype=data.dtype, device=device)
    await copy_async(out, data)
    return out


async def copy_into(out: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Copy ``data`` into ``out`` (same shape and dtype, any devices); ``out``."""
    check_out(out, data.shape, data.dtype)
    await copy_async(out, data)
    return out


async def copy_async(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` without blocking the event loop for long.

    Host copies under ``LOOP_COPY_BYTES`` run inline; larger ones in a worker thread.  A GPU
    copy whose host side is pinned is queued on a side stream from here and its completion
    polled for up to ``POLL_SECONDS`` (a 2 MiB PCIe copy takes about the ~100 us a thread hop
    costs), then awaited in a thread; other GPU copies go to a thread.
    """
    on_gpu = dst.device.type == "cuda" or src.device.type == "cuda"
    if not on_gpu:
        if dst.nbytes < LOOP_COPY_BYTES:
            dst.copy_(src)
        else:
            await asyncio.to_thread(dst.copy_, src)
        return
    if not (_device_or_pinned(dst) and _device_or_pinned(src)):
        await asyncio.to_thread(copy_blocking, dst, src)
        return
    # Yield to the loop while a short copy finishes; any timed sleep rounds up to the
    # selector's 1 ms, so a longer copy is waited for in a thread instead.
    await _wait_for(_queue_on_side_stream(dst, src))


async def copy_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``dst.copy_(src)`` for every pair, as one batch: the loop is woken once per batch.

    GPU copies whose host side is pinned are all queued on their direction's side stream and
    awaited through one event per stream; the other copies that touch a GPU, and host copies
    too large together to run on the loop, run in one worker-thread hop; small host copies
    run inline.
    """
    streams: dict[torch.cuda.Stream, None] = {}  # the side streams used, in order
    blocking: list[tuple[torch.Tensor, torch.Tensor]] = []
    host: list[tuple[torch.Tensor, torch.Tensor]] = []
    for dst, src in pairs:
        if dst.device.type != "cuda" and src.device.type != "cuda":
            host.append((dst, src))
        elif _device_or_pinned(dst) and _device_or_pinned(src):
            streams[_queue_without_event(dst, src)] = None
        else:
            blocking.append((dst, src))
    if sum(dst.nbytes for dst, _ in host) < LOOP_COPY_BYTES:
        for dst, src in host:
            dst.copy_(src)
    else:
        blocking += host
    events = []
    for stream in streams:
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record(stream)
        events.append(done)
    if blocking:
        await asyncio.to_thread(_copy_all_blocking, blocking)
    for done in events:
        await _wait_for(done)


def _copy_all_blocking(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for dst, src in pairs:
        copy_blocking(dst, src)


async def _wait_for(done: torch.cuda.Event) -> None:
    """Await a queued GPU copy: poll briefly from the loop, then wait in a thread."""
    give_up = time.perf_counter() + POLL_SECONDS
    while not done.query():  # type: ignore[no-untyped-call]
        if time.perf_counter() > give_up:
            await asyncio.to_thread(done.synchronize)
            return
        await asyncio.sleep(0)


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
    _queue_on_side_stream(dst, src).synchronize()


def _queue_on_side_stream(dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event:
    """Queue ``dst.copy_(src)`` on its direction's side stream; the event marking its end.

    The stream first waits for the work queued on the current stream, and the tensors are
    recorded on the side stream so their memory is not reused before the copy ran.
    """
    stream = _queue_without_event(dst, src)
    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
    done.record(stream)
    return done


def _queue_without_event(dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Stream:
    """Queue ``dst.copy_(src)`` on its direction's side stream (see ``_queue_on_side_stream``);
    the stream."""
    device = dst.device if dst.device.type == "cuda" else src.device
    stream = _side_stream(device, to_device=dst.device.type == "cuda")
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
    for tensor in (dst, src):
        if tensor.device.type == "cuda":
            tensor.record_stream(stream)
    return stream


def _device_or_pinned(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda" or tensor.is_pinned()


_SIDE_STREAMS: dict[tuple[torch.device, bool], torch.cuda.Stream] = {}


def _side_stream(device: torch.device, to_device: bool) -> torch.cuda.Stream:
    key = (device, to_device)
    stream = _SIDE_STREAMS.get(key)
    if stream is None:
        stream = _SIDE_STREAMS.setdefault(key, torch.cuda.Stream(device))  # type: ignore[no-untyped-call]
    return stream
