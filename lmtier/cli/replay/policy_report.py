"""The policy report: every registered evictor, capacity and workload, beside OPT and the
ceiling, plus second_hit admission on the disk of a cpu → disk split; markdown, CSV and a plot.

``python scripts/policy_report.py`` writes ``docs/policies.md``, ``docs/policies.csv`` and
``docs/policies.png``.  Every replay is sizes-only (the store's decisions, no data), so the
whole report is a few minutes of CPU; independent replays run in worker processes.
"""

from __future__ import annotations

import argparse
import csv
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
    "write_report",
]

GiB = 1024**3
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
KEEP_MARKER = "<!-- policy_report.py keeps what is above this line and rewrites what follows -->"
_TITLE = "# Eviction policies on replayed workloads"


def write_report(result: ReportResult, folder: Path, command: str) -> list[Path]:
    """``policies.md``, ``policies.csv`` and ``policies.png`` in ``folder``; their paths.

    An existing ``policies.md`` keeps its text up to ``KEEP_MARKER`` (what people wrote: the
    default policy and why); the generated report replaces the rest.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "policies.md", folder / "policies.csv", folder / "policies.png"]
    head = _kept_head(paths[0])
    paths[0].write_text(head + format_markdown(result, command, paths[2].name))
    _write_csv(result, paths[1])
    _write_plot(result, paths[2])
    return paths


def _kept_head(path: Path) -> str:
    """The hand-written part of ``path`` through ``KEEP_MARKER``'s line; else the title."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    end = text.find(KEEP_MARKER)
    return f"{_TITLE}\n\n" if end < 0 else f"{text[: end + len(KEEP_MARKER)]}\n\n"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def format_markdown(result: ReportResult, command: str, plot_name: str) -> str:
    options = result.options
    block_mib = options.bytes_per_token * 512 / 2**20
    lines = [
        "## Every registered policy",
        "",
        f"Generated by `{command}` in {result.seconds:.0f} s "
        f"({options.jobs} worker process{'es' if options.jobs != 1 else ''}); "
        f"policies: {', '.join(result.policies)} (every registered evictor). Rerun it after "
        "adding a policy.",
        "",
        "Each request looks up its blocks in order (a hit is read, a miss is put), through the "
        "store's own evictors and cascade in sizes-only mode. Capacities are fractions of each "
        "workload's distinct blocks. Cells are **block hit ratio / prefix hit ratio** (prefix: "
        "hits before the request's first miss, what an engine can reuse). OPT is Belady's "
        "offline optimum (every block inserted; block hits), the ceiling an infinite cache's. "
        "The best policy per capacity is in bold. Each workload replays cold: the second half "
        "is the test half of a time split whose first half is where a policy would be tuned.",
        "",
        f"![block hit ratio against capacity]({plot_name})",
        "",
        "### Workloads",
        "",
        "| workload | requests | block references | distinct blocks | used once % | ceiling |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in result.workloads:
        s = result.stats[workload.name]
        lines.append(
            f"| {_describe(workload)} | {s.requests:,} | {s.references:,} | "
            f"{s.distinct_blocks:,} | {s.once_fraction * 100:.1f} | {s.ceiling:.4f} |"
        )
    for workload in result.workloads:
        lines += ["", f"### {workload.name}", ""]
        lines += _policy_table(result, workload.name)
    if options.admission_capacities:
        cpu, disk = options.admission_split
        lines += [
            "",
            "### Admission: second_hit on the disk tier",
            "",
            f"Two tiers, cpu → disk, each capacity split {cpu:g} : {disk:g}; the disk admits "
            "`all` or `second_hit` (a chunk is written when it was offered before or hit "
            "anywhere, within a ghost of 4 times the disk's capacity in entries). Written: bytes "
            f"committed to the disk ({block_mib:g} MiB blocks); rejects: demotions refused "
            "and dropped.",
        ]
        for workload in result.workloads:
            lines += ["", f"#### {workload.name}", ""]
            lines += _admission_table(result, workload.name)
    return "\n".join(lines) + "\n"


def _describe(workload: Workload) -> str:
    where = f", part {workload.part[0]}/{workload.part[1]}" if workload.part else ""
    limit = f", first {workload.limit:,} requests" if workload.limit else ""
    if workload.synthetic is not None:
        s = workload.synthetic
        return (
            f"{workload.name} (requests={s.requests}, sessions={s.sessions}, "
            f"alpha={s.alpha:g}, seed={s.seed}{limit}{where})"
        )
    return f"{workload.name} ({Path(workload.source).name}{limit}{where})"


def _policy_table(result: ReportResult, workload: str) -> list[str]:
    fractions = result.options.capacities
    rows = [r for r in result.rows if r.workload == workload and not r.admission]
    cell = {(r.policy, r.fraction): r for r in rows}
    best = {
        f: max((cell[p, f].block_hit for p in result.policies), default=math.nan) for f in fractions
    }
    lines = [
        "| policy | " + " | ".join(_percent(f) for f in fractions) + " |",
        "| --- | " + " | ".join("---:" for _ in fractions) + " |",
    ]
    for policy in result.policies:
        cells = []
        for f in fractions:
            r = cell[policy, f]
            text = f"{r.block_hit:.4f} / {r.prefix_hit:.4f}"
            cells.append(f"**{text}**" if r.block_hit == best[f] and len(result.policies) > 1
                         else text)  # fmt: skip
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines.append(
        "| OPT | " + " | ".join(f"{cell['OPT', f].block_hit:.4f}" for f in fractions) + " |"
    )
    lines.append(
        "| ceiling | " + " | ".join(f"{cell['OPT', f].ceiling:.4f}" for f in fractions) + " |"
    )
    return lines


def _admission_table(result: ReportResult, workload: str) -> list[str]:
    rows = {
        (r.policy, r.fraction, r.admission): r
        for r in result.rows
        if r.workload == workload and r.admission
    }
    lines = [
        "| policy | capacity % | disk admits | block hit | prefix hit | disk GiB written "
        "| writes vs all | disk rejects |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for policy in result.policies:
        for f in result.options.admission_capacities:
            base = rows[policy, f, "all"].disk_bytes_written
            for admission in ("all", "second_hit"):
                r = rows[policy, f, admission]
                ratio = r.disk_bytes_written / base if base else math.nan
                lines.append(
                    f"| {policy} | {f * 100:g} | {admission} | {r.block_hit:.4f} | "
                    f"{r.prefix_hit:.4f} | {r.disk_bytes_written / GiB:,.0f} | {ratio:.2f} | "
                    f"{r.disk_rejects:,} |"
                )
    return lines


def _write_csv(result: ReportResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["workload", "policy", "capacity_fraction", "disk_admission",
                      "block_hit_ratio", "prefix_hit_ratio", "ceiling_block_hit_ratio",
                      "disk_bytes_written",
                      "disk_admission_rejects", "drops"])  # fmt: skip
        for r in result.rows:
            out.writerow([r.workload, r.policy, r.fraction, r.admission, r.block_hit,
                          r.prefix_hit, r.ceiling, r.disk_bytes_written, r.disk_rejects,
                          r.drops])  # fmt: skip


def _write_plot(result: ReportResult, path: Path) -> None:
    from lmtier.cli.replay.report import check_plotting

    check_plotting()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    count = len(result.workloads)
    columns = 2 if count > 1 else 1
    lines = math.ceil(count / columns)
    figure, grid = plt.subplots(lines, columns, figsize=(6 * columns, 4 * lines), squeeze=False)
    fractions = result.options.capacities
    for axes, workload in zip(grid.flat, result.workloads, strict=False):
        rows = [r for r in result.rows if r.workload == workload.name and not r.admission]
        for policy in result.policies:
            values = [next(r.block_hit for r in rows if (r.policy, r.fraction) == (policy, f))
                      for f in fractions]  # fmt: skip
            axes.plot(fractions, values, marker="o", label=policy)
        opt = [next(r for r in rows if (r.policy, r.fraction) == ("OPT", f)) for f in fractions]
        axes.plot(fractions, [r.block_hit for r in opt], "k--", label="OPT (Belady)")
        axes.plot(fractions, [r.ceiling for r in opt], "k:", label="infinite cache")
        axes.set_xscale("log")
        axes.set_ylim(bottom=0)
        axes.set_title(workload.name)
        axes.set_xlabel("capacity (fraction of distinct blocks)")
        axes.set_ylabel("block hit ratio")
        axes.grid(True, alpha=0.3)
    for axes in list(grid.flat)[count:]:
        axes.set_visible(False)
    grid.flat[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


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
