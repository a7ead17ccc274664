"""Every registered policy's sizes-only replay figures on a slice of the conversation trace.

A change in any policy's decisions shows here; when it is intended, update the figures and
say why in the commit.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from lmtier.evictor import evictor_names
from lmtier.replay.run import capacity_blocks, replay_sizes_only
from lmtier.replay.traces import Trace, read_trace

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
