"""What every bench row module shares: options, timing, sides, goals, rows and the table's text.

Row modules (``cpu``, ``disk``, ``gpu``, ``peers``, ``redis``, ``vllm``) import this module; it
imports none of them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmtier.config import StoreConfig, TierConfig
from lmtier.store import TieredStore

__all__ = [
    "HEAD",
    "BenchOptions",
    "Goal",
    "KiB",
    "MiB",
    "Row",
    "Scale",
    "Side",
    "atimed",
    "columns",
    "format_rows",
    "layout",
    "make_store",
    "samples",
    "timed",
    "touched",
]

MiB = 1024**2
KiB = 1024


@dataclass(frozen=True)
class BenchOptions:
    quick: bool = False
    folder: Path | None = None  # where disk rows write (a temporary folder inside it)
    fsync: bool = False  # disk rows with durability fsync, baselines fsync'ed alike
    restart_entries: int = 100_000
    peers: bool = False  # rows beside LMCache 0.5.6's local backends (lmtier.cli.bench.peers)
    redis_url: str | None = None  # redis rows on this server (default: a local one, if installed)
    vllm: bool = False  # the vLLM secondary tier's rows (lmtier.cli.bench.vllm; needs vLLM)
    gpu_only: bool = False  # only the GPU rows (lmtier.cli.bench.gpu; needs CUDA)

    @property
    def repeats(self) -> int:
        return 5 if self.quick else 9


# ---------------------------------------------------------------------- timing
def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` took."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


async def atimed(fn: Callable[[], Awaitable[object]]) -> float:
    """Seconds ``await fn()`` took."""
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


def samples(fn: Callable[[], object], repeats: int) -> tuple[float, ...]:
    """The seconds of ``repeats`` calls of ``fn``."""
    return tuple(timed(fn) for _ in range(repeats))


def touched(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with every page written once, so no timed copy into it pays page faults.

    Fresh memory faults on its first write (a fresh 16 MiB copy runs at a fifth of the speed
    of one into touched memory), and the first sample to land on it would be the slow one.
    """
    tensor.view(-1).view(torch.uint8).fill_(0)
    return tensor


def make_store(*tiers: TierConfig, write_ahead: bool = False) -> TieredStore:
    return TieredStore(StoreConfig(tiers, write_ahead=write_ahead))


# ---------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Scale:
    """How a side's seconds read in the table: ``value(seconds)`` in ``unit``."""

    value: Callable[[float], float]
    unit: str
    digits: str  # a format spec for the value, e.g. ".2f"

    def show(self, seconds: float) -> str:
        return format(self.value(seconds), self.digits)

    @staticmethod
    def throughput(nbytes: int) -> Scale:
        """``nbytes`` moved per repetition, shown in GB/s."""
        return Scale(lambda s: nbytes / s / 1e9, "GB/s", ".2f")

    @staticmethod
    def latency(per: int = 1) -> Scale:
        """``per`` operations per repetition, shown as microseconds per operation."""
        return Scale(lambda s: s / per * 1e6, "us", ".1f")

    @staticmethod
    def rate(count: int, unit: str) -> Scale:
        """``count`` things per repetition, shown per second."""
        return Scale(lambda s: count / s, unit, ",.0f")


@dataclass(frozen=True)
class Side:
    """One side of a row: the seconds each repetition took, and how they read."""

    seconds: tuple[float, ...]
    scale: Scale
    note: str = ""  # after the figure: what the baseline is ("raw write", "SET", ...)

    def __post_init__(self) -> None:
        if not self.seconds or min(self.seconds) <= 0:
            raise ValueError(f"a side needs positive timings, got {self.seconds}")

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def value(self) -> float:
        """The median, in the row's unit."""
        return self.scale.value(self.median)

    @property
    def middle_spread(self) -> float:
        """How far apart the middle half of the repetitions lie (third quartile minus first),
        relative to their median: the odd preempted sample, which the median ignores, does
        not move it; many disturbed samples do."""
        if len(self.seconds) < 2:
            return 0.0
        first, _, third = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return (third - first) / self.median

    def text(self) -> str:
        note = f" {self.note}" if self.note else ""
        return f"{self.scale.show(self.median)} {self.scale.unit}{note}"

    def spread(self) -> str:
        """The lowest and highest figure of the repetitions, ``low-high`` ('' for one)."""
        if len(self.seconds) == 1:
            return ""
        ends = sorted(self.scale.value(s) for s in (min(self.seconds), max(self.seconds)))
        return "-".join(format(end, self.scale.digits) for end in ends)

    def merged(self, other: Side) -> Side:
        """Both sides' repetitions as one side (the same measure from another run)."""
        return Side(self.seconds + other.seconds, self.scale, self.note)


