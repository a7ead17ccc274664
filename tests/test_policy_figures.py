"""Every registered policy's sizes-only replay figures on a slice of the conversation trace.

A change in any policy's decisions shows here; when it is intended, update the figures and
say why in the commit.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from lmtier.cli.replay.run import capacity_blocks, replay_sizes_only
from lmtier.cli.replay.sweep import ReplayOptions, run_sweep
from lmtier.cli.replay.traces import Trace, read_trace
from lmtier.evictor import evictor_names

TRACE = Path(__file__).parent / "data" / "conversation_trace.jsonl"
REQUESTS = 2000
FRACTION = 0.02

# policy -> (block hits, prefix hits) of 54,559 references
FIGURES = {
    "arc": (2387, 2387),
    "fifo": (2038, 2030),
    "lfu": (2387, 2387),
    "lru": (2102, 2102),
    "prefix": (3899, 3899),
    "s3fifo": (2754, 2754),
}


@cache
def head_of_trace() -> Trace:
    return read_trace(TRACE, limit=REQUESTS)


def test_every_registered_policy_has_figures() -> None:
    assert set(evictor_names()) <= set(FIGURES)


@pytest.mark.parametrize("policy", sorted(FIGURES))
def test_replay_figures(policy: str) -> None:
    trace = head_of_trace()
    capacity = capacity_blocks(trace, FRACTION) * 512
    result = replay_sizes_only(trace, ["cpu"], [capacity], policy, 512, FRACTION)
    assert result.references == 54_559
    assert (sum(result.block_hits), sum(result.prefix_hits)) == FIGURES[policy]


@pytest.mark.parametrize("policy", sorted(FIGURES))
def test_real_store_makes_the_sizes_only_decisions(policy: str) -> None:
    # Keys and positions reach the evictors the same way through tiers and the store as
    # through the simulation, across demotions and promotions.
    trace = read_trace(TRACE, limit=60)
    common = {
        "capacities": (0.1,),
        "shares": (1.0, 1.0, 2.0),
        "bytes_per_token": 2,
        "policies": (policy,),
    }
    real = run_sweep(trace, ReplayOptions(real=True, **common)).results[0]  # type: ignore[arg-type]
    sizes = run_sweep(trace, ReplayOptions(**common)).results[0]  # type: ignore[arg-type]
    assert real.wrong == 0
    assert (real.block_hits, real.prefix_hits) == (sizes.block_hits, sizes.prefix_hits)
    for tier in ("gpu", "cpu", "disk"):
        for counter in ("hits", "evictions", "demotions_in", "promotions_in", "drops"):
            assert real.counters[tier][counter] == sizes.counters[tier][counter], (tier, counter)
