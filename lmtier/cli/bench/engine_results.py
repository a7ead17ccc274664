"""What ``lmtier bench --engine`` reports: the modes, one mode's figures in one run (from its
engine process's RESULT, or two processes' for the shared mode), and the table over runs."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmtier.cli.bench.core import layout

__all__ = [
    "MODES",
    "ModeResult",
    "format_results",
    "identical",
    "mode_result",
    "shared_result",
    "stall_lines",
]

#: (key, name) of each mode, in the order they run.
MODES = (
    ("alone", "vLLM alone"),
    ("cpu", "+ vLLM's CPU tier"),
    ("cold", "+ lmtier disk (cold)"),
    ("warm", "new engine on lmtier's folder (warm)"),
    ("served-cold", "+ lmtier serve (cold)"),
    ("served-warm", "new engine, same lmtier serve (warm)"),
    ("shared", "two engines sharing one lmtier serve"),
)


@dataclass
class ModeResult:
    """One mode's figures in one run."""

    cached: int = 0
    prompt_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    wall: float = 0.0
    tokens: list[list[int]] = field(default_factory=list)
    stall: dict[str, float] = field(default_factory=dict)
    tier: dict[str, Any] | None = None
    steps: dict[str, float] = field(default_factory=dict)  # the engine thread's, in lmtier
    long_calls: dict[str, list[float]] = field(default_factory=dict)  # count, longest, its CPU
    copies: dict[str, float] = field(default_factory=dict)  # the KV <-> CPU tier copy jobs

    @property
    def hit_ratio(self) -> float:
        return self.cached / max(self.prompt_tokens, 1)


def mode_result(raw: dict[str, Any]) -> ModeResult:
    runs = raw["runs"]
    return ModeResult(
        cached=sum(r["cached"] for r in runs),
        prompt_tokens=sum(r["prompt"] for r in runs),
        ttft=[r["ttft"] for r in runs],
        wall=raw["wall"],
        tokens=[r["tokens"] for r in runs],
        stall=raw["stall"],
        tier=raw["tier"],
        steps=raw.get("lmtier_step", {}),
        copies=raw.get("copies", {}),
        long_calls=raw.get("long_calls", {}),
    )


def shared_result(halves: list[dict[str, Any]]) -> ModeResult:
    """Two engines' results as one mode: requests back in trace order (even, odd), the wall
    of the slower, the worse stall, the tiers' times summed and each one's shared hits."""
    runs: list[dict[str, Any]] = [{}] * sum(len(half["runs"]) for half in halves)
    for first, half in enumerate(halves):
        runs[first::2] = half["runs"]
    tiers = [half["tier"] or {} for half in halves]
    tier = {key: sum(t.get(key, 0) for t in tiers) for key in ("stored", "loaded", "call_s",
                                                               "load_job_s")}  # fmt: skip
    tier["shared_hits_each"] = [t.get("shared_hits", 0) for t in tiers]

    def worst(key: str) -> dict[str, float]:
        return max((half.get(key, {}) for half in halves), key=lambda s: s.get("p99_ms", 0.0))

    copies = {"s": sum(half.get("copies", {}).get("s", 0.0) for half in halves)}
    wall = max(half["wall"] for half in halves)
    long_calls = _long_calls([half.get("long_calls", {}) for half in halves])
    return mode_result({"runs": runs, "wall": wall, "stall": worst("stall"), "tier": tier,
                        "lmtier_step": worst("lmtier_step"),
                        "copies": {**worst("copies"), **copies},
                        "long_calls": long_calls})  # fmt: skip


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _spread(values: Sequence[float], text: Callable[[float], str]) -> str:
    """The median of ``values``, and their range when there are several."""
    middle = text(statistics.median(values))
    if len(values) < 2 or min(values) == max(values):
        return middle
    return f"{middle} ({text(min(values))}-{text(max(values))})"


def identical(result: ModeResult, alone: ModeResult) -> bool:
    return bool(result.tokens) and result.tokens == alone.tokens


