"""CPUBackendTieringSpec's worker: vLLM's KV tensors <-> its CPU tier's rows, with torch copies.

The spec is built through vLLM's own factory from the name and module path the docs give, with
its scheduler side (the primary tier over the shared rows) real: what the worker writes is read
back through the primary tier's rows, the bytes a secondary tier such as lmtier stores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from vllm_helpers import need_engine, offloading_config

need_engine("vllm.v1.kv_offload.tiering.spec")

import torch  # noqa: E402
from vllm.v1.kv_offload.base import (  # noqa: E402
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
)
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec  # noqa: E402

from lmtier.errors import ConfigError  # noqa: E402
from lmtier.integrations import vllm_cpu  # noqa: E402
from lmtier.integrations.vllm_cpu import CPUBackendTieringSpec, TorchCopyWorker  # noqa: E402

BLOCKS = 16  # KV blocks of the engine
ROWS = 12  # rows of vLLM's CPU tier
PAGE_ALIGN = 4096  # vLLM rounds a row up to whole memory pages


def kv_tensors(groups: Sequence[Sequence[int]] = ((0, 1, 2),)) -> CanonicalKVCaches:
    """Three KV tensors of different dtypes and widths (256, 1024 and 4608 bytes a block)."""
    generator = torch.Generator().manual_seed(7)
    tensors = [
        torch.empty(BLOCKS, 2, 8, 4, dtype=torch.float32),
        torch.empty(BLOCKS, 512, dtype=torch.bfloat16),
        torch.empty(BLOCKS, 4608, dtype=torch.int8),
    ]
    for tensor in tensors:
        flat = tensor.view(torch.int8)
        flat.copy_(torch.randint(-128, 128, flat.shape, dtype=torch.int8, generator=generator))
    pages = [t[0].numel() * t.element_size() for t in tensors]
    return CanonicalKVCaches(
        tensors=[CanonicalKVCacheTensor(t, p) for t, p in zip(tensors, pages, strict=True)],
        group_data_refs=[[CanonicalKVCacheRef(i, pages[i]) for i in group] for group in groups],
    )


def pages(kv: CanonicalKVCaches) -> list[torch.Tensor]:
    return [t.tensor.view(torch.int8).view(BLOCKS, -1) for t in kv.tensors]


@contextlib.contextmanager
def spec_worker(
    kv: CanonicalKVCaches, per_row: int = 1
) -> Iterator[tuple[Any, Callable[[], np.ndarray]]]:
    """(worker, a copy of the primary tier's rows): the spec as vLLM builds it."""
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    block = sum(t.page_size_bytes for t in kv.tensors)
    row = -(-block * per_row // PAGE_ALIGN) * PAGE_ALIGN
    extra = {
        "spec_name": "CPUBackendTieringSpec",
        "spec_module_path": "lmtier.integrations.vllm_cpu",
        "cpu_bytes_to_use": ROWS * row,
    }
    config = offloading_config(extra, worker_kv_bytes_per_block=block)
    config = dataclasses.replace(
        config, cache=dataclasses.replace(config.cache, blocks_per_chunk=per_row)
    )
    spec = OffloadingSpecFactory.create_spec(config)
    assert isinstance(spec, CPUBackendTieringSpec)
    manager = spec.get_manager()  # the scheduler side creates the shared rows
    # Held in a list the caller never sees: the export of vLLM's buffer ends before it unmaps.
    held = [np.asarray(manager.primary_tier.get_kv_memoryview())]
    assert held[0].shape == (ROWS, row)
    worker = spec.get_worker(kv)
    try:
        assert isinstance(worker, TorchCopyWorker)
        yield worker, lambda: held[0].copy()
    finally:
        worker.shutdown()
        held.clear()
        manager.shutdown()


def gpu_spec(ids: Sequence[int], sizes: Sequence[int], first: Sequence[int]) -> GPULoadStoreSpec:
    return GPULoadStoreSpec(list(ids), group_sizes=list(sizes), block_indices=list(first))


def finish(worker: Any, job_id: int) -> Any:
    worker.wait({job_id})
    (result,) = worker.get_finished()
    assert result.job_id == job_id
    return result


def slot_bytes(
    rows: np.ndarray, kv: CanonicalKVCaches, index: int, row: int, slot: int, per_row: int
) -> bytes:
    """Tensor ``index``'s block in slot ``slot`` of row ``row``, as vLLM lays a row out."""
    widths = [t.page_size_bytes for t in kv.tensors]
    at = sum(w * per_row for w in widths[:index]) + slot * widths[index]
    return rows[row, at : at + widths[index]].tobytes()


@pytest.mark.parametrize(
    ("per_row", "groups", "store_gpu", "store_rows", "sizes", "first", "load_gpu"),
    [
        # One block a row, one KV group: blocks and rows in no order at all.
        (1, ((0, 1, 2),), [7, 2, 11, 0, 5], [9, 3, 0, 6, 1], [5], [0], [3, 14, 8, 1, 12]),
        # Two blocks a row, the group starting in a row's second slot (vLLM's skip).
        (2, ((0, 1, 2),), [7, 2, 11, 0, 5], [5, 0, 3], [5], [1], [3, 14, 8, 1, 12]),
        # Two KV groups over different tensors, each with its own blocks and rows.
        (1, ((0, 1), (2,)), [7, 2, 11, 0, 5], [9, 3, 0, 6, 1], [3, 2], [0, 4], [3, 14, 8, 1, 12]),
    ],
    ids=["one-per-row", "two-per-row-skip", "two-groups"],
)
def test_store_then_load_round_trips_bit_exact(
    per_row: int,
    groups: Sequence[Sequence[int]],
    store_gpu: list[int],
    store_rows: list[int],
    sizes: list[int],
    first: list[int],
    load_gpu: list[int],
) -> None:
    kv = kv_tensors(groups)
    original = [p.clone() for p in pages(kv)]
    # Where each stored block lands: (group, gpu block, row, slot in the row).
    placed = []
    gpu_at = row_at = 0
    for group, (count, start) in enumerate(zip(sizes, first, strict=True)):
        skip = start % per_row
        for i in range(count):
            slot = skip + i
            placed.append(
                (group, store_gpu[gpu_at + i], store_rows[row_at + slot // per_row], slot % per_row)
            )
        gpu_at += count
        row_at += -(-(count + skip) // per_row)

    with spec_worker(kv, per_row) as (worker, read_rows):
        assert worker.submit_store(
            1, gpu_spec(store_gpu, sizes, first), CPULoadStoreSpec(store_rows)
        )
        stored = finish(worker, 1)
        rows = read_rows()
        assert stored.success
        moved = sum(
            kv.tensors[i].page_size_bytes * sizes[g]
            for g, group in enumerate(groups)
            for i in group
        )
        assert stored.transfer_size == moved
        for group, block, row, slot in placed:
            for index in groups[group]:
                want = original[index][block].numpy().tobytes()
                assert slot_bytes(rows, kv, index, row, slot, per_row) == want, (index, block, row)

        for page in pages(kv):
            page.zero_()
        load = gpu_spec(load_gpu, sizes, first)
        assert worker.submit_load(2, CPULoadStoreSpec(store_rows), load)
        assert finish(worker, 2).success
        loaded = set()
        for (group, block, _, _), target in zip(placed, load_gpu, strict=True):
            for index in groups[group]:
                assert torch.equal(pages(kv)[index][target], original[index][block])
                loaded.add((index, target))
        for index, page in enumerate(pages(kv)):
            for block in range(BLOCKS):
                if (index, block) not in loaded:  # a block the job did not name stays as it was
                    assert not page[block].any(), (index, block)


def test_a_job_of_zero_blocks_succeeds_and_moves_nothing() -> None:
    kv = kv_tensors()
    original = [p.clone() for p in pages(kv)]
    with spec_worker(kv) as (worker, read_rows):
        before = read_rows()
        assert worker.submit_store(1, gpu_spec([], [0], [0]), CPULoadStoreSpec([]))
        assert worker.submit_load(2, CPULoadStoreSpec([]), gpu_spec([], [0], [0]))
        worker.wait({1, 2})
        results = {r.job_id: r for r in worker.get_finished()}
        assert set(results) == {1, 2}
        assert all(r.success and r.transfer_size == 0 for r in results.values())
        assert np.array_equal(read_rows(), before)
        assert all(torch.equal(a, b) for a, b in zip(pages(kv), original, strict=True))


def test_a_failed_job_is_reported_failed_writes_nothing_and_later_jobs_run() -> None:
    kv = kv_tensors()
    original = [p.clone() for p in pages(kv)]
    with spec_worker(kv) as (worker, read_rows):
        before = read_rows()
        # A block id past the engine's blocks, beside a valid one: nothing of it is written.
        assert worker.submit_store(1, gpu_spec([3, BLOCKS], [2], [0]), CPULoadStoreSpec([0, 1]))
        # A row id past the tier's rows, and a negative one (which must not wrap around).
        assert worker.submit_load(2, CPULoadStoreSpec([ROWS]), gpu_spec([4], [1], [0]))
        assert worker.submit_load(3, CPULoadStoreSpec([-1]), gpu_spec([4], [1], [0]))
        # Two blocks for one row; two KV groups where the engine has one.
        assert worker.submit_store(4, gpu_spec([3, 4], [2], [0]), CPULoadStoreSpec([0]))
        assert worker.submit_store(5, gpu_spec([3], [1, 0], [0, 0]), CPULoadStoreSpec([0]))
        assert worker.submit_store(6, gpu_spec([3], [1], [0]), CPULoadStoreSpec([2]))
        worker.wait({1, 2, 3, 4, 5, 6})
        results = {r.job_id: r.success for r in worker.get_finished()}
        assert results == {1: False, 2: False, 3: False, 4: False, 5: False, 6: True}
        rows = read_rows()
        assert np.array_equal(rows[[0, 1]], before[[0, 1]])
        assert all(torch.equal(a, b) for a, b in zip(pages(kv), original, strict=True))
        assert slot_bytes(rows, kv, 2, 2, 0, 1) == original[2][3].numpy().tobytes()


def test_a_copy_that_raises_is_a_failed_job(monkeypatch: pytest.MonkeyPatch) -> None:
    kv = kv_tensors()
    with spec_worker(kv) as (worker, _):

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("injected copy failure")

        monkeypatch.setattr(vllm_cpu, "_move", broken)
        assert worker.submit_load(1, CPULoadStoreSpec([0]), gpu_spec([0], [1], [0]))
        assert finish(worker, 1).success is False
        monkeypatch.undo()
        assert worker.submit_load(2, CPULoadStoreSpec([0]), gpu_spec([0], [1], [0]))
        assert finish(worker, 2).success


def test_the_copy_thread_and_the_engines_polls_share_a_job_and_wait_returns_when_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kv = kv_tensors()
    original = [p.clone() for p in pages(kv)]
    gate, entered = threading.Event(), threading.Event()
    copied_here: list[int] = []
    move = vllm_cpu._move

    def gated(*args: Any) -> None:
        if threading.current_thread().name == "lmtier-vllm-cpu-copy":
            entered.set()
            assert gate.wait(60)
        else:
            copied_here.append(1)
        move(*args)

    with spec_worker(kv) as (worker, read_rows):
        monkeypatch.setattr(vllm_cpu, "_move", gated)
        assert worker.submit_store(1, gpu_spec([6], [1], [0]), CPULoadStoreSpec([4]))
        assert entered.wait(60)  # submit returned while the copy thread holds a unit
        # The engine's poll copies the job's other units itself, in its budget, one at least;
        # the job is not reported while the copy thread's unit is unfinished.
        for _ in range(len(kv.tensors)):
            assert worker.get_finished() == []
        assert len(copied_here) == len(kv.tensors) - 1
        waited = threading.Event()
        waiter = threading.Thread(target=lambda: (worker.wait({1}), waited.set()))
        waiter.start()
        assert not waited.is_set()
        gate.set()
        waiter.join(60)
        assert waited.is_set()
        (result,) = worker.get_finished()
        assert result.job_id == 1 and result.success
        for tensor in range(len(kv.tensors)):
            assert (
                slot_bytes(read_rows(), kv, tensor, 4, 0, 1)
                == original[tensor][6].numpy().tobytes()
            )


def test_a_job_larger_than_a_unit_is_cut_into_units_and_round_trips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vllm_cpu, "UNIT_BYTES", 1)  # one block a unit
    kv = kv_tensors()
    original = [p.clone() for p in pages(kv)]
    with spec_worker(kv) as (worker, _):
        blocks = [5, 1, 7, 3]
        assert worker.submit_store(1, gpu_spec(blocks, [4], [0]), CPULoadStoreSpec([0, 2, 4, 6]))
        assert finish(worker, 1).success
        for tensor in pages(kv):
            tensor.zero_()
        targets = [2, 4, 6, 0]
        assert worker.submit_load(2, CPULoadStoreSpec([0, 2, 4, 6]), gpu_spec(targets, [4], [0]))
        result = finish(worker, 2)
        assert result.success and result.transfer_size == sum(
            4 * t.page_size_bytes for t in kv.tensors
        )
        for tensor, before in zip(pages(kv), original, strict=True):
            for source, target in zip(blocks, targets, strict=True):
                assert torch.equal(tensor[target], before[source])


def test_kv_tensors_off_the_cpu_are_refused_with_the_spec_to_use() -> None:
    kv = kv_tensors()
    meta = CanonicalKVCaches(
        tensors=[
            CanonicalKVCacheTensor(t.tensor.to("meta"), t.page_size_bytes) for t in kv.tensors
        ],
        group_data_refs=kv.group_data_refs,
    )
    rows = [torch.zeros(ROWS, t.page_size_bytes, dtype=torch.int8) for t in kv.tensors]
    with pytest.raises(ConfigError, match="TieringOffloadingSpec"):
        TorchCopyWorker(meta, rows, 1)


def test_the_copy_thread_runs_nicer_than_the_engines_thread() -> None:
    with spec_worker(kv_tensors()) as (worker, _):
        assert worker.submit_store(1, gpu_spec([0], [1], [0]), CPULoadStoreSpec([0]))
        assert finish(worker, 1).success  # the thread has started and set its priority
        copy_thread = worker._thread.native_id
        engine_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, copy_thread) == max(
            vllm_cpu.COPY_THREAD_NICE, engine_nice
        )


def test_units_queued_at_shutdown_are_copied_before_the_rows_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vllm_cpu, "UNIT_BYTES", 1)  # one block a unit: many units queued
    kv = kv_tensors()
    original = [p.clone() for p in pages(kv)]
    gate = threading.Event()
    move = vllm_cpu._move

    def held(*args: Any) -> None:
        assert gate.wait(60)
        move(*args)

    with spec_worker(kv) as (worker, read_rows):
        monkeypatch.setattr(vllm_cpu, "_move", held)
        blocks, rows = [3, 9, 0, 14], [1, 5, 7, 11]
        assert worker.submit_store(1, gpu_spec(blocks, [4], [0]), CPULoadStoreSpec(rows))
        stopping = threading.Thread(target=worker.shutdown)
        stopping.start()  # while the copy thread holds its first unit, the rest queued
        gate.set()
        stopping.join(60)
        assert not stopping.is_alive()
        copied = read_rows()
    for tensor in range(len(kv.tensors)):
        for block, row in zip(blocks, rows, strict=True):
            assert slot_bytes(copied, kv, tensor, row, 0, 1) == (
                original[tensor][block].numpy().tobytes()
            )
