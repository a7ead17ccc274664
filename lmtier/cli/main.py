"""The ``lmtier`` command: stress, replay, inspect and bench."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

import lmtier
from lmtier.cli.argtypes import float_list, name_list, output_path, positive_int, user_path
from lmtier.cli.bench import BenchOptions, Row, format_rows, run_bench
from lmtier.cli.inspect import inspect_path
from lmtier.cli.replay.report import check_plotting, format_table, write_csv, write_plot
from lmtier.cli.replay.sweep import ReplayOptions, SweepResult, run_sweep
from lmtier.cli.replay.synthetic import SYNTHETIC_PREFIX, SyntheticSpec, parse_synthetic
from lmtier.cli.replay.traces import FORMATS, WINDOWS, parse_part, trace_stats
from lmtier.cli.replay.workloads import load_trace
from lmtier.cli.stress.command import INTERRUPTED, add_stress
from lmtier.errors import LmtierError

__all__ = ["build_parser", "main", "package_version"]

# A missing command is a usage error, as argparse reports every other one.
USAGE_ERROR = 2
_VERBOSE_HELP = "log at INFO level (before or after the command)"


def package_version() -> str:
    """The installed distribution's version, else the package's own ``__version__``."""
    try:
        return importlib.metadata.version("lmtier")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(lmtier, "__version__", "unknown"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmtier", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {package_version()}",
        help="print the version and exit",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_stress(commands)
    _add_replay(commands)
    _add_inspect(commands)
    _add_bench(commands)
    for command in commands.choices.values():
        # SUPPRESS: a command that was not given -v keeps what came before it.
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    args.progress = not args.no_progress and sys.stderr.isatty()
    try:
        return int(args.run(args))
    except (LmtierError, ValueError) as exc:
        print(f"lmtier: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:  # commands without partial results of their own to print
        print("lmtier: interrupted", file=sys.stderr)
        return INTERRUPTED


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
        "trace", type=user_path,
        help="a JSONL trace, or a generated workload: synthetic:zipf (multi-turn chat) or "
        "synthetic:shared-prompt (long shared system prompts, short sessions)",
    )  # fmt: skip
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
    synthetic = replay.add_argument_group("synthetic:zipf and synthetic:shared-prompt parameters")
    spec = SyntheticSpec()
    synthetic.add_argument(
        "--requests", type=positive_int, help=f"requests to generate (default {spec.requests})"
    )
    synthetic.add_argument(
        "--sessions", type=positive_int, help=f"users, Zipf-popular (default {spec.sessions})"
    )
    synthetic.add_argument(
        "--zipf-alpha", type=float, help=f"Zipf exponent of users (default {spec.alpha})"
    )
    synthetic.add_argument("--seed", type=int, help=f"random seed (default {spec.seed})")
    replay.add_argument("--real", action="store_true", help="real tensors through a real store")
    replay.add_argument(
        "--capacities", type=float_list, default=defaults.capacities,
        help="total capacities as fractions of the trace's distinct blocks (default: %(default)s)",
    )  # fmt: skip
    replay.add_argument(
        "--split", type=float_list, default=defaults.shares,
        help="how a capacity divides among tiers, fastest first, e.g. 1,4,16 (default: one tier)",
    )  # fmt: skip
    replay.add_argument(
        "--policies", type=name_list, default=defaults.policies,
        help="evictors to compare, comma-separated; each one name for every tier or one per "
        "tier, fastest first, e.g. lru,prefix,lru/prefix (default: lru)",
    )  # fmt: skip
    replay.add_argument(
        "--bytes-per-token", type=positive_int,
        help=f"KV bytes per token (sizes-only default {defaults.bytes_per_token}, an 8B model "
        "in bf16; --real default 16, to fit in memory)",
    )  # fmt: skip
    replay.add_argument("--config", type=user_path, help="--real: tier kinds from this config")
    replay.add_argument("--no-promote", action="store_true", help="lower hits stay where they are")
    replay.add_argument(
        "--no-positions", action="store_true",
        help="put blocks without their index in the request's chain, as the vLLM and SGLang "
        "integrations put them (the prefix evictor then ranks every block as a first one)",
    )  # fmt: skip
    replay.add_argument(
        "--admission", type=name_list, default=defaults.admission,
        help="admission policies, comma-separated: POLICY for the last tier or TIER=POLICY "
        "(all, second_hit; default: every tier admits all)",
    )  # fmt: skip
    replay.add_argument(
        "--admission-window", type=positive_int,
        help="second_hit's memory in entries (default: 4x the tier's capacity)",
    )  # fmt: skip
    replay.add_argument("--csv", type=output_path, help="write the results here (a CSV file)")
    replay.add_argument(
        "--plot", type=output_path, help="plot hit ratio vs capacity to this PNG (needs matplotlib)"
    )
    replay.add_argument(
        "--no-progress", action="store_true", help="no progress bars (shown on a terminal)"
    )
    replay.set_defaults(run=_run_replay)


def _run_replay(args: argparse.Namespace) -> int:
    if args.plot:
        check_plotting()
    part = WINDOWS[args.window] if args.window else args.part
    synthetic = None
    source = str(args.trace)
    if source.startswith(SYNTHETIC_PREFIX):
        synthetic = parse_synthetic(
            source, requests=args.requests, sessions=args.sessions, alpha=args.zipf_alpha,
            seed=args.seed,
        )  # fmt: skip
    elif any(v is not None for v in (args.requests, args.sessions, args.zipf_alpha, args.seed)):
        raise LmtierError(
            "--requests, --sessions, --zipf-alpha and --seed are for synthetic:zipf and "
            "synthetic:shared-prompt"
        )
    trace = load_trace(source, args.format, args.limit, part, synthetic)
    default_bytes = 16 if args.real else ReplayOptions().bytes_per_token
    options = ReplayOptions(
        capacities=args.capacities,
        policies=args.policies,
        shares=args.split,
        bytes_per_token=args.bytes_per_token or default_bytes,
        real=args.real,
        promote_on_hit=not args.no_promote,
        positions=not args.no_positions,
        config=args.config,
        progress=args.progress,
        admission=args.admission,
        admission_window=args.admission_window,
    )
    where = f" part {part[0]}/{part[1]}" if part else ""
    print(
        f"{source}{where}: {trace.format}, {trace_stats(trace).describe()}; blocks of "
        f"{trace.block_tokens} tokens ({options.bytes_per_token * trace.block_tokens:,} bytes); "
        f"{'real' if options.real else 'sizes-only'} mode",
        flush=True,
    )

    def skipped(reason: str) -> None:
        print(f"lmtier: warning: skipped: {reason}", file=sys.stderr, flush=True)

    sweep = SweepResult(trace, options.bytes_per_token * trace.block_tokens, [], {})
    try:
        run_sweep(trace, options, on_skip=skipped, sweep=sweep)
    except KeyboardInterrupt:
        # A real replay's store closed and its temporary folder went as asyncio.run unwound.
        print(format_table(sweep.results, sweep.optimum))
        references = sum(result.references for result in sweep.results)
        print(f"interrupted after {references} ops (block references); the last row is partial")
        return INTERRUPTED
    print(format_table(sweep.results, sweep.optimum))
    for path, write in ((args.csv, write_csv), (args.plot, write_plot)):
        if path is not None:
            try:
                write(path, sweep.results, sweep.optimum)
            except OSError as exc:
                raise LmtierError(f"cannot write {path}: {exc.strerror or exc}") from exc
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
    inspect.add_argument(
        "path", type=user_path, help="a disk tier's folder, or one of its ns-* folders"
    )
    inspect.add_argument("--repair", action="store_true", help="remove corrupt and temporary files")
    inspect.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown on a terminal)"
    )
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
        type=user_path,
        help="where disk rows write: a real disk, not tmpfs (default: the temp folder)",
    )
    bench.add_argument("--fsync", action="store_true", help="disk rows with durability fsync")
    bench.add_argument(
        "--restart-entries",
        type=positive_int,
        default=BenchOptions().restart_entries,
        help="entries the restart row indexes (default: %(default)s)",
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
    bench.add_argument(
        "--gpu-only",
        action="store_true",
        help="only the GPU rows: the GPU tier and the batched GPU<->pinned CPU path "
        "(needs CUDA; scripts/gpu_check.sh runs it)",
    )
    bench.add_argument(
        "--no-progress", action="store_true", help="no progress bars (shown on a terminal)"
    )
    bench.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    # The bench package's helpers beyond its table, loaded with the command that uses them.
    from lmtier.cli.bench.machine import LoadWatch, folder_warning, spread_warning
    from lmtier.cli.bench.repeat import format_repeated, repeated

    options = BenchOptions(
        args.quick,
        args.folder,
        args.fsync,
        args.restart_entries,
        args.peers,
        args.redis,
        args.vllm,
        args.gpu_only,
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
