"""The ``lmtier`` command: stress, replay and inspect."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from lmtier.admission import ADMISSION_POLICIES
from lmtier.argtypes import float_list, name_list, positive_int
from lmtier.bench import BenchOptions, Row, format_rows, run_bench
from lmtier.config import load_config
from lmtier.errors import LmtierError
from lmtier.evictor import evictor_names
from lmtier.inspect import inspect_path
from lmtier.replay.report import check_plotting, format_table, write_csv, write_plot
from lmtier.replay.sweep import ReplayOptions, run_sweep
from lmtier.replay.synthetic import SYNTHETIC_PREFIX, SyntheticSpec, parse_synthetic
from lmtier.replay.traces import FORMATS, WINDOWS, parse_part, trace_stats
from lmtier.replay.workloads import load_trace
from lmtier.store import TieredStore
from lmtier.stress import (
    StressOptions,
    default_stress_config,
    format_report,
    run_shared_stress,
    run_stress,
    shared_stress_config,
    with_policy,
)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmtier", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_stress(commands)
    _add_replay(commands)
    _add_inspect(commands)
    _add_bench(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    args.progress = not args.no_progress and sys.stderr.isatty()
    try:
        return int(args.run(args))
    except (LmtierError, ValueError) as exc:
        print(f"lmtier: error: {exc}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------- stress
def _add_stress(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stress = commands.add_parser(
        "stress",
        help="overfill every tier from concurrent tasks and verify every entry bit-exact",
        description="Without --config: a small gpu -> cpu -> disk cascade (gpu skipped "
        "without CUDA) with its disk tier in a temporary folder, removed afterwards.",
    )
    defaults = StressOptions()
    stress.add_argument("--config", type=Path, help="a store config YAML (default: embedded)")
    stress.add_argument("--tasks", type=positive_int, default=defaults.tasks, help="concurrency")
    stress.add_argument("--ops", type=positive_int, default=defaults.ops)
    stress.add_argument("--duration", type=float, help="stop after this many seconds")
    stress.add_argument("--keys-per-task", type=positive_int, default=defaults.keys_per_task)
    stress.add_argument("--min-tokens", type=positive_int, default=defaults.min_tokens)
    stress.add_argument("--max-tokens", type=positive_int, default=defaults.max_tokens)
    stress.add_argument(
        "--size-dist", choices=("uniform", "lognormal"), default=defaults.size_distribution
    )
    stress.add_argument("--get-fraction", type=float, default=defaults.get_fraction)
    stress.add_argument("--delete-fraction", type=float, default=defaults.delete_fraction)
    stress.add_argument("--seed", type=int, default=defaults.seed)
    stress.add_argument(
        "--policy", choices=evictor_names(), help="every tier's evictor (default: as configured)"
    )
    stress.add_argument(
        "--admission",
        choices=ADMISSION_POLICIES,
        help="the admission policy of every tier below the first (default: as configured)",
    )
    stress.add_argument(
        "--shared-keys",
        action="store_true",
        help="all tasks share one key space of --keys-per-task keys: they overwrite and delete "
        "each other's entries and give up on --cancel-fraction of their calls",
    )
    stress.add_argument("--cancel-fraction", type=float, default=defaults.cancel_fraction)
    stress.add_argument(
        "--rounds",
        type=positive_int,
        default=defaults.rounds,
        help="--shared-keys: quiet points where every key is read back",
    )
    stress.add_argument("--no-progress", action="store_true")
    stress.set_defaults(run=_run_stress)


def _run_stress(args: argparse.Namespace) -> int:
    options = StressOptions(
        tasks=args.tasks,
        ops=args.ops,
        keys_per_task=args.keys_per_task,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        seed=args.seed,
        get_fraction=args.get_fraction,
        delete_fraction=args.delete_fraction,
        size_distribution=args.size_dist,
        duration_s=args.duration,
        progress=args.progress,
        shared_keys=args.shared_keys,
        cancel_fraction=args.cancel_fraction,
        rounds=args.rounds,
    )
    return asyncio.run(_stress(args.config, options, args.policy, args.admission))


async def _stress(
    config_path: Path | None,
    options: StressOptions,
    policy: str | None = None,
    admission: str | None = None,
) -> int:
    with tempfile.TemporaryDirectory(prefix="lmtier-stress-") as folder:
        embedded = shared_stress_config if options.shared_keys else default_stress_config
        config = load_config(config_path) if config_path else embedded(Path(folder))
        config = with_policy(config, policy, admission)
        async with TieredStore(config) as store:
            print(
                "stress: "
                + " -> ".join(f"{t.name} ({t.budget / 2**20:g} MiB)" for t in store.tiers)
                + (f"; evictor {policy}" if policy else "")
                + (f"; admission {admission} below the first tier" if admission else "")
                + f"; {options.tasks} tasks, {options.ops} ops"
                + (", shared keys" if options.shared_keys else ""),
                flush=True,
            )
            run = run_shared_stress if options.shared_keys else run_stress
            report = await run(store, options)
        print(format_report(report))
    return 0 if report.ok else 1


# ---------------------------------------------------------------------- replay
def _add_replay(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay",
        help="replay a request trace through the tiers; hit ratios beside OPT and the ceiling",
        description="Each request looks up its blocks in order: a hit is read (and promoted), "
        "a miss is put. Sizes-only mode runs the same evictors and cascade without data; "
        "--real puts real tensors through a real store (memory tiers over a disk tier in a "
        "temporary folder, or --config's tiers) and checks every hit's bytes.",
    )
    defaults = ReplayOptions()
    replay.add_argument(
        "trace", help="a JSONL trace, or synthetic:zipf (a generated multi-turn chat workload)"
    )
    replay.add_argument("--format", choices=sorted(FORMATS), help="default: detected")
    replay.add_argument("--limit", type=positive_int, help="replay only the first N requests")
    window = replay.add_mutually_exclusive_group()
    window.add_argument(
        "--part", type=_part, metavar="K/N",
        help="replay only the K-th of N consecutive slices of the requests (after --limit), "
        "cold: e.g. 2/2 is the second half",
    )  # fmt: skip
    window.add_argument(
        "--window",
        choices=sorted(WINDOWS),
        help="a named part: first-half (1/2), second-half (2/2)",
    )
    synthetic = replay.add_argument_group("synthetic:zipf parameters")
    spec = SyntheticSpec()
    synthetic.add_argument("--requests", type=positive_int, help=f"default {spec.requests}")
    synthetic.add_argument(
        "--sessions", type=positive_int, help=f"users, Zipf-popular (default {spec.sessions})"
    )
    synthetic.add_argument(
        "--zipf-alpha", type=float, help=f"Zipf exponent of users (default {spec.alpha})"
    )
    synthetic.add_argument("--seed", type=int, help=f"default {spec.seed}")
    replay.add_argument("--real", action="store_true", help="real tensors through a real store")
    replay.add_argument(
        "--capacities", type=float_list, default=defaults.capacities,
        help="total capacities as fractions of the trace's distinct blocks (default: %(default)s)",
    )  # fmt: skip
    replay.add_argument(
        "--split", type=float_list, default=defaults.shares,
        help="how a capacity divides among tiers, fastest first, e.g. 1,4,16 (default: one tier)",
    )  # fmt: skip
    replay.add_argument("--policies", type=name_list, default=defaults.policies, help="e.g. lru")
    replay.add_argument(
        "--bytes-per-token", type=positive_int,
        help=f"KV bytes per token (sizes-only default {defaults.bytes_per_token}, an 8B model "
        "in bf16; --real default 16, to fit in memory)",
    )  # fmt: skip
    replay.add_argument("--config", type=Path, help="--real: tier kinds from this config")
    replay.add_argument("--no-promote", action="store_true", help="lower hits stay where they are")
    replay.add_argument(
        "--admission", type=name_list, default=defaults.admission,
        help="admission policies, comma-separated: POLICY for the last tier or TIER=POLICY "
        "(all, second_hit; default: every tier admits all)",
    )  # fmt: skip
    replay.add_argument(
        "--admission-window", type=positive_int,
        help="second_hit's memory in entries (default: 4x the tier's capacity)",
    )  # fmt: skip
    replay.add_argument("--csv", type=Path, help="write the results here")
    replay.add_argument("--plot", type=Path, help="plot hit ratio vs capacity (needs matplotlib)")
    replay.add_argument("--no-progress", action="store_true")
    replay.set_defaults(run=_run_replay)


def _run_replay(args: argparse.Namespace) -> int:
    if args.plot:
        check_plotting()
    part = WINDOWS[args.window] if args.window else args.part
    synthetic = None
    if args.trace.startswith(SYNTHETIC_PREFIX):
        synthetic = parse_synthetic(
            args.trace, requests=args.requests, sessions=args.sessions, alpha=args.zipf_alpha,
            seed=args.seed,
        )  # fmt: skip
    elif any(v is not None for v in (args.requests, args.sessions, args.zipf_alpha, args.seed)):
        raise LmtierError("--requests, --sessions, --zipf-alpha and --seed are for synthetic:zipf")
    trace = load_trace(args.trace, args.format, args.limit, part, synthetic)
    default_bytes = 16 if args.real else ReplayOptions().bytes_per_token
    options = ReplayOptions(
        capacities=args.capacities,
        policies=args.policies,
        shares=args.split,
        bytes_per_token=args.bytes_per_token or default_bytes,
        real=args.real,
        promote_on_hit=not args.no_promote,
        config=args.config,
        progress=args.progress,
        admission=args.admission,
        admission_window=args.admission_window,
    )
    where = f" part {part[0]}/{part[1]}" if part else ""
    print(
        f"{args.trace}{where}: {trace.format}, {trace_stats(trace).describe()}; blocks of "
        f"{trace.block_tokens} tokens ({options.bytes_per_token * trace.block_tokens:,} bytes); "
        f"{'real' if options.real else 'sizes-only'} mode",
        flush=True,
    )
    sweep = run_sweep(trace, options)
    print(format_table(sweep.results, sweep.optimum))
    if args.csv:
        write_csv(args.csv, sweep.results, sweep.optimum)
    if args.plot:
        write_plot(args.plot, sweep.results, sweep.optimum)
    wrong = sum(result.wrong for result in sweep.results)
    if wrong:
        print(f"FAILED: {wrong} hit(s) returned bytes that were not the block's")
    return 1 if wrong else 0


# ---------------------------------------------------------------------- inspect
def _add_inspect(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="verify every file of a disk tier's folder (header and checksum)",
        description="PATH is a disk tier's configured path (or one of its ns-* folders). "
        "Lists entries, bytes, corrupt or foreign files and leftover temporary files; "
        "exits 1 while any remain.",
    )
    inspect.add_argument("path", type=Path)
    inspect.add_argument("--repair", action="store_true", help="remove corrupt and temporary files")
    inspect.add_argument("--no-progress", action="store_true")
    inspect.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    reports = inspect_path(args.path, repair=args.repair, progress=args.progress)
    if not reports:
        print(f"{args.path}: no disk tier folder (ns-*) here")
        return 0
    for report in reports:
        scan = report.scan
        names = ", ".join(repr(n) for n in sorted(report.namespaces)) or "-"
        print(
            f"{report.folder}: {report.entries} entries, {report.payload_bytes:,} bytes "
            f"(namespace {names}); {len(scan.corrupt)} corrupt, "
            f"{len(report.foreign)} of another namespace, {len(scan.left_alone)} left alone, "
            f"{len(scan.temp_files)} temporary"
        )
        for bad, why in scan.corrupt:
            print(f"  corrupt  {bad}: {why}")
        for entry in report.foreign:
            print(f"  foreign  {entry.meta.path}: namespace {entry.namespace!r}")
        for other, why in scan.left_alone:
            print(f"  skipped  {other}: {why}")
        for temp in scan.temp_files:
            print(f"  temp     {temp}")
        if args.repair:
            print(f"  repaired: removed {report.removed} file(s)")
            for bad, why in report.failed:
                print(f"  could not remove {bad}: {why}")
    return 1 if any(report.problems for report in reports) else 0


# ---------------------------------------------------------------------- bench
def _add_bench(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench",
        help="data paths beside raw baselines measured in the same run, as ratios",
        description="Medians of several repetitions with their spread (min-max); each ratio is "
        "baseline time / lmtier time, measured side by side (1.0: as fast as the raw "
        "operation), with PASS or FAIL against its goal.",
    )
    bench.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    bench.add_argument(
        "--folder",
        type=Path,
        help="where disk rows write: a real disk, not tmpfs (default: the temp folder)",
    )
    bench.add_argument("--fsync", action="store_true", help="disk rows with durability fsync")
    bench.add_argument(
        "--restart-entries", type=positive_int, default=BenchOptions().restart_entries
    )
    bench.add_argument(
        "--repeat",
        type=positive_int,
        default=1,
        metavar="N",
        help="run the whole table N times; each row's ratio as the median and range of the runs",
    )
    bench.add_argument(
        "--peers",
        action="store_true",
        help="also LMCache 0.5.6's local backends (install: scripts/install_peers.sh)",
    )
    bench.add_argument(
        "--redis", metavar="URL", help="redis rows on this server (default: a local redis-server)"
    )
    bench.add_argument(
        "--vllm",
        action="store_true",
        help="also the vLLM tier's store and load jobs (needs vLLM: scripts/install_engines.sh)",
    )
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    # The bench package's helpers beyond its table, loaded with the command that uses them.
    from lmtier.bench.machine import LoadWatch, folder_warning, spread_warning
    from lmtier.bench.repeat import format_repeated, repeated

    options = BenchOptions(
        args.quick, args.folder, args.fsync, args.restart_entries, args.peers, args.redis, args.vllm
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    runs = f", {args.repeat} runs" if args.repeat > 1 else ""
    print(
        f"lmtier bench: torch {torch.__version__}, {os.cpu_count()} CPUs, {device}; "
        f"medians of {options.repeats}{runs}",
        flush=True,
    )
    on_tmpfs = folder_warning(args.folder or Path(tempfile.gettempdir()))
    if on_tmpfs:
        print(on_tmpfs, flush=True)
    load = LoadWatch()

    def progress(row: Row) -> None:
        if args.progress:
            print(f"  measured {row.name}", file=sys.stderr, flush=True)

    tables = []
    for run in range(args.repeat):
        if args.progress and args.repeat > 1:
            print(f"run {run + 1} of {args.repeat}", file=sys.stderr, flush=True)
        tables.append(run_bench(options, progress))
        load.sample(f"end of run {run + 1}" if args.repeat > 1 else "end")
    if args.repeat == 1:
        rows = tables[0]
        print(format_rows(rows))
    else:
        summaries = repeated(tables)
        rows = [summary.row for summary in summaries]
        print(format_repeated(summaries))
    # Repeated after the table, where a reader of its figures looks.
    for warning in (on_tmpfs, load.warning(), spread_warning(rows)):
        if warning:
            print(warning)
    return 0


# ---------------------------------------------------------------------- argument types
def _part(text: str) -> tuple[int, int]:
    try:
        return parse_part(text)
    except LmtierError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    raise SystemExit(main())
