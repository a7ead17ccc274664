"""The tier contract against every backend, and what only the disk tier promises."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lmtier.errors import CorruptEntryError, StorageError
from lmtier.keys import CacheEngineKey
from lmtier.testing.tier import TierContract, lru, store_in
from lmtier.tiers import DiskTier, MemoryTier, Tier

from conftest import tensor_for


class TestCpuMemoryTier(TierContract):
    async def make_tier(self, budget: int) -> Tier:
        return MemoryTier("cpu", lru(budget), torch.device("cpu"))


@pytest.mark.cuda
class TestCudaMemoryTier(TierContract):
    async def make_tier(self, budget: int) -> Tier:
        return MemoryTier("gpu", lru(budget), torch.device("cuda"))


class TestDiskTier(TierContract):
    @pytest.fixture(autouse=True)
    def _root(self, tmp_path: Path) -> None:
        self.root = tmp_path / "disk"

    async def make_tier(self, budget: int) -> Tier:
        tier = DiskTier("disk", lru(budget), self.root)
        await tier.open()
        return tier


async def open_disk(root: Path, budget: int = 1 << 20, durability: str = "none") -> DiskTier:
    tier = DiskTier("disk", lru(budget), root, durability)
    await tier.open()
    return tier


@pytest.mark.parametrize("durability", ["none", "fsync"])
async def test_disk_files_are_safetensors_with_lmtier_metadata(
    tmp_path: Path, durability: str
) -> None:
    tier = await open_disk(tmp_path, durability=durability)
    key = CacheEngineKey("vllm", "llama", 2, 1, "c0ffee")
    tensor = torch.randn(4, 16).to(torch.bfloat16)
    await store_in(tier, key, tensor)
    meta = tier.lookup(key)
    assert torch.equal(load_file(meta.path)["kv"], tensor)
    with safe_open(meta.path, "pt") as f:
        header = f.metadata()
    assert header["key"] == key.to_string() and header["format"] == "lmtier"
    assert meta.size == tensor.numel() * 2 == tier.evictor.get_size(meta)
    assert not [p for p in tmp_path.rglob(".tmp-*")], "a temporary file was left behind"


@pytest.mark.parametrize(
    "key", ["../../escape", "/etc/passwd", "a\x00b", "ключ/🔑", "x" * 5000, ".tmp-lookalike"]
)
async def test_hostile_keys_never_leave_the_folder(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    tier = await open_disk(root)
    await store_in(tier, key, tensor_for("k"))
    path = Path(tier.lookup(key).path)
    assert path.resolve().is_relative_to(root.resolve())
    assert key not in path.name
    loaded = await tier.load(tier.lookup(key))
    assert loaded is not None and torch.equal(loaded, tensor_for("k"))
    assert [p.name for p in tmp_path.iterdir()] == ["root"]


def _flip_last_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


def _flip_a_middle_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        middle = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([middle[0] ^ 0xFF]))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) - 3)


def _other_version(path: str) -> None:
    data = Path(path).read_bytes()
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["version"] = "999"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


@pytest.mark.parametrize("numel", [10_000, 1_500_000], ids=["one-read", "read-in-pieces"])
@pytest.mark.parametrize(
    "damage", [_flip_last_byte, _flip_a_middle_byte, _truncate, _other_version]
)
async def test_damaged_files_are_detected(tmp_path: Path, damage: object, numel: int) -> None:
    tier = await open_disk(tmp_path, budget=8 << 20)
    await store_in(tier, "k", tensor_for("k", numel=numel))
    meta = tier.lookup("k")
    damage(meta.path)  # type: ignore[operator]
    with pytest.raises(CorruptEntryError):
        await tier.load(meta)


async def test_a_vanished_file_reads_as_none(tmp_path: Path) -> None:
    tier = await open_disk(tmp_path)
    await store_in(tier, "k", tensor_for("k"))
    os.unlink(tier.lookup("k").path)
    assert await tier.load(tier.lookup("k")) is None


async def test_an_unwritable_folder_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write"):
        await open_disk(blocker / "sub")


async def test_a_failed_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = await open_disk(tmp_path)

    def full_disk(fd: int, buffers: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", full_disk)
    with pytest.raises(OSError, match="No space"):
        await tier.write("k", tensor_for("k"))
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["LOCK"]


async def test_memory_reuses_freed_ranges_but_never_one_in_use() -> None:
    tier = MemoryTier("cpu", lru(4 * 1024), torch.device("cpu"))
    assert tier.slab is not None
    await store_in(tier, "a", tensor_for("a"))
    held = await tier.load(tier.lookup("a"))  # a reader still copying out of "a"
    await tier.discard(tier.remove("a"))
    await store_in(tier, "b", tensor_for("b"))
    assert torch.equal(held, tensor_for("a")), "a range in use was handed to a new entry"
    a_start = held.data_ptr()
    del held
    await tier.discard(tier.remove("b"))
    await store_in(tier, "c", tensor_for("c"))
    assert tier.lookup("c").data_ptr() == a_start  # first fit: the range "a" left
    assert tier.slab.allocated_bytes <= tier.slab.capacity


@pytest.mark.cuda
async def test_gpu_memory_reuses_freed_buffers_but_never_one_in_use() -> None:
    tier = MemoryTier("gpu", lru(4 * 1024), torch.device("cuda"))
    source = tensor_for("a").cuda()
    await store_in(tier, "a", source)
    held = await tier.load(tier.lookup("a"))
    await tier.discard(tier.remove("a"))
    await store_in(tier, "b", tensor_for("b").cuda())
    assert torch.equal(held.cpu(), tensor_for("a")), "a buffer in use was handed to a new entry"
    del held
    await tier.discard(tier.remove("b"))
    storage_of_b_pool = {t.untyped_storage().data_ptr() for q in tier._pool.values() for t in q}
    await store_in(tier, "c", tensor_for("c").cuda())
    assert tier.lookup("c").untyped_storage().data_ptr() in storage_of_b_pool
    assert tier.resident_bytes + tier._pool_bytes <= tier.budget


async def test_memory_slab_never_holds_more_than_the_budget_and_one_piece() -> None:
    tier = MemoryTier("cpu", lru(4 * 1024), torch.device("cpu"))
    assert tier.slab is not None
    for i in range(20):
        numel = 64 * (1 + i % 5)
        await store_in(tier, f"k{i}", tensor_for(f"k{i}", numel=numel))
        assert tier.slab.allocated_bytes <= 2 * tier.budget
    assert tier.audit(quiescent=True) == []
