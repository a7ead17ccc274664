"""``lmtier bench``: lmtier's data paths beside raw baselines measured in the same run.

Every row is a median of several repetitions and a ratio to a baseline taken side by side,
because absolute times on shared machines drift from run to run while ratios hold.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from lmtier.config import StoreConfig, TierConfig
from lmtier.evictor import LRUEvictor
from lmtier.serde import payload_view
from lmtier.store import TieredStore
from lmtier.tiers import DiskTier

__all__ = ["BenchOptions", "Row", "format_rows", "run_bench"]

MiB = 1024**2
KiB = 1024


@dataclass(frozen=True)
class BenchOptions:
    quick: bool = False
    folder: Path | None = None  # where disk rows write (a temporary folder inside it)
    fsync: bool = False  # disk rows with durability fsync, baselines fsync'ed alike
    restart_entries: int = 100_000
    peers: bool = False  # rows beside LMCache 0.5.6's local backends (lmtier.bench_peers)
    redis_url: str | None = None  # redis rows on this server (default: a local one, if installed)
    vllm: bool = False  # the vLLM secondary tier's rows (lmtier.bench_vllm; needs vLLM)

    @property
    def repeats(self) -> int:
        return 5 if self.quick else 9


@dataclass(frozen=True)
class Row:
    name: str
    lmtier: str
    baseline: str
    ratio: float | None  # baseline time / lmtier time (1.0: as fast as the raw operation)
    goal: str = ""


def median_time(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def amedian_time(fn: Callable[[], Awaitable[object]], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _gbs(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def _store(*tiers: TierConfig) -> TieredStore:
    return TieredStore(StoreConfig(tiers))


# ---------------------------------------------------------------------- memory tiers
async def cpu_put_get(nbytes: int, repeats: int) -> list[Row]:
    """put + get of one entry, into a preallocated ``out=`` and as a new tensor, against
    ``copy_`` into and out of as many preallocated buffers as the store keeps entries."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    out = torch.empty_like(src)
    slots = [torch.empty_like(src) for _ in range(4)]
    turn = 0

    def raw() -> None:
        nonlocal turn
        turn += 1
        slots[turn % 4].copy_(src)
        out.copy_(slots[turn % 4])

    async with _store(TierConfig("cpu", "memory", 8 * nbytes)) as store:

        async def put_get(into: torch.Tensor | None) -> None:
            nonlocal turn
            turn += 1
            await store.put(f"k{turn % 4}", src)
            await store.get(f"k{turn % 4}", out=into)

        for _ in range(8):
            await put_get(None)  # fill the buffer pool
        into_s, fresh_s, raw_s = [], [], []
        for _ in range(repeats):  # interleaved, so drift weighs on all three alike
            into_s.append(await amedian_time(lambda: put_get(out), 1))
            fresh_s.append(await amedian_time(lambda: put_get(None), 1))
            raw_s.append(median_time(raw, 1))
    into, fresh, base = (statistics.median(x) for x in (into_s, fresh_s, raw_s))
    size = f"{nbytes // MiB} MiB"
    moved = 2 * nbytes
    return [
        Row(f"cpu put+get(out=) {size}", _gbs(moved, into), _gbs(moved, base), base / into,
            ">= 0.8"),
        Row(f"cpu put+get new tensor {size}", _gbs(moved, fresh), _gbs(moved, base),
            base / fresh),
    ]  # fmt: skip


async def hit_latency(repeats: int, entries: int) -> Row:
    tensors = [torch.randint(0, 255, (4 * KiB,), dtype=torch.uint8) for _ in range(entries)]
    async with _store(TierConfig("cpu", "memory", 64 * MiB)) as store:
        for i, tensor in enumerate(tensors):
            await store.put(f"k{i}", tensor)

        async def gets() -> None:
            for i in range(entries):
                await store.get(f"k{i}")

        per_get = await amedian_time(gets, repeats) / entries

    def clones() -> None:
        for tensor in tensors:
            tensor.clone()

    per_clone = median_time(clones, repeats) / entries
    return Row("cpu 4 KiB hit latency", f"{per_get * 1e6:.1f} us",
               f"{per_clone * 1e6:.1f} us clone", per_clone / per_get, "<= 15 us")  # fmt: skip


