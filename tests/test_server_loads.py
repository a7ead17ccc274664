"""The server's Load job: hits read straight into the client's region, every fallback exact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from lmtier import StoreConfig, TierConfig, TieredStore
from lmtier.server import loads
from lmtier.store import reads
from lmtier.tiers import DiskTier

KIB = 1024


def store_with_disk(root: Path) -> TieredStore:
    return TieredStore(
        StoreConfig(
            (
                TierConfig("cpu", "memory", 64 * KIB),
                TierConfig("disk", "disk", 1024 * KIB, path=str(root)),
            )
        )
    )


async def test_a_disk_hit_is_read_into_the_region_without_a_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TieredStore(StoreConfig((TierConfig("disk", "disk", 1024 * KIB, path=str(tmp_path)),)))
    async with store:
        value = torch.arange(8 * KIB, dtype=torch.float32).reshape(16, 512)
        await store.put("k", value)
        seen: list[torch.Tensor | None] = []
        real_load_now_into = DiskTier.load_now_into

        def spied(self: DiskTier, obj: object, out: torch.Tensor) -> object:
            seen.append(out)
            return real_load_now_into(self, obj, out)

        # The cached file is read on the spot, in the job's one pass over its blocks.
        monkeypatch.setattr(DiskTier, "load_now_into", spied)
        region = torch.full((value.nbytes + 64,), 0xAA, dtype=torch.uint8)
        (found,) = await loads.load_into_region(store, region, ["k"], [64], [value.nbytes])
        assert found is not None and found.copied
        assert (found.dtype, found.shape, found.nbytes) == ("float32", [16, 512], value.nbytes)
        (out,) = seen
        assert out is not None and out.data_ptr() == region.data_ptr() + 64  # the region itself
        assert torch.equal(region[64:].view(torch.float32).reshape(16, 512), value)
        assert bool((region[:64] == 0xAA).all())


async def test_misses_memory_hits_and_entries_too_large_for_their_room(tmp_path: Path) -> None:
    async with store_with_disk(tmp_path) as store:
        small = torch.arange(256, dtype=torch.int16)  # 512 bytes: stays in memory
        large = torch.arange(4 * KIB, dtype=torch.int64)  # 32 KiB
        await store.put("small", small)
        await store.put("large", large)
        assert store.holder("small") == "cpu"
        region = torch.full((64 * KIB,), 0x55, dtype=torch.uint8)
        found = await loads.load_into_region(
            store, region, ["small", "missing", "large"], [0, 1024, 2048], [512, 512, 1024]
        )
        assert found[0] is not None and found[0].copied
        assert torch.equal(region[:512].view(torch.int16), small)
        assert found[1] is None
        assert found[2] is not None and not found[2].copied and found[2].nbytes == large.nbytes
        assert bool((region[512:].eq(0x55)).all())  # nothing written for a miss or no room


async def test_an_entry_replaced_by_another_layout_is_read_as_it_is_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with store_with_disk(tmp_path) as store:
        now = torch.arange(1024, dtype=torch.int32)  # 4 KiB
        await store.put("k", now)
        # The layout the index had when the job looked, before a put replaced the entry.
        monkeypatch.setattr(loads, "entry_layout", lambda s, k: (torch.float16, (2048,)))
        region = torch.zeros(8 * KIB, dtype=torch.uint8)
        (found,) = await loads.load_into_region(store, region, ["k"], [0], [8 * KIB])
        assert found is not None and found.copied
        assert (found.dtype, found.shape) == ("int32", [1024])
        assert torch.equal(region[: now.nbytes].view(torch.int32), now)


async def test_a_misaligned_offset_reads_through_a_copy(tmp_path: Path) -> None:
    async with store_with_disk(tmp_path) as store:
        value = torch.arange(64 * 64, dtype=torch.float32) / 3  # 16 KiB
        await store.put("k", value)
        region = torch.zeros(32 * KIB, dtype=torch.uint8)
        (found,) = await loads.load_into_region(store, region, ["k"], [3], [value.nbytes])
        assert found is not None and found.copied
        assert bytes(region[3 : 3 + value.nbytes].numpy()) == value.numpy().tobytes()


@pytest.mark.parametrize("on_the_spot", [True, False], ids=["cached-reads", "thread-reads"])
async def test_a_batch_reports_each_block_and_leaves_the_others_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_the_spot: bool
) -> None:
    """Missing, corrupt on disk, of another layout (larger than its room, or smaller), and
    deleted while the job runs: each block reports as it should; the hits' bytes are exact."""
    store = TieredStore(StoreConfig((TierConfig("disk", "disk", 1024 * KIB, path=str(tmp_path)),)))
    async with store:
        tier = store.tiers[0]
        assert isinstance(tier, DiskTier)
        row = 16 * KIB
        values = {f"k{i}": torch.full((row // 4,), i + 0.5) for i in range(3)}
        values["corrupt"] = torch.full((row // 4,), 9.5)
        values["deleted"] = torch.full((row // 4,), 7.5)
        for key, value in values.items():
            await store.put(key, value)
        await store.put("larger", torch.zeros(row, dtype=torch.int16))  # 32 KiB: no room
        smaller = torch.arange(row // 4, dtype=torch.int16)  # 8 KiB, another dtype
        await store.put("smaller", smaller)
        with open(tier.lookup("corrupt").path, "r+b") as file:
            file.seek(-1, 2)
            last = file.read(1)
            file.seek(-1, 2)
            file.write(bytes([last[0] ^ 0xFF]))
        tier._nowait_reads = on_the_spot
        # The job yields after each block read on the spot: the delete runs at the first.
        monkeypatch.setattr(reads, "_YIELD_BYTES", 1)
        first_read = asyncio.Event()
        real = DiskTier.load_now_into

        def spied(self: DiskTier, obj: object, out: torch.Tensor) -> object:
            first_read.set()
            return real(self, obj, out)

        monkeypatch.setattr(DiskTier, "load_now_into", spied)

        async def delete_at_the_first_read() -> bool:
            await first_read.wait()
            return await store.delete("deleted")

        deleting = asyncio.create_task(delete_at_the_first_read())
        keys = ["k0", "missing", "corrupt", "k1", "larger", "smaller", "k2", "deleted"]
        region = torch.full((len(keys) * row,), 0x55, dtype=torch.uint8)
        offsets = [i * row for i in range(len(keys))]
        found = await loads.load_into_region(store, region, keys, offsets, [row] * len(keys))
        assert await deleting
        blocks = dict(zip(keys, region.view(len(keys), row), strict=True))
        by_key = dict(zip(keys, found, strict=True))
        for key in ("k0", "k1", "k2"):
            hit = by_key[key]
            assert hit is not None and hit.copied and (hit.dtype, hit.nbytes) == ("float32", row)
            assert torch.equal(blocks[key].view(torch.float32), values[key])
        assert by_key["missing"] is None and bool(blocks["missing"].eq(0x55).all())
        assert by_key["corrupt"] is None and store.holder("corrupt") is None  # dropped
        assert by_key["deleted"] is None and bool(blocks["deleted"].eq(0x55).all())
        larger = by_key["larger"]
        assert larger is not None and not larger.copied and larger.nbytes == 2 * row
        assert bool(blocks["larger"].eq(0x55).all())
        small = by_key["smaller"]
        assert small is not None and small.copied
        assert (small.dtype, small.shape) == ("int16", [row // 4])
        assert torch.equal(blocks["smaller"][: smaller.nbytes].view(torch.int16), smaller)
