"""Disk tier benchmarks, each beside a baseline measured in the same run.

    python scripts/bench_disk.py [--entries 100000] [--folder /var/tmp]

1. Checksum cost per payload byte: xxh3-64 (what lmtier uses) against zlib.crc32 and a copy.
2. Entry writes and verified reads of 16 MiB, against plain os writes and reads of the bytes.
3. Restart: entries indexed per second when a tier reopens a folder of small entries.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import torch
import xxhash
from timing import median_time

from lmtier.evictor import LRUEvictor
from lmtier.serde import payload_view
from lmtier.tiers import DiskTier

MB = 1024**2


def checksums(repeats: int) -> None:
    source = torch.randint(0, 255, (64 * MB,), dtype=torch.uint8)
    target = torch.empty_like(source)
    data = payload_view(source)
    copy_s = median_time(lambda: target.copy_(source), repeats)
    rates = {
        "copy_ (memcpy)": copy_s,
        "xxh3_64": median_time(lambda: xxhash.xxh3_64_hexdigest(data), repeats),
        "xxh64": median_time(lambda: xxhash.xxh64_hexdigest(data), repeats),
        "zlib.crc32": median_time(lambda: zlib.crc32(data), repeats),
    }
    for name, seconds in rates.items():
        print(
            f"  {name:14s} {len(data) / seconds / 1e9:6.2f} GB/s   {seconds / copy_s:5.2f}x a copy"
        )


def writes_and_reads(folder: Path, repeats: int) -> None:
    tensor = torch.randint(0, 255, (16 * MB,), dtype=torch.uint8)
    payload = payload_view(tensor)
    tier = DiskTier("disk", LRUEvictor(max_cache_bytes=1 << 40), folder / "tier")
    asyncio.run(tier.open())
    raw_folder = folder / "raw"
    raw_folder.mkdir()
    written: list[str] = []

    def tier_write() -> None:
        written.append(tier._write_file("k", tensor).path)

    def raw_write() -> None:
        path = raw_folder / uuid.uuid4().hex
        with open(path, "wb", buffering=0) as f:
            f.write(payload)
        written.append(str(path))

    # Alternate the two so that page-cache writeback weighs on both alike.
    tier_samples, raw_samples = [], []
    for _ in range(repeats):
        tier_samples.append(median_time(tier_write, 1))
        raw_samples.append(median_time(raw_write, 1))
    write_tier, write_raw = statistics.median(tier_samples), statistics.median(raw_samples)
    meta = tier._write_file("k", tensor)
    raw_path = written[-1]
    read_tier = median_time(lambda: tier._read_file(meta), repeats)
    read_raw = median_time(lambda: Path(raw_path).read_bytes(), repeats)
    for path in written:
        os.unlink(path)
    gbs = 16 * MB / 1e9
    print(
        f"  write: entry {gbs / write_tier:.2f} GB/s   raw os write {gbs / write_raw:.2f} GB/s   "
        f"ratio {write_raw / write_tier:.2f}"
    )
    print(
        f"  read (checksum verified): entry {gbs / read_tier:.2f} GB/s   raw read "
        f"{gbs / read_raw:.2f} GB/s   ratio {read_raw / read_tier:.2f}"
    )


def restart(folder: Path, entries: int) -> None:
    root = folder / "restart"
    tier = DiskTier("disk", LRUEvictor(max_cache_bytes=1 << 40), root)
    asyncio.run(tier.open())
    started = time.perf_counter()
    value = torch.arange(64, dtype=torch.int32)
    for i in range(entries):
        tier._write_file(f"model@1@0@chunk-{i}", value)
    write_s = time.perf_counter() - started
    asyncio.run(tier.close())
    reopened = DiskTier("disk", LRUEvictor(max_cache_bytes=1 << 40), root)
    asyncio.run(reopened.open())
    asyncio.run(reopened.close())
    seconds = reopened.recovery.seconds
    assert reopened.recovery.indexed == entries, reopened.recovery
    print(
        f"  {entries:,} entries written in {write_s:.1f} s; reopened in {seconds:.2f} s: "
        f"{entries / seconds:,.0f} entries/s indexed   (goal >= 20,000/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--folder", type=Path, default=None, help="where to write (a temp dir)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder, prefix="lmtier-bench-") as name:
        folder = Path(name)
        print(f"medians of {args.repeats}; files under {folder}")
        print("checksum of a 64 MiB payload:")
        checksums(args.repeats)
        print("16 MiB entries:")
        writes_and_reads(folder, args.repeats)
        print("restart:")
        restart(folder, args.entries)


if __name__ == "__main__":
    main()