async def ops_per_second(counts: list[int], ops: int) -> list[Row]:
    """Half gets, half overwrites of 1 KiB entries, at several resident entry counts."""
    value = torch.zeros(256, dtype=torch.int32)
    rates = {}
    for entries in counts:
        async with _store(TierConfig("cpu", "memory", entries * KiB)) as store:
            for i in range(entries):
                await store.put(f"k{i}", value)
            rng = random.Random(0)
            keys = [f"k{rng.randrange(entries)}" for _ in range(ops)]
            started = time.perf_counter()
            for n, key in enumerate(keys):
                if n % 2:
                    await store.get(key)
                else:
                    await store.put(key, value)
            rates[entries] = ops / (time.perf_counter() - started)
    first = counts[0]
    return [
        Row(f"ops/s at {n:.0e} entries", f"{rates[n]:,.0f}", f"{rates[first]:,.0f} at {first:.0e}",
            rates[n] / rates[first], "within 30%")
        for n in counts
    ]  # fmt: skip


# ---------------------------------------------------------------------- disk
def disk_rows(nbytes: int, repeats: int, folder: Path, fsync: bool) -> list[Row]:
    """Entry writes and verified reads against raw writes to new names and ``readinto``."""
    tensor = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    payload = payload_view(tensor)
    durability = "fsync" if fsync else "none"
    tier = DiskTier("disk", LRUEvictor(max_cache_bytes=1 << 40), folder / "tier", durability)
    asyncio.run(tier.open())
    raw_folder = folder / "raw"
    raw_folder.mkdir(exist_ok=True)
    written: list[str] = []

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

    write_tier: list[float] = []
    write_raw: list[float] = []
    for i in range(repeats):  # alternate, and swap who goes first, so writeback weighs alike
        pair = [
            (write_tier, lambda: written.append(tier.write_published("k", tensor).path)),
            (write_raw, raw_write),
        ]
        for samples, write in pair if i % 2 else pair[::-1]:
            samples.append(median_time(write, 1))
    meta = tier.write_published("k", tensor)
    out = torch.empty_like(tensor)
    raw_out = memoryview(payload_view(torch.empty_like(tensor)))
    raw_path = written[-1]

    def raw_read() -> None:
        with open(raw_path, "rb", buffering=0) as f:
            f.readinto(raw_out)

    read_tier = median_time(lambda: tier._read_file(meta, out), repeats)
    read_raw = median_time(raw_read, repeats)
    asyncio.run(tier.close())
    for path in [*written, meta.path]:
        Path(path).unlink(missing_ok=True)
    wt, wr = statistics.median(write_tier), statistics.median(write_raw)
    size = f"{nbytes // MiB} MiB"
    suffix = ", fsync" if fsync else ""
    return [
        Row(f"disk write {size}{suffix}", _gbs(nbytes, wt), _gbs(nbytes, wr), wr / wt, ">= 0.8"),
        Row(f"disk read {size} (checksum)", _gbs(nbytes, read_tier), _gbs(nbytes, read_raw),
            read_raw / read_tier, ">= 0.8"),
    ]  # fmt: skip


