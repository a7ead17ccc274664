"""Rows for lmtier's vLLM secondary tier (``lmtier bench --vllm``,
``python -m lmtier.cli.bench.vllm``).

One job of ``blocks`` primary-tier rows (default 64 rows of 2 MiB) stored into and loaded back
from a disk tier through ``LmtierSecondaryTier``, against raw ``os.write`` / ``readinto`` of the
same bytes to new files with an xxh3-64 checksum of each (lmtier checksums every entry), and
the time the scheduler thread spends per job: ``submit_store`` plus one ``lookup`` per block.

Each job runs twice over: with the store in the engine's process, and through ``lmtier serve``
(the tier's ``server`` line; the rows then live in a shared-memory file, as vLLM keeps them).
While a job runs, the scheduler thread polls ``get_finished_jobs`` and sleeps 0.5 ms between
polls (an engine waiting on its device), and a stall probe (``lmtier.cli.bench.stall``) sleeps
1 ms in a loop: its p99 lateness is how long lmtier held the engine's interpreter, beside the
probe's p99 over the same time with no job in flight.  ``--pin-server`` gives the server a core
of its own (its threads on the last CPU, this process on the others, as ``taskset`` or
systemd's ``CPUAffinity`` would): what the probe then sees is the engine's process alone, not
the scheduler's sharing of too few cores between it and the server.

vLLM is imported lazily: this module imports without it, ``vllm_tier_rows`` needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import mmap
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import xxhash

from lmtier.cli.bench.core import Goal, MiB, Row, Scale, Side, format_rows, timed
from lmtier.cli.bench.stall import StallProbe, quantiles_ms
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


def _shared_rows(blocks: int, row_bytes: int) -> tuple[np.ndarray, int]:
    """Rows in a shared-memory file, as vLLM keeps its CPU tier's (created, mapped, unlinked);
    the array and the file's descriptor."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = Path(folder) / f"lmtier-bench-rows-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    path.unlink()
    os.ftruncate(fd, blocks * row_bytes)
    memory = mmap.mmap(fd, blocks * row_bytes)
    return np.frombuffer(memory, dtype=np.int8).reshape(blocks, row_bytes), fd


def _run_job(tier: Any, job: Any, load: bool) -> tuple[float, float, list[float]]:
    """Submit ``job`` and poll until it ends, as a scheduler waiting on its device: the job's
    seconds, the submit's, and the stall probe's lateness meanwhile."""
    with StallProbe() as probe:
        started = time.perf_counter()
        (tier.submit_load if load else tier.submit_store)(job)
        submitted = time.perf_counter()
        results = list(tier.get_finished_jobs())
        while not results:
            time.sleep(0.0005)
            results = list(tier.get_finished_jobs())
        ended = time.perf_counter()
    assert [r.success for r in results] == [True], results
    return ended - started, submitted - started, probe.lateness


