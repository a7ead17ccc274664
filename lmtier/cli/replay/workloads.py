"""Workloads by name: a trace file or ``synthetic:NAME``, optionally cut to its first requests
and to one consecutive part (a time split: tune on the first half, report on the second)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmtier.cli.replay.synthetic import (
    SYNTHETIC_PREFIX,
    SyntheticSpec,
    parse_synthetic,
    synthetic_trace,
)
from lmtier.cli.replay.traces import Trace, read_trace, trace_part

__all__ = ["Workload", "load_trace"]


@dataclass(frozen=True)
class Workload:
    """A named trace to replay: ``source`` is a JSONL path or ``synthetic:NAME``."""

    name: str
    source: str
    part: tuple[int, int] | None = None  # (K, N): the K-th of N consecutive slices
    limit: int | None = None  # the first requests only (before the part is taken)
    synthetic: SyntheticSpec | None = None  # the generator's parameters for synthetic:...

    def load(self) -> Trace:
        """The requests this workload names."""
        return load_trace(self.source, limit=self.limit, part=self.part, synthetic=self.synthetic)


def load_trace(
    source: str | Path,
    fmt: str | None = None,
    limit: int | None = None,
    part: tuple[int, int] | None = None,
    synthetic: SyntheticSpec | None = None,
) -> Trace:
    """A trace file (``fmt`` detected unless given) or the synthetic generator's trace, its
    first ``limit`` requests, then its ``part`` (K, N) by request order."""
    text = str(source)
    if text.startswith(SYNTHETIC_PREFIX):
        named = parse_synthetic(text)  # checks the generator's name even when a spec is given
        trace = synthetic_trace(synthetic or named)
        if limit is not None:
            trace = Trace(trace.requests[:limit], trace.block_tokens, trace.format)
    else:
        trace = read_trace(source, fmt, limit)
    return trace if part is None else trace_part(trace, *part)
