"""``lmtier bench --repeat N``: the table run N times, each row's ratio judged across the runs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from lmtier.cli.bench.core import HEAD, Row, Side, columns, layout

__all__ = ["Repeated", "format_repeated", "repeated"]


@dataclass(frozen=True)
class Repeated:
    """One measure over several runs: every run's repetitions pooled, and each run's ratio."""

    row: Row  # the runs' sides merged: medians and spreads over all their repetitions
    ratios: tuple[float, ...]  # one per run that had a ratio

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    def ratio_range(self) -> str:
        if not self.ratios:
            return ""
        return f"{min(self.ratios):.2f}-{max(self.ratios):.2f}"


def _merge(a: Side | None, b: Side | None) -> Side | None:
    return a if b is None else b if a is None else a.merged(b)


def repeated(runs: Sequence[Sequence[Row]]) -> list[Repeated]:
    """Rows of the same name across ``runs``, in the first run's order."""
    order: list[str] = []
    rows: dict[str, Row] = {}
    ratios: dict[str, list[float]] = {}
    for run in runs:
        for row in run:
            if row.name not in rows:
                order.append(row.name)
                rows[row.name] = row
                ratios[row.name] = []
            else:
                first = rows[row.name]
                rows[row.name] = Row(
                    row.name,
                    _merge(first.lmtier, row.lmtier),
                    _merge(first.baseline, row.baseline),
                    first.goal,
                    first.detail,
                )
            if row.ratio is not None:
                ratios[row.name].append(row.ratio)
    return [Repeated(rows[name], tuple(ratios[name])) for name in order]


def format_repeated(summaries: Sequence[Repeated]) -> str:
    """The table of several runs: each side's median and spread over all their repetitions,
    the median of the runs' ratios and their range (min-max), the goal and PASS or FAIL (the
    median ratio against the goal)."""
    runs = max((len(s.ratios) for s in summaries), default=0)
    table = [[*HEAD, f"ratio (median of {runs})", "ratio range", "goal", "result"]]
    for summary in summaries:
        row, ratio = summary.row, summary.ratio
        table.append([
            *columns(row),
            "" if ratio is None else f"{ratio:.2f}",
            summary.ratio_range(),
            "" if row.goal is None else row.goal.text,
            row.verdict(ratio),
        ])  # fmt: skip
    return layout(table)