async def demotion_throughput(folder: Path, nbytes: int, count: int, rounds: int) -> Row:
    """A CPU tier spilling to disk on every put, against raw writes of the same bytes.

    Rounds of ``count`` puts alternate with rounds of ``count`` raw writes to new names, so
    the page cache's writeback weighs on both sides alike.
    """
    tensor = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    payload = payload_view(tensor)
    config = (
        TierConfig("cpu", "memory", 8 * nbytes),
        TierConfig("disk", "disk", 2 * count * nbytes, path=str(folder / "spill")),
    )
    spill: list[float] = []
    raw: list[float] = []
    raw_files: list[Path] = []  # as many kept as the disk tier keeps, so writeback is alike
    async with _store(*config) as store:
        for i in range(8):
            await store.put(f"warm{i}", tensor)
        for round_ in range(rounds):
            started = time.perf_counter()
            for i in range(count):
                await store.put(f"k{round_}-{i}", tensor)
            spill.append(time.perf_counter() - started)
            paths = [folder / f"raw-{uuid.uuid4().hex}" for _ in range(count)]
            started = time.perf_counter()
            for path in paths:
                with open(path, "wb", buffering=0) as f:
                    f.write(payload)
            raw.append(time.perf_counter() - started)
            raw_files += paths
            while len(raw_files) > 2 * count:
                raw_files.pop(0).unlink()
        demoted = store.stats()["tiers"]["cpu"]["demotions_out"]
    for path in raw_files:
        path.unlink()
    spill_s, raw_s = statistics.median(spill), statistics.median(raw)
    return Row(f"cpu->disk demotion, {nbytes // MiB} MiB puts ({demoted} demoted)",
               _gbs(count * nbytes, spill_s), _gbs(count * nbytes, raw_s) + " raw write",
               raw_s / spill_s)  # fmt: skip


async def small_disk_writes(folder: Path, nbytes: int, count: int, repeats: int) -> Row:
    """``put_many`` of small entries into a disk tier, against raw writes of the same bytes to
    new files, all in one worker thread (the least any thread-hopping writer pays)."""
    tensors = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(count)]
    tiers = (TierConfig("disk", "disk", 4 * count * nbytes, path=str(folder / "small")),)
    raw_folder = folder / "small-raw"
    raw_folder.mkdir(exist_ok=True)

    def raw_writes() -> None:
        for tensor in tensors:
            with open(raw_folder / uuid.uuid4().hex, "wb", buffering=0) as f:
                f.write(payload_view(tensor))

    store_s, raw_s = [], []
    async with _store(*tiers) as store:
        for round_ in range(repeats):
            items = [(f"r{round_}-{i}", tensor) for i, tensor in enumerate(tensors)]
            started = time.perf_counter()
            await store.put_many(items)
            store_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            await asyncio.to_thread(raw_writes)
            raw_s.append(time.perf_counter() - started)
    total = count * nbytes
    lm, raw = statistics.median(store_s), statistics.median(raw_s)
    return Row(f"disk put_many {count} x {nbytes // KiB} KiB", _gbs(total, lm),
               _gbs(total, raw) + " raw, one thread", raw / lm)  # fmt: skip


def checksum_rows(repeats: int) -> list[Row]:
    source = torch.randint(0, 255, (64 * MiB,), dtype=torch.uint8)
    target = torch.empty_like(source)
    data = payload_view(source)
    copy_s = median_time(lambda: target.copy_(source), repeats)
    xxh = median_time(lambda: xxhash.xxh3_64_hexdigest(data), repeats)
    crc = median_time(lambda: zlib.crc32(data), repeats)
    return [
        Row("checksum xxh3-64 (used)", _gbs(len(data), xxh), _gbs(len(data), copy_s) + " copy_",
            copy_s / xxh),
        Row("checksum zlib.crc32", _gbs(len(data), crc), _gbs(len(data), copy_s) + " copy_",
            copy_s / crc),
    ]  # fmt: skip


def restart_row(folder: Path, entries: int) -> Row:
    root = folder / "restart"
    tier = DiskTier("disk", LRUEvictor(max_cache_bytes=1 << 40), root)
    asyncio.run(tier.open())
    value = torch.arange(64, dtype=torch.int32)
    for i in range(entries):
        tier.write_published(f"model@1@0@chunk-{i}", value)
    asyncio.run(tier.close())
    reopened = DiskTier("disk", LRUEvictor(max_cache_bytes=1 << 40), root)
    asyncio.run(reopened.open())
    asyncio.run(reopened.close())
    rate = reopened.recovery.indexed / reopened.recovery.seconds
    return Row(f"restart: index {entries:,} entries", f"{rate:,.0f} entries/s", "", None,
               ">= 20,000/s")  # fmt: skip


