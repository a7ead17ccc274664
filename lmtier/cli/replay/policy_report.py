"""The policy report: every registered evictor, capacity and workload, beside OPT and the
ceiling, plus second_hit admission on the disk of a cpu → disk split; markdown, CSV and a plot.

``python scripts/policy_report.py`` writes ``docs/policies.md``, ``docs/policies.csv`` and
``docs/policies.png``.  Every replay is sizes-only (the store's decisions, no data), so the
whole report is a few minutes of CPU; independent replays run in worker processes.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lmtier.cli.argtypes import (
    float_list,
    name_list,
    non_negative_float_list,
    positive_int,
    user_path,
)
from lmtier.cli.replay.capacity import capacity_problem
from lmtier.cli.replay.policy_pages import write_report
from lmtier.cli.replay.run import capacity_blocks, optimum, replay_sizes_only, split_capacity
from lmtier.cli.replay.sweep import DEFAULT_BYTES_PER_TOKEN
from lmtier.cli.replay.synthetic import SyntheticSpec
from lmtier.cli.replay.traces import Trace, TraceStats, trace_stats
from lmtier.cli.replay.workloads import Workload
from lmtier.errors import ConfigError
from lmtier.evictor.registry import evictor_names

__all__ = [
    "ReportOptions",
    "ReportResult",
    "Row",
    "default_workloads",
    "main",
    "run_report",
]

DEFAULT_TRACE = Path(__file__).resolve().parents[3] / "tests" / "data" / "conversation_trace.jsonl"


@dataclass(frozen=True)
class ReportOptions:
    """What the report replays: the trace (its halves and the generator derive from it)."""

    trace: Path = DEFAULT_TRACE
    policies: tuple[str, ...] = ()  # default: every registered evictor
    capacities: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25)
    admission_capacities: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25)
    admission_split: tuple[float, float] = (1.0, 4.0)  # cpu : disk
    limit: int | None = None  # the first requests of the trace only (a quick run)
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN
    jobs: int = 1
    progress: bool = False


@dataclass(frozen=True)
class Row:
    """One replay (or OPT) of one workload at one capacity."""

    workload: str
    policy: str  # an evictor's name, or "OPT"
    fraction: float
    admission: str = ""  # "" for one tier; "all" or "second_hit" on the disk of the split
    block_hit: float = math.nan
    prefix_hit: float = math.nan
    ceiling: float = math.nan
    disk_bytes_written: int = 0
    disk_rejects: int = 0
    drops: int = 0


@dataclass
class ReportResult:
    """Every row of a report run, with the workloads' statistics and the time it took."""

    options: ReportOptions
    policies: tuple[str, ...]
    workloads: list[Workload]
    stats: dict[str, TraceStats]
    rows: list[Row]
    seconds: float


def default_workloads(options: ReportOptions) -> list[Workload]:
    """The trace, its first and second halves (a time split), and the synthetic generator."""
    trace, limit = str(options.trace), options.limit
    return [
        Workload("conversation trace", trace, limit=limit),
        Workload("first half", trace, part=(1, 2), limit=limit),
        Workload("second half", trace, part=(2, 2), limit=limit),
        Workload("synthetic:zipf", "synthetic:zipf", limit=limit,
                 synthetic=options.synthetic),
    ]  # fmt: skip


# Worker processes read the traces from here: filled before the pool forks, never pickled.
_TRACES: dict[str, Trace] = {}


@dataclass(frozen=True)
class _Task:
    workload: str
    policy: str  # "OPT" for the optimum
    fraction: float
    admission: str
    bytes_per_token: int
    split: tuple[float, float]


def _run_task(task: _Task) -> Row:
    trace = _TRACES[task.workload]
    blocks = capacity_blocks(trace, task.fraction)
    if task.policy == "OPT":
        best, ceiling = optimum(trace, blocks)
        return Row(task.workload, "OPT", task.fraction, block_hit=best, ceiling=ceiling)
    block_bytes = task.bytes_per_token * trace.block_tokens
    if not task.admission:
        names, per_tier, admission = ["cpu"], [blocks], ["all"]
    else:
        names, per_tier = ["cpu", "disk"], split_capacity(blocks, task.split)
        admission = ["all", task.admission]
    result = replay_sizes_only(
        trace, names, [n * block_bytes for n in per_tier], task.policy, block_bytes,
        task.fraction, admission=admission,
    )  # fmt: skip
    disk = result.counters.get("disk", {})
    return Row(
        task.workload, task.policy, task.fraction, task.admission,
        result.block_hit_ratio, result.prefix_hit_ratio,
        disk_bytes_written=disk.get("bytes_in", 0), disk_rejects=disk.get("admission_rejects", 0),
        drops=sum(c["drops"] for c in result.counters.values()),
    )  # fmt: skip


