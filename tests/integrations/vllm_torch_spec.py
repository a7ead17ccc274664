"""Test-only: TieringOffloadingSpec whose worker moves blocks with plain torch copies.

vLLM's CPU build cannot run its offloading worker (it needs CUDA or XPU copy kernels), so the
end-to-end test swaps in this one: the scheduler side (primary CPU tier, lmtier secondary tier)
is vLLM's own, only the GPU<->primary copies are plain ``Tensor.copy_`` calls.  A row of the
primary tier holds the block's page of every KV tensor, one after the other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.v1.kv_offload.base import OffloadingWorker, TransferResult
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec


class TorchCopyWorker(OffloadingWorker):  # type: ignore[misc]
    def __init__(self, kv_caches: Any, region: SharedOffloadRegion, rows: int, row: int) -> None:
        self.region = region
        tensors = [t.tensor for t in kv_caches.tensors]
        self.pages = [t.view(t.shape[0], -1).view(torch.int8) for t in tensors]
        self.widths = [p.shape[1] for p in self.pages]
        assert sum(self.widths) <= row, (self.widths, row)
        self.rows = torch.from_numpy(np.asarray(region.create_kv_memoryview())).view(torch.int8)
        self.done: list[TransferResult] = []

    def _pairs(self, gpu_spec: Any, cpu_spec: Any) -> list[tuple[int, int]]:
        gpu = [int(b) for b in np.asarray(gpu_spec.block_ids).reshape(-1)]
        cpu = [int(b) for b in np.asarray(cpu_spec.block_ids).reshape(-1)]
        assert len(gpu) == len(cpu), (gpu, cpu)
        return list(zip(gpu, cpu, strict=True))

    def submit_store(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        for gpu, cpu in self._pairs(src_spec, dst_spec):
            at = 0
            for page, width in zip(self.pages, self.widths, strict=True):
                self.rows[cpu, at : at + width].copy_(page[gpu])
                at += width
        self.done.append(TransferResult(job_id=job_id, success=True))
        return True

    def submit_load(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        for gpu, cpu in self._pairs(dst_spec, src_spec):
            at = 0
            for page, width in zip(self.pages, self.widths, strict=True):
                page[gpu].copy_(self.rows[cpu, at : at + width])
                at += width
        self.done.append(TransferResult(job_id=job_id, success=True))
        return True

    def get_finished(self) -> list[TransferResult]:
        done, self.done = self.done, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        return

    def shutdown(self) -> None:
        self.rows = None  # type: ignore[assignment]
        self.region.cleanup()


class TorchCopyTieringSpec(TieringOffloadingSpec):  # type: ignore[misc]
    def get_worker(self, kv_caches: Any) -> OffloadingWorker:
        if self._worker is None:
            region = SharedOffloadRegion(
                engine_id=self._engine_id,
                num_chunks=self.num_chunks,
                rank=0,
                kv_bytes_per_chunk=self.kv_bytes_per_chunk,
                cpu_page_size=self.cpu_page_size_per_worker,
            )
            self._worker = TorchCopyWorker(
                kv_caches, region, self.num_chunks, self.kv_bytes_per_chunk
            )
        return self._worker
