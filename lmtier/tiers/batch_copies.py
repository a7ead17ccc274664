"""Batches of copies between host and device memory: one copy per contiguous host run.

A batch moving to the host (D2H) whose host destinations lie one after another (a run handed
out by ``HostSlab.allocate_run``) is gathered on the device into one staging buffer
(``torch.cat`` of flat uint8 views, skipped when the sources already are one range) and
copied with one ``copy_``.  A batch moving to a device (H2D) whose host sources form a run is
copied with one ``copy_`` into one device buffer, then scattered once (``_foreach_copy_``), or
not at all when the destinations are views of that buffer (``to_device_views``).  Other pairs
are copied one by one, on the same side stream.

Planning is pure: ``find_runs`` and the ``plan_*`` functions work on tensors of any device
and return ``Step`` lists that tests can count; ``run_steps`` queues a plan on its
direction's side stream and wakes the loop once, through one event, when all of it is done.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmtier.tiers import copies
from lmtier.tiers.host_slab import ALIGN

__all__ = [
    "Step",
    "execute",
    "find_runs",
    "flat",
    "plan_to_device",
    "plan_to_host",
    "run_steps",
    "span",
    "step_counts",
    "to_device_views",
]

#: Steps executed so far, by kind ("copy", "cat", "scatter"): for tests and benchmarks.
step_counts: Counter[str] = Counter()


@dataclass(frozen=True)
class Step:
    """One operation of a plan: ``copy`` (``dst.copy_(src)``), ``cat`` (``torch.cat(src,
    out=dst)``, a gather) or ``scatter`` (``torch._foreach_copy_(dst, src)``)."""

    kind: str
    dst: torch.Tensor | tuple[torch.Tensor, ...]
    src: torch.Tensor | tuple[torch.Tensor, ...]

    def tensors(self) -> list[torch.Tensor]:
        return [*_dsts(self), *_srcs(self)]


# ---------------------------------------------------------------------- runs
def flat(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view."""
    return tensor.detach().reshape(-1).view(torch.uint8)


def _start(tensor: torch.Tensor) -> int:
    return int(tensor.data_ptr())


def _storage_key(tensor: torch.Tensor) -> tuple[str, int | None, int]:
    return (tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr())


def find_runs(tensors: Sequence[torch.Tensor], max_gap: int = 0) -> list[list[int]]:
    """The indices of ``tensors`` grouped into runs, in address order: each run's tensors are
    contiguous, in one storage, each starting at most ``max_gap`` bytes after the previous one
    ends and a multiple of ``ALIGN`` bytes after the run's first.  Any other tensor is a run
    of its own."""
    singles: list[list[int]] = []
    ranked: list[tuple[tuple[str, int | None, int], int, int]] = []
    for index, tensor in enumerate(tensors):
        if tensor.nbytes and tensor.is_contiguous():
            ranked.append((_storage_key(tensor), _start(tensor), index))
        else:
            singles.append([index])
    ranked.sort()
    runs: list[list[int]] = []
    first = end = 0
    storage: tuple[str, int | None, int] | None = None
    for key, start, index in ranked:
        joins = key == storage and end <= start <= end + max_gap and (start - first) % ALIGN == 0
        if joins:
            runs[-1].append(index)
        else:
            runs.append([index])
            storage, first = key, start
        end = start + tensors[index].nbytes
    return runs + singles


def span(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A flat uint8 view from the first of ``tensors`` (one storage, in address order) to the
    end of the last, gaps included."""
    first, last = tensors[0], tensors[-1]
    storage = first.untyped_storage()
    nbytes = _start(last) + last.nbytes - _start(first)
    view = torch.empty(0, dtype=torch.uint8, device=first.device)
    return view.set_(storage, _start(first) - storage.data_ptr(), (nbytes,), (1,))


def _same_layout(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """Whether ``a`` lies in one storage exactly as ``b`` does (same relative offsets), with
    no gaps, so that one copy of spans moves them all."""
    if len(find_runs(a)) != 1:
        return False
    base_a, base_b = _start(a[0]), _start(b[0])
    return all(
        _start(x) - base_a == _start(y) - base_b and x.nbytes == y.nbytes
        for x, y in zip(a, b, strict=True)
    )


def _batchable(tensors: Sequence[torch.Tensor]) -> bool:
    device = tensors[0].device
    return all(t.is_contiguous() and t.device == device for t in tensors)


def _parts(buffer: torch.Tensor, run: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The slices of ``buffer`` (a copy of ``span(run)``) where each tensor of ``run`` lies."""
    base = _start(run[0])
    return [buffer[_start(x) - base : _start(x) - base + x.nbytes] for x in run]


# ---------------------------------------------------------------------- plans
def _one_batch(
    dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], device_side: Sequence[torch.Tensor]
) -> bool:
    """Whether a run of pairs can move as one batch: more than one pair, the device side's
    tensors contiguous on one device, and each pair of the same size."""
    return (
        len(dsts) > 1
        and _batchable(device_side)
        and all(x.nbytes == y.nbytes for x, y in zip(dsts, srcs, strict=True))
    )


