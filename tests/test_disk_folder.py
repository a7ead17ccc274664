"""The disk tier's folder is its own: no symlink followed out, only regular files opened,
only its own files deleted, and a lock that holds while the store writes there."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import StorageError, StoreConfig, TierConfig, TieredStore
from lmtier.cli import main
from lmtier.tiers import DiskTier, disk_recovery
from lmtier.tiers.disk_files import TEMP_PREFIX, key_digest

from conftest import tensor_for
from store_helpers import ROOM_TIMEOUT_S

KIB = 1024


def disk_only(root: Path, budget: int = 64 * KIB) -> TieredStore:
    return TieredStore(StoreConfig((TierConfig("disk", "disk", budget, path=str(root)),)))


def cpu_then_disk(root: Path) -> TieredStore:
    tiers = (
        TierConfig("cpu", "memory", 2 * KIB),
        TierConfig("disk", "disk", 64 * KIB, path=str(root)),
    )
    return TieredStore(StoreConfig(tiers, room_timeout_s=ROOM_TIMEOUT_S))


def disk_of(store: TieredStore) -> DiskTier:
    tier = store.tiers[-1]
    assert isinstance(tier, DiskTier)
    return tier


async def folder_with(root: Path, keys: str) -> Path:
    async with disk_only(root) as store:
        for key in keys:
            await store.put(key, tensor_for(key))
        return disk_of(store).root


def outside_with_sentinels(tmp_path: Path, entry: Path) -> Path:
    """A folder outside the tier's, holding files a careless scan would delete."""
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / f"{TEMP_PREFIX}sentinel").write_bytes(b"keep me")
    (outside / "sentinel.safetensors").write_bytes(b"not an entry, not lmtier's")
    shutil.copyfile(entry, outside / entry.name)  # an intact entry over the budget, a duplicate
    return outside


async def test_a_symlinked_shard_is_never_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache"
    folder = await folder_with(root, "ab")
    entry = next(folder.rglob("*.safetensors"))
    outside = outside_with_sentinels(tmp_path, entry)
    before = sorted(p.name for p in outside.iterdir())
    shard = "ff" if entry.parent.name != "ff" else "fe"
    (folder / shard).symlink_to(outside, target_is_directory=True)
    async with disk_only(root, budget=1 * KIB) as store:  # room for one of the two entries
        assert disk_of(store).recovery.unreadable >= 1
        assert len(disk_of(store).cache_dict) == 1
    assert sorted(p.name for p in outside.iterdir()) == before
    assert main(["inspect", str(root), "--repair"]) == 1  # the link remains: reported
    out = capsys.readouterr().out
    assert "symbolic link" in out and str(folder / shard) in out
    assert sorted(p.name for p in outside.iterdir()) == before
    assert (folder / shard).is_symlink()


async def test_a_symlinked_entry_file_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    folder = await folder_with(root, "a")
    entry = next(folder.rglob("*.safetensors"))
    outside = outside_with_sentinels(tmp_path, entry)
    entry.unlink()
    entry.symlink_to(outside / entry.name)
    async with disk_only(root) as store:
        assert disk_of(store).recovery.indexed == 0
        assert disk_of(store).recovery.unreadable == 1
    assert main(["inspect", str(root), "--repair"]) == 1
    assert entry.is_symlink() and (outside / entry.name).exists()


@contextmanager
def fifo_valve(folder: Path, after_s: float) -> Iterator[threading.Event]:
    """After ``after_s``, keep releasing whoever blocks opening a FIFO under ``folder`` (so a
    hang fails the test instead of the run); the event tells whether anyone had to be."""
    needed, stop = threading.Event(), threading.Event()

    def release() -> None:
        if stop.wait(after_s):
            return
        while not stop.wait(0.1):
            for fifo in folder.rglob("*"):
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    needed.set()  # a reader was waiting on it
                except OSError:
                    pass  # not a FIFO, or nobody reading it

    valve = threading.Thread(target=release, daemon=True)
    valve.start()
    try:
        yield needed
    finally:
        stop.set()
        valve.join()


