"""Replay results as a table, a CSV file and a plot of hit ratio against capacity."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from lmtier.cli.replay.run import ReplayResult
from lmtier.errors import LmtierError

__all__ = [
    "byte_unit",
    "check_plotting",
    "format_table",
    "policy_label",
    "write_csv",
    "write_plot",
]

CSV_COLUMNS = [
    "policy", "admission", "capacity_fraction", "tier", "capacity_bytes", "references",
    "block_hits", "prefix_hits", "block_hit_ratio", "prefix_hit_ratio", "opt_block_hit_ratio",
    "ceiling_block_hit_ratio", "demotions_out", "drops", "bytes_read", "bytes_written",
    "admission_rejects",
]  # fmt: skip
_BYTE_UNITS = [("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024), ("B", 1)]


def policy_label(result: ReplayResult) -> str:
    """The evictor's name, with the admission policies that differ from ``all``."""
    return f"{result.policy}+{result.admission}" if result.admission else result.policy


def _total(result: ReplayResult, counter: str) -> int:
    return sum(c.get(counter, 0) for c in result.counters.values())


def byte_unit(largest: float) -> tuple[str, int]:
    """The largest unit in which ``largest`` bytes is at least 100: the largest value shows
    3 to 6 digits, and smaller values in the same unit keep a few (0.9 TiB beside 16.7 TiB
    would not: 921.6 GiB beside 17,100.8 GiB does)."""
    return next(((n, u) for n, u in _BYTE_UNITS if largest >= 100 * u), _BYTE_UNITS[-1])


def format_table(results: Sequence[ReplayResult], optimum: dict[float, tuple[float, float]]) -> str:
    """One row per replay: hit ratios in all and per tier beside OPT and the ceiling, counts,
    and bytes read from and written into each tier.

    Each column has one unit, in its header: ``capacity %`` of the trace's distinct blocks;
    hit ratios as fractions of the block references; bytes in one unit picked for the table.
    """
    tiers = list(dict.fromkeys(name for r in results for name in r.tier_names))
    read = [{n: h * r.block_bytes for n, h in zip(r.tier_names, r.block_hits, strict=True)}
            for r in results]  # fmt: skip
    written = [{n: r.counters.get(n, {}).get("bytes_in", 0) for n in r.tier_names}
               for r in results]  # fmt: skip
    unit, scale = byte_unit(max((v for row in read + written for v in row.values()), default=0))
    per_tier_hits = [f"{n} hit" for n in tiers] if len(tiers) > 1 else []
    header = [
        "policy", "capacity %", "block hit", "prefix hit", "OPT", "ceiling", *per_tier_hits,
        "misses", "demotions", "drops", *(f"{n} read {unit}" for n in tiers),
        *(f"{n} written {unit}" for n in tiers), "admission rejects",
    ]  # fmt: skip
    rows = [header]
    for r, reads, writes in zip(results, read, written, strict=True):
        best, ceiling = optimum.get(r.fraction, (math.nan, math.nan))
        hits = dict(zip(r.tier_names, r.block_hits, strict=True))
        tier_hits = [_ratio(hits[n], r.references) if n in hits else "-" for n in tiers]
        rows.append([
            policy_label(r), f"{r.fraction * 100:g}",
            f"{r.block_hit_ratio:.4f}", f"{r.prefix_hit_ratio:.4f}", f"{best:.4f}",
            f"{ceiling:.4f}", *(tier_hits if per_tier_hits else []),
            f"{r.references - sum(r.block_hits):,}", f"{_total(r, 'demotions_out'):,}",
            f"{_total(r, 'drops'):,}",
            *(_bytes(reads.get(n), scale) for n in tiers),
            *(_bytes(writes.get(n), scale) for n in tiers),
            f"{_total(r, 'admission_rejects'):,}",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    # Names left-aligned, numbers right-aligned so their digits line up.
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def _ratio(hits: int, references: int) -> str:
    return f"{hits / max(references, 1):.4f}"


def _bytes(count: int | None, scale: int) -> str:
    return "-" if count is None else f"{count / scale:,.1f}"


def write_csv(
    path: Path, results: Sequence[ReplayResult], optimum: dict[float, tuple[float, float]]
) -> None:
    """One row per replay and tier, and one for all tiers (tier ``*``)."""
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(CSV_COLUMNS)
        for r in results:
            best, ceiling = optimum.get(r.fraction, (math.nan, math.nan))
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