def plan_to_host(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> list[Step]:
    """Copies of ``srcs`` (the device side) into ``dsts`` (the host side): for each gap-free
    run of ``dsts``, a gather of its sources into one staging buffer on their device (none
    when they already lie as the run does) and one copy; other pairs one copy each."""
    steps: list[Step] = []
    for run in find_runs(dsts):
        d = [dsts[i] for i in run]
        s = [srcs[i] for i in run]
        if not _one_batch(d, s, device_side=s):
            steps.extend(Step("copy", dsts[i], srcs[i]) for i in run)
            continue
        target = span(d)
        if _same_layout(s, d):
            steps.append(Step("copy", target, span(s)))
            continue
        staging = torch.empty(target.numel(), dtype=torch.uint8, device=s[0].device)
        steps.append(Step("cat", staging, tuple(flat(x) for x in s)))
        steps.append(Step("copy", target, staging))
    return steps


def plan_to_device(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> list[Step]:
    """Copies of ``srcs`` (the host side) into ``dsts`` (the device side): for each run of
    ``srcs`` (alignment gaps allowed), one copy into one staging buffer on the destinations'
    device and one scatter (none when the destinations lie as the run does); other pairs one
    copy each."""
    steps: list[Step] = []
    for run in find_runs(srcs, ALIGN - 1):
        d = [dsts[i] for i in run]
        s = [srcs[i] for i in run]
        if not _one_batch(d, s, device_side=d):
            steps.extend(Step("copy", dsts[i], srcs[i]) for i in run)
            continue
        source = span(s)
        if len(find_runs(s)) == 1 and _same_layout(d, s):
            steps.append(Step("copy", span(d), source))
            continue
        staging = torch.empty(source.numel(), dtype=torch.uint8, device=d[0].device)
        steps.append(Step("copy", staging, source))
        steps.append(Step("scatter", tuple(flat(x) for x in d), tuple(_parts(staging, s))))
    return steps


def to_device_views(
    srcs: Sequence[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[Step]]:
    """New tensors on ``device`` holding ``srcs`` (the host side), and the plan that fills
    them: each run of ``srcs`` lands in one device buffer with one copy, its tensors views of
    that buffer (so a result keeps its whole run's buffer alive); other tensors one copy each."""
    results: list[torch.Tensor | None] = [None] * len(srcs)
    steps: list[Step] = []
    for run in find_runs(srcs, ALIGN - 1):
        if len(run) == 1:
            src = srcs[run[0]]
            out = torch.empty(src.shape, dtype=src.dtype, device=device)
            results[run[0]] = out
            steps.append(Step("copy", out, src))
            continue
        s = [srcs[i] for i in run]
        source = span(s)
        buffer = torch.empty(source.numel(), dtype=torch.uint8, device=device)
        for i, x, part in zip(run, s, _parts(buffer, s), strict=True):
            results[i] = part.view(x.dtype).view(x.shape)
        steps.append(Step("copy", buffer, source))
    assert all(result is not None for result in results)
    return [result for result in results if result is not None], steps


# ---------------------------------------------------------------------- execution
def execute(steps: Sequence[Step], non_blocking: bool = False) -> None:
    """Run ``steps`` in order on the current stream (on the host for host tensors)."""
    for step in steps:
        step_counts[step.kind] += 1
        if step.kind == "copy":
            assert isinstance(step.dst, torch.Tensor) and isinstance(step.src, torch.Tensor)
            step.dst.copy_(step.src, non_blocking=non_blocking)
        elif step.kind == "cat":
            assert isinstance(step.dst, torch.Tensor) and isinstance(step.src, tuple)
            torch.cat(step.src, out=step.dst)
        else:
            assert isinstance(step.dst, tuple) and isinstance(step.src, tuple)
            torch._foreach_copy_(list(step.dst), list(step.src))


async def run_steps(steps: Sequence[Step]) -> None:
    """Run a plan without blocking the event loop for long.

    With a CUDA tensor in it and every host tensor pinned, the whole plan is queued on its
    direction's side stream (after the work queued on the current stream) and awaited through
    one event: the loop is woken once.  A plan of host tensors runs inline when small, else in
    a worker thread, as does a GPU plan with unpinned host memory.
    """
    if not steps:
        return
    tensors = [t for step in steps for t in step.tensors()]
    device = next((t.device for t in tensors if t.device.type == "cuda"), None)
    if device is None:
        if sum(t.nbytes for step in steps for t in _dsts(step)) < copies.LOOP_COPY_BYTES:
            execute(steps)
        else:
            await asyncio.to_thread(execute, steps)
        return
    to_device = any(
        step.kind == "copy" and _dsts(step)[0].device.type == "cuda" and _srcs(step)[0].is_cpu
        for step in steps
    )
    if not all(t.is_pinned() for t in tensors if t.is_cpu):
        await asyncio.to_thread(_queue, steps, device, to_device, True)
        return
    done = _queue(steps, device, to_device, False)
    try:
        await copies._wait_for(done)  # looked up here, so tests can count the waits
    except asyncio.CancelledError:
        # The copies still run: hold the loop until they are done, so that no memory they
        # touch is handed out again meanwhile.
        done.synchronize()
        raise


def _dsts(step: Step) -> tuple[torch.Tensor, ...]:
    return step.dst if isinstance(step.dst, tuple) else (step.dst,)


def _srcs(step: Step) -> tuple[torch.Tensor, ...]:
    return step.src if isinstance(step.src, tuple) else (step.src,)


def _queue(
    steps: Sequence[Step], device: torch.device, to_device: bool, wait: bool
) -> torch.cuda.Event:
    stream = copies._side_stream(device, to_device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        execute(steps, non_blocking=True)
    for step in steps:
        for tensor in step.tensors():
            if tensor.device.type == "cuda":
                tensor.record_stream(stream)  # not reused before the side stream used it
    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
    done.record(stream)
    if wait:
        done.synchronize()
    return done
