"""Replay results as a table, a CSV file and a plot of hit ratio against capacity."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from lmtier.errors import LmtierError
from lmtier.replay.run import ReplayResult

__all__ = ["check_plotting", "format_table", "policy_label", "write_csv", "write_plot"]

MiB = 1024**2
GiB = 1024**3
TABLE_COLUMNS = [
    "policy", "capacity", "block hit", "prefix hit", "OPT", "ceiling", "per tier (block hit)",
    "misses", "demotions", "drops", "read MiB per tier", "written GiB per tier",
    "admission rejects",
]  # fmt: skip
CSV_COLUMNS = [
    "policy", "admission", "capacity_fraction", "tier", "capacity_bytes", "references",
    "block_hits", "prefix_hits", "block_hit_ratio", "prefix_hit_ratio", "opt_block_hit_ratio",
    "ceiling", "demotions_out", "drops", "bytes_read", "bytes_written", "admission_rejects",
]  # fmt: skip


def policy_label(result: ReplayResult) -> str:
    """The evictor's name, with the admission policies that differ from ``all``."""
    return f"{result.policy}+{result.admission}" if result.admission else result.policy


def _total(result: ReplayResult, counter: str) -> int:
    return sum(c.get(counter, 0) for c in result.counters.values())


def format_table(results: Sequence[ReplayResult], optimum: dict[float, tuple[float, float]]) -> str:
    """One row per replay: hit ratios per tier and in all, beside OPT and the ceiling."""
    header = TABLE_COLUMNS
    rows = [header]
    for r in results:
        best, ceiling = optimum.get(r.fraction, (float("nan"), float("nan")))
        per_tier = " ".join(
            f"{n}={h / max(r.references, 1):.4f}"
            for n, h in zip(r.tier_names, r.block_hits, strict=True)
        )
        read = " ".join(
            f"{n}={h * r.block_bytes / MiB:,.1f}"
            for n, h in zip(r.tier_names, r.block_hits, strict=True)
        )
        written = " ".join(
            f"{n}={r.counters.get(n, {}).get('bytes_in', 0) / GiB:,.1f}" for n in r.tier_names
        )
        rows.append([
            policy_label(r), f"{r.fraction:g}", f"{r.block_hit_ratio:.4f}",
            f"{r.prefix_hit_ratio:.4f}", f"{best:.4f}", f"{ceiling:.4f}", per_tier,
            str(r.references - sum(r.block_hits)), str(_total(r, "demotions_out")),
            str(_total(r, "drops")), read, written, str(_total(r, "admission_rejects")),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def write_csv(
    path: Path, results: Sequence[ReplayResult], optimum: dict[float, tuple[float, float]]
) -> None:
    """One row per replay and tier, and one for all tiers (tier ``*``)."""
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(CSV_COLUMNS)
        for r in results:
            best, ceiling = optimum.get(r.fraction, (float("nan"), float("nan")))
            tiers = zip(r.tier_names, r.capacities, r.block_hits, r.prefix_hits, strict=True)
            for name, capacity, block, prefix in tiers:
                counters = r.counters.get(name, {})
                out.writerow([r.policy, r.admission, r.fraction, name, capacity, r.references,
                              block, prefix, block / max(r.references, 1),
                              prefix / max(r.references, 1), best, ceiling,
                              counters.get("demotions_out", 0), counters.get("drops", 0),
                              block * r.block_bytes, counters.get("bytes_in", 0),
                              counters.get("admission_rejects", 0)])  # fmt: skip
            out.writerow([r.policy, r.admission, r.fraction, "*", sum(r.capacities), r.references,
                          sum(r.block_hits), sum(r.prefix_hits), r.block_hit_ratio,
                          r.prefix_hit_ratio, best, ceiling, _total(r, "demotions_out"),
                          _total(r, "drops"), sum(r.block_hits) * r.block_bytes,
                          _total(r, "bytes_in"), _total(r, "admission_rejects")])  # fmt: skip


def check_plotting() -> None:
    """Raise a clear error now, before a long replay, if ``--plot`` cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise LmtierError("--plot needs matplotlib: pip install 'lmtier[plot]'") from exc


def write_plot(
    path: Path, results: Sequence[ReplayResult], optimum: dict[float, tuple[float, float]]
) -> None:
    """Block hit ratio against capacity, one line per policy; OPT and the ceiling dashed."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(policy_label(r) for r in results):
        points = sorted(
            (r.fraction, r.block_hit_ratio) for r in results if policy_label(r) == policy
        )
        axes.plot(*zip(*points, strict=True), marker="o", label=policy)
    fractions = sorted(optimum)
    axes.plot(fractions, [optimum[f][0] for f in fractions], "k--", label="OPT (Belady)")
    axes.plot(fractions, [optimum[f][1] for f in fractions], "k:", label="infinite cache")
    axes.set_xscale("log")
    axes.set_xlabel("capacity (fraction of the trace's footprint)")
    axes.set_ylabel("block hit ratio")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