def _idle_lateness(seconds: float) -> list[float]:
    """The probe's lateness over ``seconds`` of the same polling with no job in flight."""
    with StallProbe() as probe:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            time.sleep(0.0005)
    return probe.lateness


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` on ``cpus`` (threads it starts later inherit them)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task.name), cpus)


@contextlib.contextmanager
def _own_core(server: int, pin: bool) -> Iterator[str]:
    """With ``pin``, the server on the last CPU and this process on the others meanwhile; the
    rows' label for it."""
    cpus = os.sched_getaffinity(0)
    if not pin or len(cpus) < 2:
        yield ""
        return
    last = max(cpus)
    _pin(server, {last})
    _pin(os.getpid(), cpus - {last})
    try:
        yield ", on its own core"
    finally:
        _pin(os.getpid(), cpus)


def vllm_tier_rows(
    folder: Path | None = None,
    blocks: int = 64,
    row_bytes: int = 2 * MiB,
    repeats: int = 5,
    pin_server: bool = False,
) -> list[Row]:
    """The rows of the vLLM tier in process and through ``lmtier serve``."""
    from lmtier.server.launch import ensure_server

    work = Path(tempfile.mkdtemp(prefix="lmtier-bench-vllm-", dir=folder))
    budget_gb = (repeats + 2) * blocks * row_bytes / 1024**3 * 1.5
    config = {"tiers": [{"name": "disk", "kind": "disk", "path": str(work / "tier"),
                         "max_size_gb": budget_gb}]}  # fmt: skip
    try:
        rows = np.random.default_rng(0).integers(-128, 128, (blocks, row_bytes), dtype=np.int8)
        found = _tier_rows(rows, {"config": config}, work, repeats, "")
        served = config | {"tiers": [{**config["tiers"][0], "path": str(work / "served")}]}
        config_path = work / "server.yaml"
        config_path.write_text(json.dumps(served))
        # A short path: a Unix socket's is limited to 107 bytes.
        socket_folder = Path(tempfile.mkdtemp(prefix="lmtier-bench-"))
        socket = socket_folder / "s.sock"
        pid = ensure_server(socket, config_path)
        shared, fd = _shared_rows(blocks, row_bytes)
        try:
            shared[:] = rows
            tier = {"server": str(socket)}
            with _own_core(pid, pin_server) as where:
                return found + _tier_rows(shared, tier, work, repeats, f" (lmtier serve{where})")
        finally:
            os.close(fd)
            os.kill(pid, signal.SIGTERM)
            shutil.rmtree(socket_folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tier_rows(
    rows: np.ndarray, tier_config: dict[str, Any], work: Path, repeats: int, label: str
) -> list[Row]:
    """Store and load jobs of one tier over ``rows``, beside raw writes and reads of them."""
    from vllm.v1.kv_offload.base import LookupResult, make_offload_key

    from lmtier.integrations.vllm import LmtierSecondaryTier

    blocks, row_bytes = rows.shape
    view = rows.data
    tier = LmtierSecondaryTier(_spec(row_bytes), view, "lmtier", **tier_config)
    in_process = "config" in tier_config
    tier_rows = torch.from_numpy(rows)
    raw_folder = work / ("raw-served" if label else "raw")
    raw_folder.mkdir()
    store_s: list[float] = []
    load_s: list[float] = []
    submit_s: list[float] = []
    lookup_s: list[float] = []
    raw_write_s: list[float] = []
    raw_read_s: list[float] = []
    alone_s: list[float] = []  # the store's own put_many of the same rows: the adapter's cost
    stall_p99: list[float] = []  # per round, while its store and load jobs ran
    idle_p99: list[float] = []  # per round, the same polling with nothing in flight
    try:
        expected = rows.copy()
        for round_ in range(repeats):
            keys = [make_offload_key(uuid.uuid4().bytes * 2, 0) for _ in range(blocks)]
            items = [(f"alone-{round_}-{i}", tier_rows[i]) for i in range(blocks)]
            if in_process and round_ % 2:  # who writes first pays for the other's writeback
                alone_s.append(timed(functools.partial(tier.blocking.put_many, items)))
            store = _job(2 * round_, keys, range(blocks), promotion=False)
            took, submitted, late = _run_job(tier, store, load=False)
            store_s.append(took)
            submit_s.append(submitted)
            if in_process and not round_ % 2:
                alone_s.append(timed(functools.partial(tier.blocking.put_many, items)))

            looked = time.perf_counter()
            assert all(tier.lookup(k, None) is LookupResult.HIT for k in keys)
            lookup_s.append(time.perf_counter() - looked)

            rows[:] = 0
            load = _job(2 * round_ + 1, keys, range(blocks), promotion=True)
            took, _, late_loading = _run_job(tier, load, load=True)
            load_s.append(took)
            # Row by row: a whole-array compare allocates and frees a temporary as large as the
            # job, whose freed pages would make the raw writes below cheaper than the tier's.
            assert all(np.array_equal(got, want) for got, want in zip(rows, expected, strict=True))
            stall_p99.append(quantiles_ms(late + late_loading)["p99_ms"] / 1000)
            idle_p99.append(quantiles_ms(_idle_lateness(store_s[-1] + took))["p99_ms"] / 1000)

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
        shutil.rmtree(raw_folder, ignore_errors=True)

    gbs = Scale.throughput(blocks * row_bytes)
    milliseconds = Scale(lambda s: s * 1e3, "ms", ".2f")
    size = f"{blocks} x {human_bytes(row_bytes)}"
    store = Side(tuple(store_s), gbs)
    scheduler = Side(tuple(s + u for s, u in zip(submit_s, lookup_s, strict=True)), Scale.latency())
    submit, lookup = Side(tuple(submit_s), Scale.latency()), Side(tuple(lookup_s), Scale.latency())
    made = [
        Row(f"vllm tier{label} store job {size} (disk)", store,
            Side(tuple(raw_write_s), gbs, "raw write+xxh3"), Goal.ratio(0.8)),
        Row(f"vllm tier{label} load job {size} (disk, checksum)", Side(tuple(load_s), gbs),
            Side(tuple(raw_read_s), gbs, "raw read+xxh3"), Goal.ratio(0.8)),
        Row(f"vllm scheduler thread{label} per job (submit + {blocks} lookups)", scheduler,
            goal=Goal.figure_at_most(1000, "<= 1000 us"),
            detail=f"submit {submit.text()}, lookups {lookup.text()}"),
        Row(f"vllm engine-thread stall p99{label} during the jobs", Side(tuple(stall_p99),
            milliseconds), Side(tuple(idle_p99), milliseconds, "no job"),
            Goal.figure_at_most(1.0, "<= 1 ms")),
    ]  # fmt: skip
    if in_process:
        made.insert(1, Row(f"vllm tier store job {size} vs the store's put_many", store,
                           Side(tuple(alone_s), gbs, "put_many"), Goal.ratio(0.9)))  # fmt: skip
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmtier.cli.bench.vllm", description=__doc__)
    parser.add_argument("--folder", type=Path, default=None, help="where the disk rows write")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--row-mib", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--pin-server", action="store_true", help="give lmtier serve a core of its own"
    )
    args = parser.parse_args(argv)
    rows = vllm_tier_rows(
        args.folder, args.blocks, args.row_mib * MiB, args.repeats, args.pin_server
    )
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
