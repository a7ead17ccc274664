"""The cascade with a real GPU tier and a pinned CPU tier (runs where CUDA is present)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from lmtier import PutStatus, StoreConfig, TierConfig, TieredStore
from lmtier.tiers import MemoryTier, batch_copies
from lmtier.tiers.batch_copies import find_runs

from conftest import tensor_for
from store_helpers import count_waits

pytestmark = pytest.mark.cuda
KIB = 1024


def gpu_cpu_disk(root: Path) -> StoreConfig:
    return StoreConfig(
        tiers=(
            TierConfig("gpu", "memory", 4 * KIB, device="cuda", required=True),
            TierConfig("cpu", "memory", 8 * KIB, device="cpu", pinned=True),
            TierConfig("disk", "disk", 16 * KIB, path=str(root)),
        )
    )


async def test_gpu_cascade_round_trips_and_promotes(tmp_path: Path) -> None:
    async with TieredStore(gpu_cpu_disk(tmp_path)) as store:
        gpu, cpu, _ = store.tiers
        assert isinstance(cpu, MemoryTier) and cpu.pinned
        for i in range(20):
            source = tensor_for(f"k{i}").cuda() if i % 2 else tensor_for(f"k{i}")
            assert await store.put(f"k{i}", source) is PutStatus.LEGAL
        assert [await store.contains(f"k{i}") for i in (0, 10, 19)] == ["disk", "cpu", "gpu"]
        assert all(t.device.type == "cuda" for t in gpu.cache_dict.values())
        assert all(t.is_pinned() for t in cpu.cache_dict.values())
        for i in range(4, 20):
            got = await store.get(f"k{i}", device="cuda")
            assert got is not None and got.device.type == "cuda"
            assert torch.equal(got.cpu(), tensor_for(f"k{i}"))
            assert await store.contains(f"k{i}") == "gpu"  # promoted
        got = await store.get("k19")
        assert got is not None and got.device.type == "cuda"  # default: where it was found
        out = torch.empty(256, dtype=torch.int32, device="cuda")
        assert await store.get("k19", out=out) is out and torch.equal(out.cpu(), tensor_for("k19"))
        assert store.audit() == []


async def test_cuda_tier_copies_are_independent(tmp_path: Path) -> None:
    async with TieredStore(gpu_cpu_disk(tmp_path)) as store:
        source = tensor_for("a").cuda()
        await store.put("a", source)
        source.zero_()
        got = await store.get("a", device="cpu")
        assert got is not None and torch.equal(got, tensor_for("a"))


async def test_copies_wait_for_work_queued_on_the_engines_stream(tmp_path: Path) -> None:
    """A put right after a kernel that writes its tensor must copy the written values."""
    async with TieredStore(gpu_cpu_disk(tmp_path)) as store:
        for i in range(8):
            source = torch.empty(256, dtype=torch.int32, device="cuda")
            torch.cuda._sleep(20_000_000)  # a long kernel ahead on the current stream
            source.fill_(i)  # queued behind it
            assert await store.put(f"s{i}", source) is PutStatus.LEGAL
            host = torch.empty(256, dtype=torch.int32).pin_memory()
            assert await store.get(f"s{i}", out=host) is host
            assert torch.equal(host, torch.full((256,), i, dtype=torch.int32))
        for i in range(8):  # the early ones were demoted to the pinned cpu tier and to disk
            got = await store.get(f"s{i}", device="cpu")
            assert got is not None and torch.equal(got, torch.full((256,), i, dtype=torch.int32))
        assert store.audit() == []


# ---------------------------------------------------------------------- batched GPU path
def step_delta(before: Counter[str]) -> Counter[str]:
    delta = Counter(batch_copies.step_counts)
    delta.subtract(before)
    return delta


def pinned_cpu_disk(root: Path, cpu: int) -> StoreConfig:
    return StoreConfig(
        tiers=(
            TierConfig("cpu", "memory", cpu, device="cpu", pinned=True),
            TierConfig("disk", "disk", 64 << 20, path=str(root)),
        )
    )


def gpu_chunks(count: int, numel: int = 64 * KIB) -> list[tuple[str, torch.Tensor]]:
    """``count`` GPU tensors of ``numel`` int32, written by a kernel queued behind a long one."""
    torch.cuda._sleep(20_000_000)  # the copies must wait for the writes queued behind it
    return [
        (f"g{i}", torch.arange(numel, dtype=torch.int32, device="cuda") * (i + 1) + i)
        for i in range(count)
    ]


async def test_put_many_from_the_gpu_is_one_gather_and_one_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = gpu_chunks(64)  # 256 KiB each
    expected = [tensor.cpu() for _, tensor in items]  # (synchronizes: computed, then queued)
    torch.cuda._sleep(20_000_000)
    for _, tensor in items:
        tensor.add_(1)  # queued behind a long kernel again: the put must copy these values
    async with TieredStore(pinned_cpu_disk(tmp_path, 32 << 20)) as store:
        waits = count_waits(monkeypatch)
        before = Counter(batch_copies.step_counts)
        assert await store.put_many(items) == [PutStatus.LEGAL] * 64
        steps = step_delta(before)
        assert steps["cat"] == 1 and steps["copy"] == 1 and len(waits) == 1
        cpu = store.tiers[0]
        entries = [cpu.lookup(key) for key, _ in items]
        assert all(entry.is_pinned() for entry in entries)
        assert len(find_runs(entries)) == 1  # the staged run, adopted as it is
        del entries
        for (key, _), value in zip(items, expected, strict=True):
            got = await store.get(key)
            assert got is not None and not got.is_cuda and torch.equal(got, value + 1)
        assert store.audit() == []


async def test_get_many_to_the_gpu_is_one_copy_per_run_into_one_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = gpu_chunks(64)
    async with TieredStore(pinned_cpu_disk(tmp_path, 32 << 20)) as store:
        await store.put_many(items)
        waits = count_waits(monkeypatch)
        before = Counter(batch_copies.step_counts)
        got = await store.get_many([key for key, _ in items], device="cuda")
        steps = step_delta(before)
        assert steps["copy"] == 1 and steps["cat"] == 0 and steps["scatter"] == 0
        assert len(waits) == 1
        assert all(value is not None and value.is_cuda for value in got)
        assert len({value.untyped_storage().data_ptr() for value in got if value is not None}) == 1
        for value, (_, tensor) in zip(got, items, strict=True):
            assert value is not None and torch.equal(value, tensor)
        assert store.audit() == []


async def test_gpu_victims_of_one_eviction_move_with_one_copy(tmp_path: Path) -> None:
    config = StoreConfig(
        tiers=(
            TierConfig("gpu", "memory", 4 << 20, device="cuda", required=True),
            TierConfig("cpu", "memory", 32 << 20, device="cpu", pinned=True),
            TierConfig("disk", "disk", 64 << 20, path=str(tmp_path)),
        )
    )
    items = gpu_chunks(4, numel=256 * KIB)  # 1 MiB each: the gpu tier is full
    async with TieredStore(config) as store:
        for key, tensor in items:
            assert await store.put(key, tensor) is PutStatus.LEGAL
        before = Counter(batch_copies.step_counts)
        wide = torch.ones(768 * KIB, dtype=torch.int32, device="cuda")  # 3 MiB: three victims
        assert await store.put("wide", wide) is PutStatus.LEGAL
        steps = step_delta(before)
        # Each victim is a GPU buffer of its own (never one run, even where the allocator put
        # them side by side): one gather on the GPU, then one D2H copy.
        assert steps["cat"] == 1 and steps["copy"] == 1
        assert [await store.contains(key) for key, _ in items] == ["cpu"] * 3 + ["gpu"]
        cpu = store.tiers[1]
        assert isinstance(cpu, MemoryTier) and cpu.slab is not None
        assert all(cpu.slab.owns(cpu.lookup(key)) for key, _ in items[:3])
        for key, tensor in items:
            got = await store.get(key, device="cuda")
            assert got is not None and torch.equal(got, tensor)
        assert store.audit() == []
