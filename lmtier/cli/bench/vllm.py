"""Rows for lmtier's vLLM secondary tier (``lmtier bench --vllm``,
``python -m lmtier.cli.bench.vllm``).

One job of ``blocks`` primary-tier rows (default 64 rows of 2 MiB) stored into and loaded back
from a disk tier through ``LmtierSecondaryTier``, against raw ``os.write`` / ``readinto`` of the
same bytes to new files with an xxh3-64 checksum of each (lmtier checksums every entry), and
the time the scheduler thread spends per job: ``submit_store`` plus one ``lookup`` per block.

vLLM is imported lazily: this module imports without it, ``vllm_tier_rows`` needs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import xxhash

from lmtier.cli.bench.core import Goal, MiB, Row, Scale, Side, format_rows, timed
from lmtier.sizes import human_bytes

__all__ = ["vllm_tier_rows"]


def _spec(row_bytes: int) -> Any:
    """The fields of vLLM's OffloadingSpec that the tier's namespace reads."""
    return SimpleNamespace(
        replicated_layout=False,
        config=SimpleNamespace(
            model=SimpleNamespace(name="bench", dtype="torch.bfloat16"),
            cache=SimpleNamespace(tokens_per_hash=16, blocks_per_chunk=1),
            groups=[SimpleNamespace(tokens_per_block=16, layer_names=("layer",))],
            parallel=SimpleNamespace(world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1),
            worker_kv_bytes_per_block=row_bytes,
            canonical_layout=False,
            kv_cache_layout=None,
        ),
    )


def _job(job_id: int, keys: list[bytes], slots: range, promotion: bool) -> Any:
    from vllm.v1.kv_offload.base import ReqContext
    from vllm.v1.kv_offload.tiering.base import TransferJob

    names = {f.name for f in dataclasses.fields(TransferJob)}
    ids = {("block_ids" if "block_ids" in names else "chunk_ids"): np.asarray(slots, np.int32)}
    return TransferJob(
        job_id=job_id,
        keys=keys,
        is_promotion=promotion,
        req_context=ReqContext(req_id="bench"),
        **ids,
    )


def vllm_tier_rows(
    folder: Path | None = None, blocks: int = 64, row_bytes: int = 2 * MiB, repeats: int = 5
) -> list[Row]:
    """Store and load rows of the vLLM tier (disk) beside raw writes and reads of the bytes."""
    from vllm.v1.kv_offload.base import LookupResult, make_offload_key

    from lmtier.integrations.vllm import LmtierSecondaryTier

    work = Path(tempfile.mkdtemp(prefix="lmtier-bench-vllm-", dir=folder))
    rows = np.random.default_rng(0).integers(-128, 128, (blocks, row_bytes), dtype=np.int8)
    budget_gb = (repeats + 2) * blocks * row_bytes / 1024**3 * 1.5
    config = {"tiers": [{"name": "disk", "kind": "disk", "path": str(work / "tier"),
                         "max_size_gb": budget_gb}]}  # fmt: skip
    view = memoryview(rows.data)
    tier = LmtierSecondaryTier(_spec(row_bytes), view, "lmtier", config=config)
    tier_rows = torch.from_numpy(rows)
    raw_folder = work / "raw"
    raw_folder.mkdir()
    store_s: list[float] = []
    load_s: list[float] = []
    submit_s: list[float] = []
    lookup_s: list[float] = []
    raw_write_s: list[float] = []
    raw_read_s: list[float] = []
    alone_s: list[float] = []  # the store's own put_many of the same rows: the adapter's cost
    try:
        expected = rows.copy()
        for round_ in range(repeats):
            keys = [make_offload_key(uuid.uuid4().bytes * 2, 0) for _ in range(blocks)]
            items = [(f"alone-{round_}-{i}", tier_rows[i]) for i in range(blocks)]
            if round_ % 2:  # who writes first pays for the other's writeback: take turns
                alone_s.append(timed(functools.partial(tier.blocking.put_many, items)))
            started = time.perf_counter()
            tier.submit_store(_job(2 * round_, keys, range(blocks), promotion=False))
            submitted = time.perf_counter()
            tier.drain_jobs()
            store_s.append(time.perf_counter() - started)
            submit_s.append(submitted - started)
            assert all(r.success for r in tier.get_finished_jobs())
            if not round_ % 2:
                alone_s.append(timed(functools.partial(tier.blocking.put_many, items)))

            looked = time.perf_counter()
            assert all(tier.lookup(k, None) is LookupResult.HIT for k in keys)
            lookup_s.append(time.perf_counter() - looked)

            rows[:] = 0
            started = time.perf_counter()
            tier.submit_load(_job(2 * round_ + 1, keys, range(blocks), promotion=True))
            tier.drain_jobs()
            load_s.append(time.perf_counter() - started)
            assert all(r.success for r in tier.get_finished_jobs())
            assert np.array_equal(rows, expected)

            paths = [raw_folder / uuid.uuid4().hex for _ in range(blocks)]
            started = time.perf_counter()
            for path, row in zip(paths, rows, strict=True):
                xxhash.xxh3_64_intdigest(row)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, row)
                finally:
                    os.close(fd)
            raw_write_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            for path, row in zip(paths, rows, strict=True):
                with open(path, "rb", buffering=0) as file:
                    file.readinto(memoryview(row))
                xxhash.xxh3_64_intdigest(row)
            raw_read_s.append(time.perf_counter() - started)
    finally:
        tier.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    gbs = Scale.throughput(blocks * row_bytes)
    size = f"{blocks} x {human_bytes(row_bytes)}"
    store = Side(tuple(store_s), gbs)
    scheduler = Side(tuple(s + u for s, u in zip(submit_s, lookup_s, strict=True)), Scale.latency())
    submit, lookup = Side(tuple(submit_s), Scale.latency()), Side(tuple(lookup_s), Scale.latency())
    return [
        Row(f"vllm tier store job {size} (disk)", store,
            Side(tuple(raw_write_s), gbs, "raw write+xxh3"), Goal.ratio(0.8)),
        Row(f"vllm tier store job {size} vs the store's put_many", store,
            Side(tuple(alone_s), gbs, "put_many"), Goal.ratio(0.9)),
        Row(f"vllm tier load job {size} (disk, checksum)", Side(tuple(load_s), gbs),
            Side(tuple(raw_read_s), gbs, "raw read+xxh3"), Goal.ratio(0.8)),
        Row(f"vllm scheduler thread per job (submit + {blocks} lookups)", scheduler,
            goal=Goal.figure_at_most(1000, "<= 1000 us"),
            detail=f"submit {submit.text()}, lookups {lookup.text()}"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmtier.cli.bench.vllm", description=__doc__)
    parser.add_argument("--folder", type=Path, default=None, help="where the disk rows write")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--row-mib", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = vllm_tier_rows(args.folder, args.blocks, args.row_mib * MiB, args.repeats)
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