# ---------------------------------------------------------------------- GPU
async def gpu_rows(nbytes: int, repeats: int) -> list[Row]:
    """Host->GPU put and GPU->host get(out=) with pinned host memory, against raw copy_."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory()
    out = torch.empty_like(src).pin_memory()
    device_buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    async with _store(TierConfig("gpu", "memory", 8 * nbytes, device="cuda")) as store:
        await store.put("k", src)
        put_s = await amedian_time(lambda: store.put("k", src), repeats)
        get_s = await amedian_time(lambda: store.get("k", out=out), repeats)

    def h2d() -> None:
        device_buf.copy_(src)
        torch.cuda.synchronize()

    def d2h() -> None:
        out.copy_(device_buf)
        torch.cuda.synchronize()

    raw_h2d, raw_d2h = median_time(h2d, repeats), median_time(d2h, repeats)
    size = f"{nbytes // MiB} MiB"
    return [
        Row(f"gpu put (H2D) {size}", _gbs(nbytes, put_s), _gbs(nbytes, raw_h2d),
            raw_h2d / put_s, ">= 0.8"),
        Row(f"gpu get (D2H) {size}", _gbs(nbytes, get_s), _gbs(nbytes, raw_d2h),
            raw_d2h / get_s, ">= 0.8"),
    ]  # fmt: skip


# ---------------------------------------------------------------------- the table
def run_bench(options: BenchOptions, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    rows: list[Row] = []

    def add(new: Row | list[Row]) -> None:
        for row in new if isinstance(new, list) else [new]:
            rows.append(row)
            if on_row is not None:
                on_row(row)

    repeats = options.repeats
    for nbytes in (2 * MiB, 16 * MiB):
        add(asyncio.run(cpu_put_get(nbytes, repeats)))
    add(asyncio.run(hit_latency(repeats, 500 if options.quick else 2000)))
    counts = [10**3, 10**4, 10**5] if options.quick else [10**3, 10**4, 10**5, 10**6]
    add(asyncio.run(ops_per_second(counts, 5_000 if options.quick else 20_000)))
    with tempfile.TemporaryDirectory(dir=options.folder, prefix="lmtier-bench-") as name:
        folder = Path(name)
        for nbytes in (2 * MiB, 16 * MiB):
            add(disk_rows(nbytes, repeats, folder, options.fsync))
        add(asyncio.run(small_disk_writes(folder, 16 * KiB, 64, repeats)))
        add(asyncio.run(demotion_throughput(folder, 2 * MiB, 16, repeats)))
        add(checksum_rows(repeats))
        add(restart_row(folder, 10_000 if options.quick else options.restart_entries))
        if options.peers:
            from lmtier.bench_peers import peer_rows  # imports LMCache: only when asked

            for nbytes in (2 * MiB, 16 * MiB):
                add(peer_rows(nbytes, repeats, folder))
        if options.vllm:
            from lmtier.bench_vllm import vllm_tier_rows  # imports vLLM: only when asked

            add(vllm_tier_rows(folder, repeats=repeats))
    if torch.cuda.is_available():
        add(asyncio.run(gpu_rows(2 * MiB, repeats * 4)))
    from lmtier.bench_remote import remote_bench_rows  # it imports this module

    # A round trip takes ~1.5 ms: eight times the samples cost a few seconds and steady the
    # medians, which a shared machine's noise moved by several hundredths at 9 samples.
    add(remote_bench_rows(options.redis_url, repeats * 8))
    return rows


def format_rows(rows: list[Row]) -> str:
    table = [["measure", "lmtier", "baseline (same run)", "ratio", "goal"]]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        table.append([row.name, row.lmtier, row.baseline, ratio, row.goal])
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip()
        for r in table
    )
