"""Reopening a disk tier: the index comes back from file headers, within budget, cleaned up."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from lmtier import CacheEngineKey, StorageError, StoreConfig, TierConfig, TieredStore, serde
from lmtier.cli.inspect import inspect_path
from lmtier.tiers import DiskTier
from lmtier.tiers.disk_files import TEMP_PREFIX

from conftest import tensor_for
from store_helpers import reshaped_entry

KIB = 1024
HOSTILE_KEYS = [
    CacheEngineKey("vllm", "meta/llama-3", 2, 1, "c0ffee"),
    "../../../etc/passwd",
    "nul\x00inside",
    "ключ 🔑",
    "x" * 5000,
]


def disk_only(root: Path, budget: int = 64 * KIB, namespace: str = "") -> TieredStore:
    tiers = (TierConfig("disk", "disk", budget, path=str(root)),)
    return TieredStore(StoreConfig(tiers, namespace=namespace))


def disk_of(store: TieredStore) -> DiskTier:
    tier = store.tiers[-1]
    assert isinstance(tier, DiskTier)
    return tier


def entry_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


async def fill(root: Path, keys: list[object], **kwargs: object) -> None:
    async with disk_only(root, **kwargs) as store:  # type: ignore[arg-type]
        for i, key in enumerate(keys):
            await store.put(key, tensor_for(str(key)))  # type: ignore[arg-type]
            # distinct modification times, oldest first
            os.utime(disk_of(store).lookup(key).path, ns=(10**18 + i * 10**9,) * 2)


async def test_entries_come_back_after_a_restart_in_recency_order(tmp_path: Path) -> None:
    keys: list[object] = [f"k{i}" for i in range(10)] + HOSTILE_KEYS
    await fill(tmp_path, keys)
    async with disk_only(tmp_path) as store:
        tier = disk_of(store)
        assert tier.recovery.indexed == len(keys)
        assert list(tier.cache_dict) == keys  # least recent first
        for key in keys:
            got = await store.get(key)  # type: ignore[arg-type]
            assert got is not None and torch.equal(got, tensor_for(str(key)))
        assert store.audit() == []


async def test_reopening_with_a_smaller_budget_keeps_the_newest(tmp_path: Path) -> None:
    await fill(tmp_path, [f"k{i}" for i in range(10)])
    async with disk_only(tmp_path, budget=4 * KIB) as store:
        tier = disk_of(store)
        assert list(tier.cache_dict) == ["k6", "k7", "k8", "k9"]
        assert (tier.recovery.indexed, tier.recovery.evicted) == (4, 6)
        assert tier.resident_bytes == 4 * KIB and store.audit() == []
        assert len(entry_files(tmp_path)) == 4


async def test_stray_temp_files_are_removed_and_unreadable_files_skipped(tmp_path: Path) -> None:
    await fill(tmp_path, ["a", "b"])
    async with disk_only(tmp_path) as store:
        folder = disk_of(store).root
    shard = next(p for p in folder.iterdir() if p.is_dir())
    (shard / f"{TEMP_PREFIX}interrupted.safetensors").write_bytes(b"half a file")
    (folder / f"{TEMP_PREFIX}probe").write_bytes(b"")
    (shard / "0123-garbage.safetensors").write_bytes(b"\x00" * 100)
    (shard / "4567-short.safetensors").write_bytes(b"\x10")
    async with disk_only(tmp_path) as store:
        tier = disk_of(store)
        assert (tier.recovery.indexed, tier.recovery.temp_removed) == (2, 2)
        assert tier.recovery.unreadable == 2
    assert not list(tmp_path.rglob(f"{TEMP_PREFIX}*"))
    assert (shard / "0123-garbage.safetensors").exists(), "a file lmtier cannot read was deleted"


async def test_the_newest_file_of_a_key_wins_and_older_ones_go(tmp_path: Path) -> None:
    await fill(tmp_path, ["a"])
    old = entry_files(tmp_path)[0]
    newer = old.with_name(old.name.replace("-", "-0", 1))
    shutil.copyfile(old, newer)
    os.utime(newer, ns=(2 * 10**18,) * 2)
    async with disk_only(tmp_path) as store:
        tier = disk_of(store)
        assert tier.recovery.duplicates == 1 and tier.lookup("a").path == str(newer)
    assert entry_files(tmp_path) == [newer]


async def test_a_restart_keeps_the_file_of_a_key_published_last(tmp_path: Path) -> None:
    """Two files of one key (the older one's removal failed): whatever stamps the file system
    gave their bytes (one clock tick of several ms often stamps both alike), a restart keeps
    the one published last."""
    async with disk_only(tmp_path) as store:
        tier = disk_of(store)
        older = await tier.write("a", tensor_for("a", 1))  # staged, under temporary names
        newer = await tier.write("a", tensor_for("a", 2))
        for meta, stamp in ((older, 10**18 + 10**9), (newer, 10**18)):
            path = Path(meta.path)
            os.utime(path.with_name(TEMP_PREFIX + path.name), ns=(stamp, stamp))
        tier.publish(older)
        tier.publish(newer)
    async with disk_only(tmp_path) as store:
        assert disk_of(store).recovery.duplicates == 1
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("a", 2))


async def test_the_index_reads_headers_only_and_reads_verify_payloads(tmp_path: Path) -> None:
    await fill(tmp_path, ["a", "b"])
    path = next(p for p in entry_files(tmp_path))
    with open(path, "r+b") as f:  # damage the payload, leave the header intact
        f.seek(-1, os.SEEK_END)
        f.write(b"\xaa")
    dropped: list[object] = []
    async with disk_only(tmp_path) as store:
        store.on_drop = dropped.append
        tier = disk_of(store)
        assert tier.recovery.indexed == 2
        results = {key: await store.get(key) for key in ("a", "b")}
        assert sum(r is None for r in results.values()) == 1
        assert tier.counters.corrupt == 1 and dropped
        assert store.audit() == []
    assert not path.exists()  # removed in the background; close() waits for that


async def test_namespaces_never_see_each_other(tmp_path: Path) -> None:
    await fill(tmp_path, ["a"], namespace="llama-8b|bf16|nhd")
    async with disk_only(tmp_path, namespace="llama-8b|fp16|nhd") as store:
        assert await store.get("a") is None and disk_of(store).recovery.indexed == 0
        await store.put("a", tensor_for("other"))
    async with disk_only(tmp_path, namespace="llama-8b|bf16|nhd") as store:
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("a"))


async def test_a_second_store_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    async with disk_only(tmp_path) as first:
        await first.put("a", tensor_for("a"))
        second = disk_only(tmp_path)
        with pytest.raises(StorageError, match="in use by another store"):
            await second.open()
        assert await first.get("a") is not None
    async with disk_only(tmp_path) as again:  # released on close
        assert await again.contains("a") == "disk"


def rewrite_header(path: Path, **changes: object) -> None:
    path.write_bytes(reshaped_entry(path.read_bytes(), **changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"shape": (64, 4)},
        {"shape": (256,)},
        {"dtype": torch.float32},  # the entry is int32
        {"dtype": torch.bfloat16, "shape": (4, 128)},
        {"key": "b"},  # the file then sits under another key's name, so the scan skips it
        {"namespace": "other"},
    ],
    ids=repr,
)
async def test_a_header_rewritten_to_another_shape_or_dtype_is_never_served(
    tmp_path: Path, changes: dict[str, object]
) -> None:
    async with disk_only(tmp_path) as store:
        await store.put("a", tensor_for("a").reshape(4, 64))
        path = Path(disk_of(store).lookup("a").path)
    rewrite_header(path, **changes)
    reports = inspect_path(tmp_path)
    assert sum(len(r.scan.corrupt) for r in reports) == 1
    assert sum(r.entries for r in reports) == 0
    async with disk_only(tmp_path) as store:
        tier = disk_of(store)
        got = await store.get("a")
        assert got is None, f"served {got.dtype}{list(got.shape)} from a crafted header"
        assert tier.recovery.unreadable + tier.counters.corrupt == 1
        assert store.audit() == []


async def test_a_header_with_negative_dimensions_is_unreadable_not_an_error(
    tmp_path: Path,
) -> None:
    async with disk_only(tmp_path) as store:
        await store.put("a", tensor_for("a").reshape(4, 64))
        path = Path(disk_of(store).lookup("a").path)
    rewrite_header(path, shape=(-4, -64))
    async with disk_only(tmp_path) as store:
        assert await store.get("a") is None
        assert disk_of(store).recovery.unreadable == 1
        await store.put("a", tensor_for("again"))
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("again"))


async def test_a_file_of_the_previous_format_version_is_detected_not_served(
    tmp_path: Path,
) -> None:
    await fill(tmp_path, ["a"])
    path = entry_files(tmp_path)[0]
    data = path.read_bytes()
    version = f'"version":"{serde.FORMAT_VERSION}"'.encode()
    assert version in data
    path.write_bytes(data.replace(version, f'"version":"{serde.FORMAT_VERSION - 1}"'.encode()))
    async with disk_only(tmp_path) as store:
        assert await store.get("a") is None and disk_of(store).recovery.unreadable == 1
    (report,) = inspect_path(tmp_path)
    assert "format version" in report.scan.corrupt[0][1]


async def test_a_str_key_and_an_engine_key_of_the_same_text_are_two_keys(tmp_path: Path) -> None:
    text, engine = "f@m@1@0@h", CacheEngineKey("f", "m", 1, 0, "h")
    async with disk_only(tmp_path) as store:
        await store.put(text, tensor_for("text"))
        await store.put(engine, tensor_for("engine"))
        tier = disk_of(store)
        assert Path(tier.lookup(text).path).name[:32] != Path(tier.lookup(engine).path).name[:32]
    async with disk_only(tmp_path) as store:
        assert disk_of(store).recovery.indexed == 2
        for key, name in ((text, "text"), (engine, "engine")):
            got = await store.get(key)
            assert got is not None and torch.equal(got, tensor_for(name))


async def test_a_negative_view_is_stored_with_its_sign(tmp_path: Path) -> None:
    values = {
        "neg": torch._neg_view(torch.arange(1.0, 65.0)),
        "conj": torch.tensor([1 + 2j]).conj().imag,  # one element, its negative bit set
    }
    async with disk_only(tmp_path) as store:
        for key, value in values.items():
            await store.put(key, value)
            got = await store.get(key)
            assert got is not None and got.tolist() == value.tolist(), key
    async with disk_only(tmp_path) as store:
        for key, value in values.items():
            got = await store.get(key)
            assert got is not None and got.tolist() == value.tolist(), key
