"""Which capacities a trace can be replayed at: each tier at least one block, and the whole
below the trace's working set (at or above it every policy hits every reuse alike)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lmtier.cli.replay.run import capacity_blocks, split_capacity
from lmtier.cli.replay.traces import Trace, trace_stats
from lmtier.errors import ConfigError, TraceError

__all__ = ["CapacityPlan", "capacity_problem", "plan_capacities"]


@dataclass(frozen=True)
class CapacityPlan:
    """The capacities to replay, each with its blocks per tier, and why the others are not."""

    usable: list[tuple[float, list[int]]]  # (fraction, blocks per tier, fastest first)
    skipped: list[str]  # one reason per capacity left out


def plan_capacities(
    trace: Trace, fractions: Sequence[float], shares: Sequence[float]
) -> CapacityPlan:
    """Split each capacity among tiers; leave out (with its reason) each the trace cannot use.

    Raises TraceError for a trace that references no block, and ConfigError when no capacity
    is left, with the reasons.
    """
    if trace.distinct_blocks == 0:
        raise TraceError(
            f"the trace's {len(trace.requests):,} request(s) reference no block (every "
            "hash_ids is empty): nothing to replay"
        )
    usable = []
    unusable: dict[str, list[float]] = {"small": [], "large": []}
    for fraction in fractions:
        kind = _problem_kind(trace, fraction, shares)
        if kind is None:
            usable.append((fraction, split_capacity(capacity_blocks(trace, fraction), shares)))
        else:
            unusable[kind].append(fraction)
    if not usable:
        reasons = [_describe(trace, kind, f, shares) for kind, f in unusable.items() if f]
        raise ConfigError("no capacity left to replay: " + "; and ".join(reasons))
    skipped = [_describe(trace, kind, [f], shares) for kind, fs in unusable.items() for f in fs]
    return CapacityPlan(usable, skipped)


def capacity_problem(trace: Trace, fraction: float, shares: Sequence[float]) -> str | None:
    """Why ``trace`` cannot be replayed at ``fraction`` split by ``shares``, or None."""
    kind = _problem_kind(trace, fraction, shares)
    return None if kind is None else _describe(trace, kind, [fraction], shares)


def _problem_kind(trace: Trace, fraction: float, shares: Sequence[float]) -> str | None:
    blocks = capacity_blocks(trace, fraction)
    if blocks >= trace.distinct_blocks:
        return "large"
    return "small" if min(split_capacity(blocks, shares)) < 1 else None


def _describe(trace: Trace, kind: str, fractions: Sequence[float], shares: Sequence[float]) -> str:
    """Why ``fractions`` (all of one ``kind``) cannot be replayed, and what to do instead."""
    working_set = f"the trace's working set of {trace.distinct_blocks:,} distinct blocks"
    blocks = [capacity_blocks(trace, f) for f in fractions]
    named = "capacit" + ("y " if len(fractions) == 1 else "ies ")
    named += ", ".join(f"{f:g}" for f in fractions)
    named += " is " if len(fractions) == 1 else " are "
    named += ", ".join(f"{b:,}" for b in blocks) + (" block" if blocks == [1] else " blocks")
    if kind == "large":
        return (
            f"{named}, at least all of {working_set}: every policy would hit every reuse "
            f"after warm-up (the ceiling, {trace_stats(trace).ceiling:.4f}); capacities are "
            "fractions of the working set: give ones below 1 (0.05 is 5%)"
        )
    split = ":".join(f"{share:g}" for share in shares)
    if len(shares) > 1:
        named += f" split {split}"
    smallest = _smallest_capacity(trace.distinct_blocks, shares)
    remedy = (
        f"use a capacity of at least {smallest:g}, or replay more of the trace"
        if smallest is not None
        else f"replay more of the trace, or split it less unevenly than {split}"
    )
    return f"{named} of {working_set}, and every tier needs at least one block: {remedy}"


def _smallest_capacity(working_set: int, shares: Sequence[float]) -> float | None:
    """The smallest fraction of three significant digits that gives every tier a block, or
    None when even the whole working set would not."""
    blocks = math.ceil(sum(shares) / min(shares))
    while min(split_capacity(blocks, shares)) < 1:  # float rounding in the split
        blocks += 1
    if blocks >= working_set:
        return None
    exact = blocks / working_set
    step = 10.0 ** (math.floor(math.log10(exact)) - 2)
    steps = math.ceil(exact / step)
    # As a user would type it back: the printed digits must still reach ``blocks``.
    while math.floor((fraction := float(f"{steps * step:.3g}")) * working_set) < blocks:
        steps += 1
    return fraction
