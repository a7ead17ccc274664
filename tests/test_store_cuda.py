"""The cascade with a real GPU tier and a pinned CPU tier (runs where CUDA is present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmtier import PutStatus, StoreConfig, TierConfig, TieredStore
from lmtier.tiers import MemoryTier

from conftest import tensor_for

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
