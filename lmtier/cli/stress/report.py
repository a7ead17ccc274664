"""A stress run's verdict: the per-tier table, throughput and latency, and what failed."""

from __future__ import annotations

import statistics

from lmtier.cli.stress.run import StressReport
from lmtier.config import MB

__all__ = ["format_report"]


def format_report(report: StressReport, interrupted: bool = False) -> str:
    """The per-tier table, throughput and latency, and the verdict (none for a run that was
    ``interrupted``: its counts are partial and its entries were not all read back)."""
    tiers = report.stats.get("tiers", {})
    assert isinstance(tiers, dict)
    columns = [
        "entries", "resident_bytes", "budget_bytes", "hits", "misses", "puts", "evictions",
        "demotions_in", "demotions_out", "promotions_in", "promotions_out", "drops", "corrupt",
        "errors",
    ]  # fmt: skip
    names = {"resident_bytes": "resident MiB", "budget_bytes": "budget MiB"}
    header = ["tier"] + [names.get(c, c.replace("_", " ")) for c in columns]
    rows = [header]
    for name, values in tiers.items():
        rows.append(
            [name]
            + [f"{values[c] / MB:.1f}" if c.endswith("_bytes") else str(values[c]) for c in columns]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.append("")
    lines.append(
        f"{report.ops} ops in {report.seconds:.1f} s "
        f"({report.ops / max(report.seconds, 1e-9):,.0f} ops/s); "
        f"put p50 {_ms(report.put_latencies, 50)} p99 {_ms(report.put_latencies, 99)}; "
        f"get p50 {_ms(report.get_latencies, 50)} p99 {_ms(report.get_latencies, 99)}"
    )
    lines.append(f"verified bit-exact: {report.verified}; dropped by the cascade: {report.dropped}")
    if report.shared:
        lines.append(
            f"shared keys: wrong reads {report.wrong_reads}; audit failures "
            f"{report.audit_failures} of {report.audits}; budget breaches "
            f"{report.budget_breaches}; raw exceptions {report.raw_exceptions}; lmtier errors "
            f"{report.lmtier_errors}; ILLEGAL puts {report.illegal_puts}; cancelled calls "
            f"{report.cancelled}; misses of gets given a timeout {report.timed_misses}; "
            f"misses while a tier was down {report.unavailable_misses}"
        )
    lines.extend(f"warning: {w}" for w in report.warnings)
    if interrupted:
        lines.append(f"interrupted after {report.ops} ops: the counts above are partial")
        lines.extend(f"  - {p}" for p in report.problems[:20])
    elif report.ok:
        lines.append("OK: no wrong or lost entry, accounting exact, budgets held")
    else:
        lines.append(f"FAILED: {len(report.problems)} problem(s)")
        lines.extend(f"  - {p}" for p in report.problems[:20])
    return "\n".join(lines)


def _ms(samples: list[float], percentile: int) -> str:
    if len(samples) < 2:
        return "n/a"
    return f"{statistics.quantiles(samples, n=100)[percentile - 1] * 1e3:.2f} ms"
