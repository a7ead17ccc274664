"""One run of the whole ``lmtier bench`` table: every row module's rows, in order."""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lmtier.cli.bench.core import BenchOptions, KiB, MiB, Row
from lmtier.cli.bench.cpu import checksum_rows, cpu_put_get, hit_latency, ops_per_second
from lmtier.cli.bench.disk import demotion_throughput, disk_rows, restart_row, small_disk_writes
from lmtier.cli.bench.redis import remote_bench_rows

__all__ = ["QUICK_RESTART_ENTRIES", "gpu_section", "run_table", "settle"]

QUICK_RESTART_ENTRIES = 2_000


def settle() -> None:
    """Leave nothing of one section to the next: its garbage collected, and its files' dirty
    pages written back by the kernel now rather than during the next section's timings."""
    gc.collect()
    os.sync()


def gpu_section(repeats: int, add: Callable[[list[Row]], None]) -> None:
    """The GPU rows: the GPU tier's, then the batched path's at 2 and 32 MiB, single chunks
    and batches of 64."""
    from lmtier.cli.bench.gpu import gpu_batch_rows, gpu_rows

    add(asyncio.run(gpu_rows(2 * MiB, repeats * 4)))
    for chunk in (2 * MiB, 32 * MiB):
        for count in (1, 64):
            add(asyncio.run(gpu_batch_rows(chunk, count, repeats * 4 if count == 1 else repeats)))


def run_table(options: BenchOptions, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    rows: list[Row] = []

    def add(new: Row | list[Row]) -> None:
        for row in new if isinstance(new, list) else [new]:
            rows.append(row)
            if on_row is not None:
                on_row(row)
        settle()

    repeats = options.repeats
    if options.gpu_only:
        if torch.cuda.is_available():
            gpu_section(repeats, add)
        else:
            add(Row("gpu rows", None, detail="no CUDA device on this machine"))
        return rows
    for nbytes in (2 * MiB, 16 * MiB):
        add(asyncio.run(cpu_put_get(nbytes, repeats)))
    add(asyncio.run(hit_latency(repeats, 500 if options.quick else 2000)))
    counts = [10**3, 10**4] if options.quick else [10**3, 10**4, 10**5, 10**6]
    add(asyncio.run(ops_per_second(counts, 5_000 if options.quick else 20_000, repeats)))
    add(checksum_rows(repeats))
    with tempfile.TemporaryDirectory(dir=options.folder, prefix="lmtier-bench-") as name:
        folder = Path(name)
        for nbytes in (2 * MiB, 16 * MiB):
            add(disk_rows(nbytes, repeats, folder, options.fsync))
        add(asyncio.run(small_disk_writes(folder, 16 * KiB, 64, repeats)))
        for write_ahead in (False, True):
            add(asyncio.run(demotion_throughput(folder, 2 * MiB, 16, repeats, write_ahead)))
        add(
            restart_row(folder, QUICK_RESTART_ENTRIES if options.quick else options.restart_entries)
        )
        if options.peers:
            from lmtier.cli.bench.peers import peer_rows  # imports LMCache: only when asked

            for nbytes in (2 * MiB, 16 * MiB):
                add(peer_rows(nbytes, repeats, folder))
        if options.vllm:
            from lmtier.cli.bench.vllm import vllm_tier_rows  # imports vLLM: only when asked

            add(vllm_tier_rows(folder, repeats=repeats))
    if torch.cuda.is_available():
        gpu_section(repeats, add)
    # A round trip takes ~1.5 ms: eight times the samples cost a few seconds and steady the
    # medians, which a shared machine's noise moved by several hundredths at 9 samples.
    add(remote_bench_rows(options.redis_url, repeats * 8))
    return rows
