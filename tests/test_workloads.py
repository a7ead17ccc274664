"""Workloads: the synthetic multi-turn generator, time splits, and the replay command on them."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from lmtier.cli import main
from lmtier.cli.replay.synthetic import (
    SYNTHETIC_KINDS,
    SyntheticSpec,
    parse_synthetic,
    synthetic_trace,
)
from lmtier.cli.replay.traces import Trace, parse_part, read_trace, trace_part, trace_stats
from lmtier.cli.replay.workloads import Workload, load_trace
from lmtier.errors import TraceError

TRACE = Path(__file__).parent / "data" / "conversation_trace.jsonl"
SMALL = SyntheticSpec(requests=2000, sessions=800)


# ---------------------------------------------------------------------- synthetic
def test_the_generator_is_deterministic_for_a_seed() -> None:
    assert synthetic_trace(SMALL) == synthetic_trace(SMALL)
    other = synthetic_trace(SyntheticSpec(requests=2000, sessions=800, seed=1))
    assert other.requests != synthetic_trace(SMALL).requests


@pytest.mark.parametrize("kind", sorted(SYNTHETIC_KINDS))
def test_synthetic_ids_are_prefix_chained(kind: str) -> None:
    """Each id always follows the same parent, so one id names its whole prefix."""
    parent: dict[int, int | None] = {}
    spec = replace(SYNTHETIC_KINDS[kind], requests=2000, sessions=800)
    for request in synthetic_trace(spec).requests:
        previous = None
        for block in request.hash_ids:
            assert parent.setdefault(block, previous) == previous
            previous = block
        assert len(set(request.hash_ids)) == len(request.hash_ids)


def test_synthetic_statistics_resemble_the_conversation_trace() -> None:
    trace = synthetic_trace()
    stats = trace_stats(trace)
    assert (trace.format, trace.block_tokens, stats.requests) == ("synthetic", 512, 12000)
    assert 20 <= stats.references / stats.requests <= 30  # real: 24.0 blocks a request
    assert 0.70 <= stats.once_fraction <= 0.82  # real: 75.8% of blocks used once
    assert 0.30 <= stats.ceiling <= 0.50  # real: 0.3664
    times = [request.timestamp for request in trace.requests]
    assert times == sorted(times)
    longest = max(len(r.hash_ids) for r in trace.requests)
    assert longest <= SyntheticSpec().max_context_blocks
    # a few shared system prompts: most requests start with one of the two most popular
    firsts: dict[int, int] = {}
    for request in trace.requests:
        firsts[request.hash_ids[0]] = firsts.get(request.hash_ids[0], 0) + 1
    assert len(firsts) <= SyntheticSpec().system_prompts
    assert sum(sorted(firsts.values())[-2:]) > 0.5 * stats.requests


def test_shared_prompt_workload_reads_long_shared_prompts_in_short_sessions() -> None:
    spec = parse_synthetic("synthetic:shared-prompt")
    trace = synthetic_trace(spec)
    stats = trace_stats(trace)
    assert stats.requests == 12000
    assert stats.ceiling >= 0.85  # the shared prompts are most of the references
    assert stats.once_fraction >= 0.75  # the sessions' own blocks mostly are not
    # a prompt: the leading blocks common to every request that starts with its first block
    prompts: dict[int, tuple[int, ...]] = {}
    for request in trace.requests:
        seen = prompts.setdefault(request.hash_ids[0], request.hash_ids)
        pairs = enumerate(zip(seen, request.hash_ids, strict=False))
        same = next((i for i, (a, b) in pairs if a != b), min(len(seen), len(request.hash_ids)))
        prompts[request.hash_ids[0]] = seen[:same]
    assert 40 <= len(prompts) <= spec.system_prompts  # most of the 64 prompts are drawn
    for prompt in prompts.values():
        assert spec.system_blocks_min <= len(prompt) <= spec.system_blocks_max
    shared = sum(len(prompts[request.hash_ids[0]]) for request in trace.requests)
    assert shared > 0.75 * stats.references
    # short sessions: a request adds a few blocks to its prompt on average
    assert stats.references / stats.requests < spec.system_blocks_max + 12


def test_synthetic_parameters_are_checked() -> None:
    assert parse_synthetic("synthetic:zipf", sessions=10, alpha=0.5, seed=None).sessions == 10
    # a generator's own defaults stay under the parameters given
    shared = parse_synthetic("synthetic:shared-prompt", sessions=10)
    assert (shared.sessions, shared.system_prompts, shared.system_blocks_min) == (10, 64, 16)
    with pytest.raises(TraceError, match="known: synthetic:zipf, synthetic:shared-prompt"):
        parse_synthetic("synthetic:uniform")
    with pytest.raises(TraceError, match="system_blocks_min"):
        SyntheticSpec(system_blocks_min=9, system_blocks_max=8)
    with pytest.raises(TraceError, match="sessions"):
        SyntheticSpec(sessions=0)
    with pytest.raises(TraceError, match="continue_prob"):
        SyntheticSpec(continue_prob=1.5)


# ---------------------------------------------------------------------- time split
def test_parts_are_consecutive_and_cover_the_trace() -> None:
    trace = read_trace(TRACE, limit=1001)
    halves = [trace_part(trace, k, 2) for k in (1, 2)]
    assert [len(h.requests) for h in halves] == [500, 501]
    assert halves[0].requests + halves[1].requests == trace.requests
    thirds = [trace_part(trace, k, 3).requests for k in (1, 2, 3)]
    assert sum(thirds, ()) == trace.requests
    assert parse_part("first-half") == (1, 2) and parse_part("second-half") == (2, 2)
    assert parse_part("3/4") == (3, 4)
    for bad in ("half", "0/2", "3/2"):
        with pytest.raises(TraceError):
            trace_part(trace, *parse_part(bad))


def test_workloads_load_parts_of_files_and_of_the_generator() -> None:
    second = Workload("second half", str(TRACE), part=(2, 2), limit=100).load()
    assert second.requests == read_trace(TRACE, limit=100).requests[50:]
    small = load_trace("synthetic:zipf", limit=30, part=(1, 3), synthetic=SMALL)
    assert isinstance(small, Trace) and small.requests == synthetic_trace(SMALL).requests[:10]


def test_replay_command_on_a_window_and_on_the_generator(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["replay", str(TRACE), "--limit", "400", "--window", "second-half",
                 "--capacities", "0.1", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "part 2/2" in out and "200 requests" in out
    assert main(["replay", "synthetic:zipf", "--requests", "300", "--sessions", "50",
                 "--zipf-alpha", "0.9", "--seed", "3", "--capacities", "0.1",
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "synthetic:zipf: synthetic, 300 requests" in out and "used once" in out
    assert main(["replay", "synthetic:shared-prompt", "--requests", "300", "--capacities",
                 "0.1", "--policies", "lru,prefix", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "synthetic:shared-prompt: synthetic, 300 requests" in out and "\nprefix " in out
    assert main(["replay", str(TRACE), "--sessions", "5", "--no-progress"]) == 2
    assert "synthetic:zipf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["replay", str(TRACE), "--part", "2"])


# ---------------------------------------------------------------------- the policy report
def test_the_shipped_report_keeps_the_default_evictor_section_on_a_rerun() -> None:
    from lmtier.cli.replay.policy_pages import KEEP_MARKER

    text = (Path(__file__).parent.parent / "docs" / "policies.md").read_text()
    kept, marker, generated = text.partition(KEEP_MARKER)
    assert marker and "## The default evictor" in kept and "## Every registered policy" in generated


def test_the_policy_report_covers_every_registered_policy(tmp_path: Path) -> None:
    from lmtier.cli.replay.policy_pages import KEEP_MARKER
    from lmtier.cli.replay.policy_report import main as report
    from lmtier.evictor.registry import evictor_names

    args = ["--limit", "300", "--capacities", "0.05,0.25", "--admission-capacities", "0.25",
            "--jobs", "1", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    # a rerun keeps the hand-written part above the marker and rewrites the rest
    head = f"# Policies\n\nThe default, and why.\n\n{KEEP_MARKER}\n"
    (tmp_path / "policies.md").write_text(f"{head}\n## Every registered policy\n\nstale\n")
    assert report(args) == 0
    text = (tmp_path / "policies.md").read_text()
    assert text.startswith(head) and "stale" not in text
    assert text.count("## Every registered policy") == 1
    for workload in ("conversation trace", "first half", "second half", "synthetic:zipf"):
        assert f"\n### {workload}\n" in text and f"\n#### {workload}\n" in text
    for policy in evictor_names():
        # its row in each workload's table (the best cell of a column in bold)
        assert len(re.findall(rf"^\| {policy} \| (\*\*)?[01]\.", text, re.MULTILINE)) == 4
        assert f"| {policy} | 25 | second_hit |" in text
    assert "| OPT |" in text and "| ceiling |" in text
    rows = (tmp_path / "policies.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * (2 * (1 + len(evictor_names())) + 2 * len(evictor_names()))
    assert (tmp_path / "policies.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without a hand-written part, the report has its own title
    (tmp_path / "policies.md").unlink()
    assert report([*args, "--policies", "lru", "--capacities", "0.25"]) == 0
    assert (tmp_path / "policies.md").read_text().startswith("# Eviction policies on replayed")
