"""Rows for the disk tier: file writes and verified reads, small batched writes, demotion from a
cpu tier, and the index rebuilt at restart, each beside raw file I/O of the same bytes.

Every row removes its files before it returns, so no row's writeback or directory lands on
the rows measured after it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import uuid
from pathlib import Path

import torch

from lmtier.cli.bench.core import (
    Goal,
    KiB,
    Row,
    Scale,
    Side,
    atimed,
    make_store,
    timed,
    touched,
)
from lmtier.config import TierConfig
from lmtier.evictor import LRUEvictor
from lmtier.serde import payload_view
from lmtier.sizes import human_bytes
from lmtier.tiers import DiskTier

__all__ = ["demotion_throughput", "disk_rows", "restart_row", "small_disk_writes"]


def disk_rows(nbytes: int, repeats: int, folder: Path, fsync: bool) -> list[Row]:
    """The tier's own file write and verified read (private functions, no store around them)
    against raw writes to new names and ``readinto``."""
    tensor = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    payload = payload_view(tensor)
    durability = "fsync" if fsync else "none"
    budget = (repeats + 4) * 2 * nbytes
    tier = DiskTier("disk", LRUEvictor(max_cache_bytes=budget), folder / "tier", durability)
    asyncio.run(tier.open())
    raw_folder = folder / "raw"
    raw_folder.mkdir(exist_ok=True)
    written: list[str] = []
    raw_paths: list[str] = []

    def raw_write() -> None:
        path = raw_folder / uuid.uuid4().hex
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        written.append(str(path))
        raw_paths.append(str(path))

    write_tier: list[float] = []
    write_raw: list[float] = []
    try:
        for i in range(repeats):  # alternate, and swap who goes first, so writeback weighs alike
            pair = [
                (write_tier, lambda: written.append(tier.write_published("k", tensor).path)),
                (write_raw, raw_write),
            ]
            for times, write in pair if i % 2 else pair[::-1]:
                times.append(timed(write))
        meta = tier.write_published("k", tensor)
        written.append(meta.path)
        out = touched(torch.empty_like(tensor))
        raw_out = memoryview(payload_view(touched(torch.empty_like(tensor))))
        raw_path = raw_paths[-1]

        def raw_read() -> None:
            with open(raw_path, "rb", buffering=0) as f:
                f.readinto(raw_out)

        read_tier: list[float] = []
        read_raw: list[float] = []
        for _ in range(repeats):
            read_tier.append(timed(lambda: tier._read_file(meta, out)))
            read_raw.append(timed(raw_read))
    finally:
        asyncio.run(tier.close())
        for path in written:
            Path(path).unlink(missing_ok=True)
    size = human_bytes(nbytes)
    suffix = ", fsync" if fsync else ""
    gbs = Scale.throughput(nbytes)
    return [
        Row(f"disk write {size}{suffix} (private path)", Side(tuple(write_tier), gbs),
            Side(tuple(write_raw), gbs), Goal.ratio(0.8)),
        Row(f"disk read {size} (checksum, private path)", Side(tuple(read_tier), gbs),
            Side(tuple(read_raw), gbs), Goal.ratio(0.8)),
    ]  # fmt: skip


async def demotion_throughput(
    folder: Path, nbytes: int, count: int, rounds: int, write_ahead: bool = False
) -> Row:
    """A CPU tier spilling to disk on every put, against raw writes of the same bytes; with
    ``write_ahead``, the victims are copied down while the puts before them run.

    Rounds of ``count`` puts alternate with rounds of ``count`` raw writes to new names, so
    the page cache's writeback weighs on both sides alike.
    """
    tensor = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    payload = payload_view(tensor)
    spill_folder = folder / "spill"
    config = (
        TierConfig("cpu", "memory", 8 * nbytes),
        TierConfig("disk", "disk", 2 * count * nbytes, path=str(spill_folder)),
    )
    spill: list[float] = []
    raw: list[float] = []
    raw_files: list[Path] = []  # as many kept as the disk tier keeps, so writeback is alike

    async def puts(round_: int) -> None:
        for i in range(count):
            await store.put(f"k{round_}-{i}", tensor)

    def raw_writes(paths: list[Path]) -> None:
        for path in paths:
            with open(path, "wb", buffering=0) as f:
                f.write(payload)

    try:
        async with make_store(*config, write_ahead=write_ahead) as store:
            for i in range(8):
                await store.put(f"warm{i}", tensor)
            for round_ in range(rounds):
                spill.append(await atimed(functools.partial(puts, round_)))
                paths = [folder / f"raw-{uuid.uuid4().hex}" for _ in range(count)]
                raw.append(timed(functools.partial(raw_writes, paths)))
                raw_files += paths
                while len(raw_files) > 2 * count:
                    raw_files.pop(0).unlink()
    finally:
        for path in raw_files:
            path.unlink(missing_ok=True)
        shutil.rmtree(spill_folder, ignore_errors=True)
    gbs = Scale.throughput(count * nbytes)
    ahead = ", write_ahead" if write_ahead else ""
    return Row(f"cpu->disk demotion, {human_bytes(nbytes)} puts{ahead}", Side(tuple(spill), gbs),
               Side(tuple(raw), gbs, "raw write"), Goal.ratio(0.8))  # fmt: skip


async def small_disk_writes(folder: Path, nbytes: int, count: int, repeats: int) -> Row:
    """``put_many`` of small entries into a disk tier, against raw writes of the same bytes to
    new files, all in one worker thread (the least any thread-hopping writer pays)."""
    tensors = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(count)]
    tier_folder = folder / "small"
    tiers = (TierConfig("disk", "disk", 4 * count * nbytes, path=str(tier_folder)),)
    raw_folder = folder / "small-raw"
    raw_folder.mkdir(exist_ok=True)

    def raw_writes() -> None:
        for tensor in tensors:
            with open(raw_folder / uuid.uuid4().hex, "wb", buffering=0) as f:
                f.write(payload_view(tensor))

    store_s, raw_s = [], []
    try:
        async with make_store(*tiers) as store:
            for round_ in range(repeats):
                items = [(f"r{round_}-{i}", tensor) for i, tensor in enumerate(tensors)]
                store_s.append(await atimed(functools.partial(store.put_many, items)))
                raw_s.append(await atimed(functools.partial(asyncio.to_thread, raw_writes)))
    finally:
        shutil.rmtree(tier_folder, ignore_errors=True)
        shutil.rmtree(raw_folder, ignore_errors=True)
    gbs = Scale.throughput(count * nbytes)
    return Row(f"disk put_many {count} x {nbytes // KiB} KiB", Side(tuple(store_s), gbs),
               Side(tuple(raw_s), gbs, "raw, one thread"))  # fmt: skip


def restart_row(folder: Path, entries: int) -> Row:
    """Reopening a disk tier of ``entries`` small entries: how fast its index is rebuilt."""
    root = folder / "restart"
    try:
        tier = DiskTier("disk", LRUEvictor(max_cache_bytes=1 << 30), root)
        asyncio.run(tier.open())
        value = torch.arange(64, dtype=torch.int32)
        for i in range(entries):
            tier.write_published(f"model@1@0@chunk-{i}", value)
        asyncio.run(tier.close())
        reopened = DiskTier("disk", LRUEvictor(max_cache_bytes=1 << 30), root)
        asyncio.run(reopened.open())
        asyncio.run(reopened.close())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    indexed = reopened.recovery.indexed
    return Row(f"restart: index {entries:,} entries",
               Side((reopened.recovery.seconds,), Scale.rate(indexed, "entries/s")),
               goal=Goal.figure_at_least(20_000, ">= 20,000/s"))  # fmt: skip
