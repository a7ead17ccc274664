"""Disk faults injected through the tier's I/O: full disk, lost files, read errors, races."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import PutStatus, StoreConfig, TierConfig, TieredStore
from lmtier.tiers import DiskTier, disk_files
from lmtier.tiers import disk as disk_module

from conftest import tensor_for
from store_helpers import ROOM_TIMEOUT_S

KIB = 1024


def cpu_then_disk(root: Path, cpu: int = 2 * KIB, disk: int = 8 * KIB) -> TieredStore:
    tiers = (
        TierConfig("cpu", "memory", cpu),
        TierConfig("disk", "disk", disk, path=str(root)),
    )
    return TieredStore(StoreConfig(tiers, room_timeout_s=ROOM_TIMEOUT_S))


def disk_of(store: TieredStore) -> DiskTier:
    tier = store.tiers[-1]
    assert isinstance(tier, DiskTier)
    return tier


async def test_a_full_disk_drops_victims_and_the_store_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped: list[object] = []
    store = cpu_then_disk(tmp_path)
    store.on_drop = dropped.append
    async with store:
        await store.put("a", tensor_for("a"))
        await store.put("b", tensor_for("b"))

        def no_space(fd: int, buffers: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "writev", no_space)
        assert await store.put("c", tensor_for("c")) is PutStatus.LEGAL  # a cannot go down
        assert dropped == ["a"] and await store.contains("a") is None
        assert disk_of(store).counters.errors == 1 and store.tiers[0].counters.drops == 1
        assert await store.put("big", tensor_for("big", numel=1024)) is PutStatus.ILLEGAL
        got = await store.get("c")
        assert got is not None and torch.equal(got, tensor_for("c"))
        assert store.audit() == []
        monkeypatch.undo()
        await store.put("d", tensor_for("d"))
        assert await store.contains("b") == "disk"
    assert not list(tmp_path.rglob(".tmp-*"))


async def test_files_lost_behind_the_stores_back_become_misses(tmp_path: Path) -> None:
    async with cpu_then_disk(tmp_path) as store:
        for key in "abcd":
            await store.put(key, tensor_for(key))
        disk = disk_of(store)
        os.unlink(disk.lookup("a").path)
        assert await store.get("a") is None
        shutil.rmtree(disk.root)  # the whole folder vanishes
        assert await store.get("b") is None
        assert disk.counters.errors == 2 and len(disk.cache_dict) == 0
        assert store.audit() == []
        for key in "efgh":  # writes fail: the folder is not recreated without its lock
            await store.put(key, tensor_for(key))
        assert disk.counters.errors > 2 and not disk.root.exists()
        got = await store.get("h")  # the memory tier still serves
        assert got is not None and torch.equal(got, tensor_for("h"))
        assert store.audit() == []


def reads_in_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every read to the worker threads: the races and descriptor shortages these tests
    inject live there (a read from the page cache on the loop never awaits, and holds one
    descriptor at a time)."""
    monkeypatch.setattr(disk_module, "LOOP_READ_BYTES", -1)


@pytest.mark.parametrize("path", ["loop", "thread"])
async def test_a_read_error_is_a_counted_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    async with cpu_then_disk(tmp_path) as store:
        for key in "abcd":
            await store.put(key, tensor_for(key))

        def io_error(*args: Any) -> None:
            raise OSError(errno.EIO, "Input/output error")

        if path == "thread":
            reads_in_threads(monkeypatch)
        else:  # the failing device fails the read on the loop first, then the thread's
            monkeypatch.setattr(os, "preadv", io_error)
        monkeypatch.setattr(DiskTier, "_read_file", io_error)
        assert await store.get("a") is None
        assert disk_of(store).counters.errors >= 1 and store.audit() == []
        assert await store.get("d") is not None  # the memory tier still serves
        assert await store.contains("a") == "disk", "an I/O error is no evidence of bad bytes"
        monkeypatch.undo()
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("a"))


async def test_a_passing_error_keeps_every_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads that fail for want of file descriptors are misses: the entries stay, intact."""
    keys = [f"k{i}" for i in range(400)]
    tiers = (TierConfig("disk", "disk", 400 * KIB, path=str(tmp_path)),)
    async with TieredStore(StoreConfig(tiers, promote_on_hit=False)) as store:
        for key in keys:
            await store.put(key, tensor_for(key))
        disk = disk_of(store)
        failed = 0
        lock = threading.Lock()
        real_open = open

        def crowded_open(path: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal failed
            with lock:
                if failed < 346:
                    failed += 1
                    raise OSError(errno.EMFILE, "Too many open files")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(disk_module, "open", crowded_open, raising=False)
        reads_in_threads(monkeypatch)
        await asyncio.gather(*(store.get(key) for key in keys))
        monkeypatch.undo()
        assert failed == 346 and disk.counters.errors == failed
        assert disk.counters.corrupt == 0 and len(disk.cache_dict) == len(keys)
        assert len(list(tmp_path.rglob("*.safetensors"))) == len(keys)
        for key in keys:
            got = await store.get(key)
            assert got is not None and torch.equal(got, tensor_for(key)), key
        assert store.audit() == []


RLIMIT_BURST = """
import asyncio, os, resource, sys
import torch
from lmtier import StoreConfig, TierConfig, TieredStore
from lmtier.tiers import disk as disk_module

