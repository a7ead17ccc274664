"""Capacities a trace is too small for: a tier of no block, or the whole working set.

Such a capacity is skipped with a warning that names it, the trace's working set and what to
do; the replay fails only when no capacity is left.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest

from lmtier.cli import main
from lmtier.cli.replay.capacity import capacity_problem, plan_capacities
from lmtier.cli.replay.policy_report import ReportOptions, run_report
from lmtier.cli.replay.run import capacity_blocks, split_capacity
from lmtier.cli.replay.sweep import ReplayOptions, run_sweep
from lmtier.cli.replay.traces import Request, Trace, read_trace
from lmtier.errors import ConfigError, TraceError

TRACE = Path(__file__).parent / "data" / "conversation_trace.jsonl"


def small_trace() -> Trace:
    """40 distinct blocks, each of the first 20 used twice: ceiling 20 / 60."""
    ids = list(range(20)) + list(range(20)) + list(range(20, 40))
    requests = tuple(Request(float(i), tuple(ids[i : i + 4])) for i in range(0, len(ids), 4))
    return Trace(requests, 512, "mooncake")


def test_a_capacity_of_no_block_is_skipped_and_says_what_would_do() -> None:
    trace = small_trace()
    plan = plan_capacities(trace, (0.01, 0.5), (1.0,))
    assert [fraction for fraction, _ in plan.usable] == [0.5]
    assert plan.usable[0][1] == [20]
    assert plan.skipped == [
        "capacity 0.01 is 0 blocks of the trace's working set of 40 distinct blocks, and every "
        "tier needs at least one block: use a capacity of at least 0.025, or replay more of "
        "the trace"
    ]


def test_a_capacity_of_the_whole_working_set_is_skipped() -> None:
    trace = small_trace()
    plan = plan_capacities(trace, (1.0, 0.25, 2.5), (1.0,))
    assert [fraction for fraction, _ in plan.usable] == [0.25]
    assert plan.skipped == [
        f"capacity {f:g} is {b} blocks, at least all of the trace's working set of 40 distinct "
        "blocks: every policy would hit every reuse after warm-up (the ceiling, 0.3333); "
        "capacities are fractions of the working set: give ones below 1 (0.05 is 5%)"
        for f, b in ((1.0, 40), (2.5, 100))
    ]


@pytest.mark.parametrize("shares", [(1.0,), (1.0, 4.0), (1.0, 2.0, 4.0), (3.0, 1.0)])
def test_the_suggested_capacity_is_the_smallest_that_works(shares: tuple[float, ...]) -> None:
    trace = read_trace(TRACE, limit=40)
    problem = capacity_problem(trace, 1e-6, shares)
    assert problem is not None
    found = re.search(r"at least ([0-9.e-]+),", problem)
    assert found is not None, problem
    suggested = float(found.group(1))
    assert capacity_problem(trace, suggested, shares) is None
    # three significant digits, rounded up: one step down is too small
    step = 10 ** (math.floor(math.log10(suggested)) - 2)
    blocks = capacity_blocks(trace, suggested - step)
    assert min(split_capacity(blocks, shares)) < 1


def test_a_split_no_capacity_can_satisfy_says_so() -> None:
    problem = capacity_problem(small_trace(), 0.5, (1.0, 100.0))
    assert problem == (
        "capacity 0.5 is 20 blocks split 1:100 of the trace's working set of 40 distinct "
        "blocks, and every tier needs at least one block: replay more of the trace, or split it "
        "less unevenly than 1:100"
    )


def test_the_sweep_replays_the_rest_and_logs_each_skip(caplog: pytest.LogCaptureFixture) -> None:
    trace = small_trace()
    options = ReplayOptions(capacities=(0.01, 0.25, 1.5), policies=("lru", "fifo"))
    with caplog.at_level(logging.WARNING, logger="lmtier.cli.replay.sweep"):
        sweep = run_sweep(trace, options)
    assert [(r.fraction, r.policy) for r in sweep.results] == [(0.25, "lru"), (0.25, "fifo")]
    assert list(sweep.optimum) == [0.25]
    assert len(sweep.skipped) == 2
    assert [record.getMessage() for record in caplog.records] == [
        f"skipped: {reason}" for reason in sweep.skipped
    ]
    assert "capacity 0.01 is 0 blocks" in sweep.skipped[0]
    assert "capacity 1.5 is 60 blocks" in sweep.skipped[1]


def test_no_capacity_left_is_an_error_with_every_reason() -> None:
    with pytest.raises(ConfigError) as caught:
        run_sweep(small_trace(), ReplayOptions(capacities=(0.001, 0.01, 5.0, 10.0)))
    assert str(caught.value) == (
        "no capacity left to replay: capacities 0.001, 0.01 are 0, 0 blocks of the trace's "
        "working set of 40 distinct blocks, and every tier needs at least one block: use a "
        "capacity of at least 0.025, or replay more of the trace; and capacities 5, 10 are "
        "200, 400 blocks, at least all of the trace's working set of 40 distinct blocks: every "
        "policy would hit every reuse after warm-up (the ceiling, 0.3333); capacities are "
        "fractions of the working set: give ones below 1 (0.05 is 5%)"
    )


def test_a_trace_of_no_block_is_an_error() -> None:
    trace = Trace((Request(0.0, ()), Request(1.0, ())), 512, "mooncake")
    with pytest.raises(TraceError, match=r"2 request\(s\) reference no block"):
        run_sweep(trace, ReplayOptions())


def test_the_command_warns_and_replays_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["replay", str(TRACE), "--limit", "5", "--capacities", "0.001,0.5,2", "--no-progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    warnings = captured.err.splitlines()
    assert len(warnings) == 2
    assert warnings[0].startswith("lmtier: warning: skipped: capacity 0.001 is 0 blocks of ")
    assert "working set of 59 distinct blocks" in warnings[0] and "at least 0.017" in warnings[0]
    assert warnings[1].startswith("lmtier: warning: skipped: capacity 2 is 118 blocks, at ")
    table = captured.out.splitlines()[1:]
    assert len(table) == 2 and re.split(r"\s{2,}", table[1])[:2] == ["lru", "50"]


@pytest.mark.parametrize(
    ("capacities", "split", "says"),
    [
        ("5,25", "1", "capacities 5, 25 are 295, 1,475 blocks, at least all of"),
        ("0.01", "1,4", "capacity 0.01 is 0 blocks split 1:4 of the trace's working set of 59"),
    ],
)
def test_the_command_fails_when_no_capacity_is_left(
    capsys: pytest.CaptureFixture[str], capacities: str, split: str, says: str
) -> None:
    args = ["replay", str(TRACE), "--limit", "5", "--capacities", capacities, "--split", split,
            "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmtier: error: no capacity left to replay: " + says)
    assert err.count("\n") == 1


def test_the_policy_report_refuses_a_capacity_it_cannot_fill() -> None:
    options = ReportOptions(capacities=(0.05, 1.0), admission_capacities=(), limit=50)
    with pytest.raises(ConfigError, match=r"^conversation trace: capacity 1 is [0-9,]+ blocks, at"):
        run_report(options)