@pytest.mark.timeout(60)
async def test_a_fifo_named_like_an_entry_hangs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache"
    folder = await folder_with(root, "ab")
    entry = next(folder.rglob("*.safetensors"))
    fifo = entry.parent / f"{key_digest('c')}-0123456789ab.safetensors"
    os.mkfifo(fifo)
    with fifo_valve(folder, after_s=3) as blocked:
        await _open_read_and_inspect(root, fifo, capsys)
    assert not blocked.is_set(), "a read blocked on a FIFO"


async def _open_read_and_inspect(
    root: Path, fifo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with disk_only(root) as store:
        disk = disk_of(store)
        assert disk.recovery.indexed == 2 and disk.recovery.unreadable == 1
        # an indexed entry's file replaced by a FIFO behind the store's back
        victim = Path(disk.lookup("a").path)
        victim.unlink()
        os.mkfifo(victim)
        assert await store.get("a") is None
        assert disk.counters.corrupt == 1 and await store.contains("a") is None
        got = await store.get("b")
        assert got is not None and torch.equal(got, tensor_for("b"))
    assert victim.exists() and fifo.exists(), "only the tier's own files are deleted"
    assert main(["inspect", str(root)]) == 1
    assert "not a regular file" in capsys.readouterr().out


async def test_temp_folders_and_unlistable_shards_do_not_stop_an_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cache"
    folder = await folder_with(root, "abcd")
    shards = sorted(p for p in folder.iterdir() if p.is_dir())
    (folder / f"{TEMP_PREFIX}a-folder").mkdir()
    (shards[0] / f"{TEMP_PREFIX}another").mkdir()
    (folder / "zz").write_bytes(b"a file where a shard could be")  # not a shard: ignored
    real_scandir = os.scandir
    hidden = shards[-1]
    in_hidden = len(list(hidden.glob("*.safetensors")))

    def scandir(path: Any = ".") -> Any:
        if str(path) == str(hidden):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    async with disk_only(root) as store:
        disk = disk_of(store)
        assert disk.recovery.unreadable >= 3  # two temp folders and the shard
        assert disk.recovery.indexed == 4 - in_hidden
        assert disk.recovery.temp_removed == 0
    monkeypatch.undo()
    assert (folder / f"{TEMP_PREFIX}a-folder").is_dir()
    assert (shards[0] / f"{TEMP_PREFIX}another").is_dir()
    async with disk_only(root) as store:
        assert disk_of(store).recovery.indexed == 4


async def test_a_failed_open_releases_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await folder_with(tmp_path, "ab")

    def broken_scan(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(disk_recovery, "scan_folder", broken_scan)
    store = disk_only(tmp_path)
    with pytest.raises(StorageError, match="Input/output error"):
        await store.open()
    monkeypatch.undo()
    async with disk_only(tmp_path) as again:  # not "in use by another store"
        assert disk_of(again).recovery.indexed == 2


async def test_a_removed_folder_is_not_recreated_beside_a_new_owner(tmp_path: Path) -> None:
    async with cpu_then_disk(tmp_path) as first:
        for key in "abcd":
            await first.put(key, tensor_for(key))
        disk = disk_of(first)
        shutil.rmtree(disk.root)  # rm -rf of a live folder
        errors = disk.counters.errors
        for key in "efgh":  # demotions to the disk tier fail: it no longer owns a folder
            await first.put(key, tensor_for(key))
        assert disk.counters.errors > errors and not disk.root.exists()
        async with disk_only(tmp_path) as second:  # a new owner takes the path
            await second.put("z", tensor_for("z"))
            for key in "ijkl":
                await first.put(key, tensor_for(key))
            assert len(list(disk.root.rglob("*.safetensors"))) == 1
            got = await second.get("z")
            assert got is not None and torch.equal(got, tensor_for("z"))
        got = await first.get("l")  # the memory tier still serves
        assert got is not None and torch.equal(got, tensor_for("l"))
        assert first.audit() == []


async def test_the_folder_check_costs_little_beside_a_write(tmp_path: Path) -> None:
    async with disk_only(tmp_path, budget=1 << 30) as store:
        disk = disk_of(store)
        data = tensor_for("x")
        started = time.perf_counter()
        for i in range(200):
            disk._write_file(f"w{i}", data)
        per_write = (time.perf_counter() - started) / 200
        started = time.perf_counter()
        for _ in range(2000):
            disk._check_folder()
        per_check = (time.perf_counter() - started) / 2000
    assert per_check < per_write / 5, (per_check, per_write)