def format_results(runs: Sequence[dict[str, ModeResult]]) -> str:
    """The table over one or several runs: medians, with ranges (min-max) over several."""
    head = ["mode", "cached tokens", "hit ratio", "TTFT p50 ms", "TTFT p90 ms", "wall s",
            "wall vs alone", "tokens = alone", "in lmtier calls s", "load jobs s",
            "lmtier per step p99 ms", "stall p99 ms (alone)"]  # fmt: skip
    table = [head]
    for mode, name in MODES:
        results = [run[mode] for run in runs]
        alone = [run["alone"] for run in runs]
        tiers = [r.tier for r in results if r.tier is not None]
        same = all(identical(r, a) for r, a in zip(results, alone, strict=True))
        table.append([
            name,
            _spread([r.cached for r in results], lambda v: f"{v:,.0f}"),
            _spread([r.hit_ratio for r in results], lambda v: f"{v:.3f}"),
            _spread([_quantile(r.ttft, 0.5) * 1000 for r in results], lambda v: f"{v:.0f}"),
            _spread([_quantile(r.ttft, 0.9) * 1000 for r in results], lambda v: f"{v:.0f}"),
            _spread([r.wall for r in results], lambda v: f"{v:.1f}"),
            _spread([r.wall / a.wall for r, a in zip(results, alone, strict=True)],
                    lambda v: f"{v:.2f}x"),
            "yes" if same else "NO",
            _spread([t["call_s"] for t in tiers], lambda v: f"{v:.2f}") if tiers else "",
            _spread([t["load_job_s"] for t in tiers], lambda v: f"{v:.2f}") if tiers else "",
            "" if mode == "alone" else
            _spread([r.steps.get("p99_ms", 0.0) for r in results], lambda v: f"{v:.3f}"),
            _spread([r.stall.get("p99_ms", 0.0) for r in results], lambda v: f"{v:.2f}")
            + ("" if mode == "alone" else
               f" ({statistics.median(a.stall.get('p99_ms', 0.0) for a in alone):.2f})"),
        ])  # fmt: skip
    shared = [run["shared"].tier for run in runs if run["shared"].tier is not None]
    each = [t["shared_hits_each"] for t in shared]
    lines = [layout(table)]
    if each:
        lines.append(
            "two engines sharing one lmtier serve: blocks each engine found that the other "
            "stored: " + "; ".join(f"{a:,} and {b:,}" for a, b in each)
        )
    return "\n".join(lines)


def _long_calls(each: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Long calls over several processes or runs: counts summed, the longest of all."""
    merged: dict[str, list[float]] = {}
    for calls in each:
        for name, (count, longest, cpu) in calls.items():
            total, top, top_cpu = merged.get(name, [0, 0.0, 0.0])
            merged[name] = [total + count, *max((top, top_cpu), (longest, cpu))]
    return merged


def _quantile_text(figures: Sequence[dict[str, float]], digits: int) -> str:
    """``p50, p99, max`` of ``figures`` (a quantiles_ms summary per run), medians over runs."""
    p50, p99, worst = (
        statistics.median(f.get(k, 0.0) for f in figures) for k in ("p50_ms", "p99_ms", "max_ms")
    )
    return f"p50 {p50:.3f}, p99 {p99:.{digits}f}, max {worst:.{digits - 1}f}"


def stall_lines(runs: Sequence[dict[str, ModeResult]]) -> str:
    """Per mode (medians over the runs): the stall probe's lateness, p50, p99 and max; and
    the engine thread's time inside the tier's methods per engine step, p50, p99 and max."""
    lines = ["stall probe (a 1 ms sleep in a thread of the engine process; lateness, ms):"]
    for mode, name in MODES:
        lines.append(f"  {name}: {_quantile_text([run[mode].stall for run in runs], 2)}")
    lines.append(
        "the engine thread's time inside lmtier per engine step (its secondary tier and its "
        "copies between vLLM's KV and CPU tier, ms):"
    )
    for mode, name in MODES[1:]:
        steps = [run[mode].steps for run in runs]
        count = statistics.median(s.get("samples", 0) for s in steps)
        lines.append(f"  {name}: {_quantile_text(steps, 3)} ({count:,.0f} steps)")
    lines.append(
        "lmtier's calls on the engine's thread over 1 ms, all runs (how many; the longest, ms; "
        "the CPU time it took, ms: the rest it waited for a core or the interpreter's lock):"
    )
    for mode, name in MODES[1:]:
        calls = _long_calls([run[mode].long_calls for run in runs])
        text = "; ".join(f"{call} {count:.0f}, {top:.1f}, {cpu:.2f}"
                         for call, (count, top, cpu) in sorted(calls.items()))  # fmt: skip
        lines.append(f"  {name}: {text or 'none'}")
    lines.append("copy jobs between vLLM's KV and its CPU tier (all jobs' seconds; per job, ms):")
    for mode, name in MODES[1:]:
        copies = [run[mode].copies for run in runs]
        total = statistics.median(c.get("s", 0.0) for c in copies)
        lines.append(f"  {name}: {total:.2f} s; {_quantile_text(copies, 1)}")
    return "\n".join(lines)