@dataclass(frozen=True)
class Goal:
    """What a row should reach: its ratio, or lmtier's own figure in the row's unit, at least
    (or, with ``at_most``, at most) ``bound``."""

    text: str
    bound: float
    on_ratio: bool = True
    at_most: bool = False

    @staticmethod
    def ratio(bound: float) -> Goal:
        return Goal(f">= {bound}", bound)

    @staticmethod
    def figure_at_least(bound: float, text: str) -> Goal:
        return Goal(text, bound, on_ratio=False)

    @staticmethod
    def figure_at_most(bound: float, text: str) -> Goal:
        return Goal(text, bound, on_ratio=False, at_most=True)

    def met(self, ratio: float | None, figure: float | None) -> bool | None:
        """Whether the goal is met; None when the row has nothing to judge."""
        measured = ratio if self.on_ratio else figure
        if measured is None:
            return None
        return measured <= self.bound if self.at_most else measured >= self.bound


@dataclass(frozen=True)
class Row:
    """One measure: lmtier's side beside a baseline taken in the same run.

    ``ratio`` is baseline time / lmtier time (1.0: as fast as the raw operation).  A row
    without a side (LMCache not installed, say) says why in ``detail``.
    """

    name: str
    lmtier: Side | None
    baseline: Side | None = None
    goal: Goal | None = None
    detail: str = ""  # in the baseline column when there is no baseline side

    @property
    def ratio(self) -> float | None:
        if self.lmtier is None or self.baseline is None:
            return None
        return self.baseline.median / self.lmtier.median

    @property
    def figure(self) -> float | None:
        return None if self.lmtier is None else self.lmtier.value

    def verdict(self, ratio: float | None = None) -> str:
        """PASS or FAIL against the goal (on ``ratio`` if given, else this row's); else ''."""
        if self.goal is None:
            return ""
        met = self.goal.met(self.ratio if ratio is None else ratio, self.figure)
        return "" if met is None else "PASS" if met else "FAIL"

    @property
    def middle_spread(self) -> float:
        """The larger ``Side.middle_spread`` of the two sides (0 without sides)."""
        sides = [side for side in (self.lmtier, self.baseline) if side is not None]
        return max((side.middle_spread for side in sides), default=0.0)


# ---------------------------------------------------------------------- text
def columns(row: Row) -> list[str]:
    """measure, lmtier, its spread, baseline, its spread: the cells every table starts with."""
    lm, base = row.lmtier, row.baseline
    return [
        row.name,
        "" if lm is None else lm.text(),
        "" if lm is None else lm.spread(),
        row.detail if base is None else base.text(),
        "" if base is None else base.spread(),
    ]


HEAD = ["measure", "lmtier", "spread", "baseline (same run)", "spread"]


def layout(table: Sequence[Sequence[str]]) -> str:
    """Cells in left-aligned columns two spaces apart."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def format_rows(rows: Sequence[Row]) -> str:
    """One run's table: each side's median with the spread of its repetitions (min-max), the
    ratio, the goal and PASS or FAIL."""
    table = [[*HEAD, "ratio", "goal", "result"]]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        goal = "" if row.goal is None else row.goal.text
        table.append([*columns(row), ratio, goal, row.verdict()])
    return layout(table)