def run_report(options: ReportOptions) -> ReportResult:
    """Replay every task the options name; the rows in a stable order."""
    started = time.perf_counter()
    policies = options.policies or tuple(evictor_names())
    unknown = [p for p in policies if p not in evictor_names()]
    if unknown:
        raise ConfigError(f"unknown evictor(s) {unknown}; known: {', '.join(evictor_names())}")
    workloads = default_workloads(options)
    _TRACES.clear()
    stats = {}
    for workload in workloads:
        trace = _TRACES[workload.name] = workload.load()
        stats[workload.name] = trace_stats(trace)
        # Fail now, not in a worker: every cell of the report's tables must exist.
        checks: list[tuple[float, Sequence[float]]] = [(f, (1.0,)) for f in options.capacities]
        checks += [(f, options.admission_split) for f in options.admission_capacities]
        for fraction, shares in checks:
            problem = capacity_problem(trace, fraction, shares)
            if problem is not None:
                raise ConfigError(f"{workload.name}: {problem}")
    tasks = []
    for workload in workloads:
        common = (options.bytes_per_token, options.admission_split)
        for fraction in options.capacities:
            tasks.append(_Task(workload.name, "OPT", fraction, "", *common))
            tasks += [_Task(workload.name, p, fraction, "", *common) for p in policies]
        for fraction in options.admission_capacities:
            for policy in policies:
                for admission in ("all", "second_hit"):
                    tasks.append(_Task(workload.name, policy, fraction, admission, *common))
    rows = _execute(tasks, options)
    order = {task: i for i, task in enumerate(tasks)}
    rows.sort(key=lambda row: order[_key(row, options)])
    return ReportResult(options, policies, workloads, stats, rows, time.perf_counter() - started)


def _key(row: Row, options: ReportOptions) -> _Task:
    return _Task(row.workload, row.policy, row.fraction, row.admission,
                 options.bytes_per_token, options.admission_split)  # fmt: skip


def _execute(tasks: list[_Task], options: ReportOptions) -> list[Row]:
    bar = tqdm(total=len(tasks), desc="policy report", unit="replay", disable=not options.progress)
    rows = []
    with bar:
        if options.jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            for task in tasks:
                rows.append(_run_task(task))
                bar.update()
            return rows
        # fork: the workers inherit the parsed traces instead of each parsing them again.
        pool: Executor = ProcessPoolExecutor(options.jobs, multiprocessing.get_context("fork"))
        with pool:
            # The slowest first (big traces, OPT's heap), so the tail is short.
            ordered = sorted(tasks, key=lambda t: -_TRACES[t.workload].references)
            for future in as_completed([pool.submit(_run_task, task) for task in ordered]):
                rows.append(future.result())
                bar.update()
    return rows


# ---------------------------------------------------------------------- output
#: In ``policies.md``, the line that ends the hand-written part a rerun keeps.
# ---------------------------------------------------------------------- command
def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/policy_report.py``: run the report and write it (default: ``docs/``)."""
    defaults = ReportOptions()
    parser = argparse.ArgumentParser(prog="policy_report.py", description=__doc__)
    parser.add_argument(
        "--trace", type=user_path, default=defaults.trace, help="the trace to replay"
    )
    parser.add_argument("--out", type=user_path, default=Path("docs"), help="the output folder")
    parser.add_argument("--policies", type=name_list, default=(), help="default: every registered")
    parser.add_argument("--capacities", type=float_list, default=defaults.capacities)
    parser.add_argument(
        "--admission-capacities",
        type=non_negative_float_list,
        default=defaults.admission_capacities,
        help="capacities of the cpu -> disk admission rows (0: none)",
    )
    parser.add_argument(
        "--limit", type=positive_int, help="the first N requests of each workload only"
    )
    parser.add_argument(
        "--jobs", type=int, default=min(4, os.cpu_count() or 1), help="worker processes"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    synthetic = defaults.synthetic
    options = ReportOptions(
        trace=args.trace,
        policies=args.policies,
        capacities=args.capacities,
        admission_capacities=args.admission_capacities,
        limit=args.limit,
        synthetic=synthetic,
        jobs=max(1, args.jobs),
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    result = run_report(options)
    shown = ["python scripts/policy_report.py", *(argv if argv is not None else sys.argv[1:])]
    paths = write_report(result, args.out, " ".join(shown))
    print(f"policy report: {len(result.rows)} rows in {result.seconds:.0f} s -> "
          + ", ".join(str(p) for p in paths))  # fmt: skip
    return 0
