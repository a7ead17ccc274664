"""Trace replay: parsers, the optimum, the known LRU figures, the tier view, real vs sizes-only."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

from lmtier.cli import main
from lmtier.cli.replay.optimal import belady_hits, ceiling_hits
from lmtier.cli.replay.run import capacity_blocks, optimum, replay_sizes_only, tier_policies
from lmtier.cli.replay.sweep import ReplayOptions, run_sweep
from lmtier.cli.replay.synthetic import SyntheticSpec, synthetic_trace
from lmtier.cli.replay.traces import Trace, read_trace
from lmtier.errors import ConfigError, TraceError

TRACE = Path(__file__).parent / "data" / "conversation_trace.jsonl"


@cache
def conversation(limit: int | None = None) -> Trace:
    return read_trace(TRACE, limit=limit)


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# ---------------------------------------------------------------------- parsers
def test_the_conversation_trace_parses_with_its_published_counts() -> None:
    trace = conversation()
    assert (trace.format, trace.block_tokens) == ("mooncake", 512)
    assert (len(trace.requests), trace.references, trace.distinct_blocks) == (12031, 288500, 182790)


def test_qwen_bailian_records_are_detected(tmp_path: Path) -> None:
    record = {"chat_id": 7, "parent_chat_id": -1, "timestamp": 1.5, "input_length": 40,
              "output_length": 9, "type": "text", "turn": 1, "hash_ids": [3, 4, 5]}  # fmt: skip
    trace = read_trace(write_lines(tmp_path / "q.jsonl", [record, "", {**record, "turn": 2}]))
    assert (trace.format, trace.block_tokens, trace.references) == ("qwen-bailian", 16, 6)
    assert trace.requests[0].hash_ids == (3, 4, 5) and trace.requests[0].timestamp == 1.5


MOONCAKE = {"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [1]}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ({"timestamp": 0, "input_length": 1, "hash_ids": [1]}, "missing field"),
        ({**MOONCAKE, "hash_ids": [1, "2"]}, "hash_ids"),
        ({**MOONCAKE, "timestamp": "noon"}, "timestamp"),
    ],
)
def test_malformed_lines_name_their_line(tmp_path: Path, bad_line: object, message: str) -> None:
    path = write_lines(tmp_path / "t.jsonl", [MOONCAKE, MOONCAKE, bad_line])
    with pytest.raises(TraceError, match=rf"t.jsonl:3: .*{message}"):
        read_trace(path)


def test_unknown_or_unreadable_traces_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="neither"):
        read_trace(write_lines(tmp_path / "x.jsonl", [{"id": 1}]))
    with pytest.raises(TraceError, match="no requests"):
        read_trace(write_lines(tmp_path / "e.jsonl", [""]))
    with pytest.raises(TraceError, match="no such trace file"):
        read_trace(tmp_path / "missing.jsonl")
    with pytest.raises(TraceError, match="unknown trace format"):
        read_trace(TRACE, fmt="csv")


# ---------------------------------------------------------------------- the optimum
def brute_force_hits(refs: list[int], capacity: int) -> int:
    """The most hits any eviction choice gives when every missed block is inserted."""
    best = 0

    def walk(i: int, cached: frozenset[int], hits: int) -> None:
        nonlocal best
        if hits + (len(refs) - i) <= best:
            return
        if i == len(refs):
            best = max(best, hits)
            return
        block = refs[i]
        if block in cached:
            walk(i + 1, cached, hits + 1)
        elif len(cached) < capacity:
            walk(i + 1, cached | {block}, hits)
        else:
            for victim in cached:
                walk(i + 1, (cached - {victim}) | {block}, hits)

    walk(0, frozenset(), 0)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_belady_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    refs = [rng.randrange(rng.randint(2, 6)) for _ in range(rng.randint(1, 12))]
    capacity = rng.randint(1, 3)
    assert belady_hits(refs, capacity) == brute_force_hits(refs, capacity)
    assert ceiling_hits(refs) == brute_force_hits(refs, len(refs))


# ---------------------------------------------------------------------- known figures
@pytest.mark.parametrize(
    ("fraction", "lru", "opt"),
    [(0.01, 0.0523, 0.2463), (0.05, 0.1954, 0.3664), (0.10, 0.2784, 0.3664),
     (0.25, 0.3535, 0.3664)],
)  # fmt: skip
def test_lru_and_opt_give_the_known_figures(fraction: float, lru: float, opt: float) -> None:
    trace = conversation()
    blocks = capacity_blocks(trace, fraction)
    result = replay_sizes_only(trace, ["cpu"], [blocks * 4096], "lru", 4096, fraction)
    assert round(result.block_hit_ratio, 4) == lru
    assert round(optimum(trace, blocks)[0], 4) == opt


# ---------------------------------------------------------------------- the tier view
@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
def test_exclusive_tier_hits_add_up_to_one_lru_of_their_summed_capacity(fraction: float) -> None:
    trace = conversation(3000)
    options = ReplayOptions(capacities=(fraction,), shares=(1.0, 2.0, 4.0), clean_copies=False)
    tiered = run_sweep(trace, options).results[0]
    assert all(tiered.block_hits) and tiered.counters["gpu"]["demotions_out"] > 0
    single = replay_sizes_only(
        trace, ["one"], [sum(tiered.capacities)], "lru", tiered.block_bytes, fraction
    )
    assert sum(tiered.block_hits) == sum(single.block_hits)
    assert sum(tiered.prefix_hits) == sum(single.prefix_hits)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
def test_clean_copies_trade_some_hits_for_fewer_disk_writes(fraction: float) -> None:
    trace = conversation(3000)
    runs = {
        copies: run_sweep(
            trace,
            ReplayOptions(capacities=(fraction,), shares=(1.0, 2.0, 4.0), clean_copies=copies),
        ).results[0]
        for copies in (False, True)
    }
    exclusive, copies = runs[False], runs[True]
    # The copies hold bytes the exclusive cascade spends on more keys: never more hits.
    assert sum(copies.block_hits) <= sum(exclusive.block_hits)
    assert copies.counters["disk"]["bytes_in"] < exclusive.counters["disk"]["bytes_in"]
    assert sum(tier["unwritten_demotions"] for tier in copies.counters.values()) > 0


@pytest.mark.parametrize("admission", [(), ("second_hit",), ("gpu=second_hit", "disk=second_hit")])
def test_real_mode_makes_the_same_decisions_as_sizes_only(admission: tuple[str, ...]) -> None:
    trace = conversation(60)
    common = {"capacities": (0.1,), "shares": (1.0, 1.0, 2.0), "bytes_per_token": 2,
              "admission": admission}  # fmt: skip
    real = run_sweep(trace, ReplayOptions(real=True, **common)).results[0]  # type: ignore[arg-type]
    sizes = run_sweep(trace, ReplayOptions(**common)).results[0]  # type: ignore[arg-type]
    assert real.wrong == 0
    assert real.block_hits == sizes.block_hits and real.prefix_hits == sizes.prefix_hits
    assert real.admission == sizes.admission
    counters = ("hits", "evictions", "demotions_in", "promotions_in", "drops", "bytes_in",
                "admission_rejects")  # fmt: skip
    for tier in ("gpu", "cpu", "disk"):
        for counter in counters:
            assert real.counters[tier][counter] == sizes.counters[tier][counter], (tier, counter)
    if admission:
        assert sizes.counters["disk"]["admission_rejects"] > 0


def test_a_policy_per_tier_gives_each_tier_its_evictor() -> None:
    trace = conversation(3000)
    policies = ("lru", "lru/lru", "prefix", "prefix/prefix", "lru/prefix")
    options = ReplayOptions(capacities=(0.05,), shares=(1.0, 4.0), policies=policies)
    runs = {r.policy: (r.block_hits, r.prefix_hits) for r in run_sweep(trace, options).results}
    assert runs["lru/lru"] == runs["lru"] and runs["prefix/prefix"] == runs["prefix"]
    assert runs["lru/prefix"] not in (runs["lru"], runs["prefix"])
    # the real store builds the same evictor per tier as the simulation
    common = {"capacities": (0.1,), "shares": (1.0, 1.0, 2.0), "bytes_per_token": 2,
              "policies": ("lru/prefix/s3fifo",)}  # fmt: skip
    real = run_sweep(conversation(60), ReplayOptions(real=True, **common)).results[0]  # type: ignore[arg-type]
    sizes = run_sweep(conversation(60), ReplayOptions(**common)).results[0]  # type: ignore[arg-type]
    assert real.wrong == 0 and real.block_hits == sizes.block_hits
    for tier in ("gpu", "cpu", "disk"):
        for counter in ("hits", "evictions", "demotions_in", "promotions_in", "drops"):
            assert real.counters[tier][counter] == sizes.counters[tier][counter], (tier, counter)


def test_blocks_put_without_positions_change_only_position_aware_policies() -> None:
    trace = conversation(3000)
    runs = {
        (policy, positions): sizes_only_hits(trace, policy, positions)
        for policy in ("lru", "prefix")
        for positions in (True, False)
    }
    assert runs["lru", True] == runs["lru", False]
    assert runs["prefix", True] != runs["prefix", False]
    common = {"capacities": (0.1,), "shares": (1.0, 1.0, 2.0), "bytes_per_token": 2,
              "policies": ("prefix",), "positions": False}  # fmt: skip
    # the real store gets the blocks without positions too (on a trace where they matter)
    chat = synthetic_trace(SyntheticSpec(requests=150, sessions=30))
    real = run_sweep(chat, ReplayOptions(real=True, **common)).results[0]  # type: ignore[arg-type]
    sizes = run_sweep(chat, ReplayOptions(**common)).results[0]  # type: ignore[arg-type]
    assert real.wrong == 0 and real.block_hits == sizes.block_hits
    assert real.prefix_hits == sizes.prefix_hits
    placed = run_sweep(chat, replace(ReplayOptions(**common), positions=True)).results[0]  # type: ignore[arg-type]
    assert placed.block_hits != sizes.block_hits


def sizes_only_hits(trace: Trace, policy: str, positions: bool) -> tuple[int, int]:
    options = ReplayOptions(capacities=(0.02,), policies=(policy,), positions=positions)
    result = run_sweep(trace, options).results[0]
    return sum(result.block_hits), sum(result.prefix_hits)


def test_a_policy_per_tier_is_checked_before_any_replay(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert tier_policies("prefix", 3) == ["prefix"] * 3
    assert tier_policies("lru/prefix", 2) == ["lru", "prefix"]
    with pytest.raises(ConfigError, match=r"names 2 evictors for a cascade of 3 tier\(s\)"):
        tier_policies("lru/prefix", 3)
    with pytest.raises(ConfigError, match="unknown evictor 'nope'; known: arc, "):
        tier_policies("lru/nope", 2)
    args = ["replay", str(TRACE), "--limit", "50", "--policies", "lru,lru/prefix", "--no-progress"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "names 2 evictors for a cascade of 1 tier(s)" in captured.err
    assert "prefix hit" not in captured.out  # refused before the lru replay printed a table


# ---------------------------------------------------------------------- the command
def test_replay_command_writes_table_csv_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_csv, out_png = tmp_path / "r.csv", tmp_path / "r.png"
    args = ["replay", str(TRACE), "--limit", "500", "--capacities", "0.05,0.2", "--split",
            "1,3", "--csv", str(out_csv), "--plot", str(out_png), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "sizes-only mode" in table and "cpu hit" in table and "disk read GiB" in table
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["capacity_fraction"], r["tier"]) for r in rows] == [
        ("0.05", "cpu"), ("0.05", "disk"), ("0.05", "*"),
        ("0.2", "cpu"), ("0.2", "disk"), ("0.2", "*"),
    ]  # fmt: skip
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "none.jsonl")]) == 2
    assert "no such trace file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["replay", str(TRACE), "--capacities", "0.1,zero"])
    assert main(["replay", str(TRACE), "--limit", "5", "--capacities", "0.001"]) == 2
    assert "every tier needs at least one block" in capsys.readouterr().err