disk_module.LOOP_READ_BYTES = -1  # reads in threads, which hold descriptors at once

async def main(root):
    keys = [f"k{i}" for i in range(400)]
    tensors = {key: torch.full((256,), i, dtype=torch.int32) for i, key in enumerate(keys)}
    tiers = (TierConfig("disk", "disk", 400 * 1024, path=root),)
    async with TieredStore(StoreConfig(tiers, promote_on_hit=False)) as store:
        for key in keys:
            await store.put(key, tensors[key])
        disk = store.tiers[-1]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # The limit at the lowest free descriptor number: every open fails with EMFILE however
        # the reads' threads are scheduled.  (A limit a few above it bit only when that many
        # reads held a file open at once, which a loaded machine may never schedule.)
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            await asyncio.gather(*(store.get(key) for key in keys))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        intact = 0
        for key in keys:
            got = await store.get(key)
            intact += got is not None and torch.equal(got, tensors[key])
        print(disk.counters.errors, disk.counters.corrupt, len(disk.cache_dict), intact)

asyncio.run(main(sys.argv[1]))
"""


def test_the_open_file_limit_reached_keeps_every_entry(tmp_path: Path) -> None:
    """The same burst with a real RLIMIT_NOFILE, lowered in a process of its own."""
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", RLIMIT_BURST, str(tmp_path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=100,  # importing torch alone takes seconds on a loaded machine
    )
    assert done.returncode == 0, done.stderr[-2000:]
    errors, corrupt, indexed, intact = map(int, done.stdout.split())
    assert errors == 400, "every read of the burst met the limit"
    assert (corrupt, indexed, intact) == (0, 400, 400)


# How long a gate holds or a wait lasts at most: only a hang comes near it, however loaded the
# machine.
HANG_S = 60.0


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` to hold (what another thread does), failing after ``HANG_S``."""
    deadline = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def gate_open(
    monkeypatch: pytest.MonkeyPatch, after: bool
) -> tuple[threading.Event, threading.Event]:
    """Block disk reads just before (or just after) they open their file."""
    reached, release = threading.Event(), threading.Event()
    real_open = open
    real_read_header = disk_files.read_header

    def gated_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if not after:
            reached.set()
            release.wait(HANG_S)
        return real_open(path, *args, **kwargs)

    def gated_read_header(f: Any) -> Any:
        if after:
            reached.set()
            release.wait(HANG_S)
        return real_read_header(f)

    monkeypatch.setattr(disk_module, "open", gated_open, raising=False)
    monkeypatch.setattr(disk_module, "read_header", gated_read_header)
    reads_in_threads(monkeypatch)
    return reached, release


@pytest.mark.parametrize("delete_after_open", [False, True])
async def test_a_read_racing_a_delete_returns_the_data_or_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delete_after_open: bool
) -> None:
    async with cpu_then_disk(tmp_path) as store:
        for key in "abcd":
            await store.put(key, tensor_for(key))
        assert await store.contains("a") == "disk"
        reached, release = gate_open(monkeypatch, after=delete_after_open)
        reader = asyncio.create_task(store.get("a"))
        assert await asyncio.to_thread(reached.wait, HANG_S)
        path = Path(disk_of(store).lookup("a").path)
        assert await store.delete("a") is True
        await until(lambda: not path.exists())  # the delete's unlink has run
        release.set()
        got = await reader
        if delete_after_open:
            assert got is not None and torch.equal(got, tensor_for("a"))
        else:
            assert got is None
        assert store.audit() == []
        assert disk_of(store).counters.errors == 0, "a race is not an error"


async def test_a_read_racing_an_eviction_keeps_its_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiers = (TierConfig("disk", "disk", KIB, path=str(tmp_path)),)
    async with TieredStore(StoreConfig(tiers, room_timeout_s=ROOM_TIMEOUT_S)) as store:
        await store.put("a", tensor_for("a"))
        reached, release = gate_open(monkeypatch, after=True)
        reader = asyncio.create_task(store.get("a"))
        assert await asyncio.to_thread(reached.wait, HANG_S)
        writer = asyncio.create_task(store.put("b", tensor_for("b")))  # must evict a: pinned
        await asyncio.sleep(0.05)
        assert not writer.done() and await store.contains("a") == "disk"
        release.set()
        got = await reader
        assert got is not None and torch.equal(got, tensor_for("a"))
        assert await writer is PutStatus.LEGAL
        assert await store.contains("a") is None and await store.contains("b") == "disk"
        assert store.audit() == []
