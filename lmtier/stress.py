"""Tier-spill stress: many tasks overfill every tier, then every entry is checked bit-exact."""

from __future__ import annotations

import asyncio
import hashlib
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lmtier.config import MB, StoreConfig, TierConfig
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike
from lmtier.store import TieredStore

__all__ = ["StressOptions", "StressReport", "default_stress_config", "pattern_tensor", "run_stress"]

# KV-chunk-like entries: [2 (K and V), tokens, 128 hidden] in bf16, 512 B per token.
HIDDEN = 128


@dataclass(frozen=True)
class StressOptions:
    tasks: int = 32
    ops: int = 6000
    keys_per_task: int = 64
    min_tokens: int = 16
    max_tokens: int = 256
    seed: int = 0
    # Fractions of ops after a task's first fill; the rest are puts.
    get_fraction: float = 0.4
    delete_fraction: float = 0.05
    # "uniform" between min and max tokens, or "lognormal" (many small, a few large entries)
    size_distribution: str = "uniform"
    duration_s: float | None = None  # stop after this long even if ops remain
    progress: bool = True

    def __post_init__(self) -> None:
        if (
            not 0 <= self.get_fraction + self.delete_fraction <= 1
            or min(self.get_fraction, self.delete_fraction) < 0
        ):
            raise ValueError("get and delete fractions must be >= 0 and sum to at most 1")
        if self.size_distribution not in ("uniform", "lognormal"):
            raise ValueError(f"unknown size distribution {self.size_distribution!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")

    def draw_tokens(self, rng: random.Random) -> int:
        if self.size_distribution == "uniform":
            return rng.randint(self.min_tokens, self.max_tokens)
        # median at a quarter of the range, a long tail up to max_tokens
        median = self.min_tokens + (self.max_tokens - self.min_tokens) / 4
        return int(min(self.max_tokens, max(self.min_tokens, rng.lognormvariate(0, 0.8) * median)))


@dataclass
class StressReport:
    ops: int = 0
    seconds: float = 0.0
    verified: int = 0
    dropped: int = 0
    problems: list[str] = field(default_factory=list)
    put_latencies: list[float] = field(default_factory=list)
    get_latencies: list[float] = field(default_factory=list)
    stats: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def default_stress_config(root: Path) -> StoreConfig:
    """Small budgets so that every tier spills within seconds; the gpu tier needs CUDA."""
    return StoreConfig(
        tiers=(
            TierConfig("gpu", "memory", 8 * MB, device="cuda"),
            TierConfig("cpu", "memory", 16 * MB),
            TierConfig("disk", "disk", 64 * MB, path=str(root)),
        )
    )


def pattern_tensor(key: str, version: int, tokens: int) -> torch.Tensor:
    """Content that only ``(key, version)`` produces, so any wrong or stale read shows."""
    seed = int.from_bytes(hashlib.blake2b(f"{key}#{version}".encode(), digest_size=8).digest())
    numel = 2 * tokens * HIDDEN
    words = torch.arange(numel, dtype=torch.int64).mul_(0x9E3779B1).add_(seed)
    return words.to(torch.int16).view(torch.bfloat16).reshape(2, tokens, HIDDEN)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bf16 patterns hold NaNs, which never compare equal as floats.
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.view(torch.int16), b.view(torch.int16))
    )


async def run_stress(store: TieredStore, options: StressOptions) -> StressReport:
    """Drive ``store`` with ``options``; the report's ``problems`` lists every failed check."""
    report = StressReport()
    clock = 0  # a logical time: drops after a key's last put explain a miss
    dropped_at: dict[KeyLike, int] = {}
    expected: dict[str, tuple[int, int, int] | None] = {}  # key -> (version, tokens, put time)
    store._on_drop = lambda key: dropped_at.__setitem__(key, clock)
    bar = tqdm(total=options.ops, desc="stress", unit="op", disable=not options.progress)
    per_task = options.ops // options.tasks
    deadline = None if options.duration_s is None else time.perf_counter() + options.duration_s

    def check(key: str, got: torch.Tensor | None) -> None:
        state = expected.get(key)
        if state is None:
            if got is not None:
                report.problems.append(f"{key}: deleted or never stored, yet read back")
            return
        version, tokens, put_time = state
        if got is None:
            if dropped_at.get(key, -1) < put_time:
                report.problems.append(f"{key}: lost (not dropped since its last put)")
            else:
                report.dropped += 1
        elif not _same_bytes(got.cpu(), pattern_tensor(key, version, tokens)):
            report.problems.append(f"{key}: wrong bytes (version {version})")
        else:
            report.verified += 1

    async def worker(task: int) -> None:
        nonlocal clock
        rng = random.Random(options.seed * 1_000_003 + task)
        keys = [f"stress/{task}/{i}" for i in range(options.keys_per_task)]
        for op in range(per_task):
            if deadline is not None and time.perf_counter() > deadline:
                break
            key = keys[op] if op < len(keys) else rng.choice(keys)
            roll = 1.0 if op < len(keys) else rng.random()
            clock += 1
            started = time.perf_counter()
            if roll < options.delete_fraction:
                await store.delete(key)
                expected[key] = None
            elif roll < options.delete_fraction + options.get_fraction:
                got = await store.get(key)
                report.get_latencies.append(time.perf_counter() - started)
                check(key, got)
            else:
                tokens = options.draw_tokens(rng)
                put_time = clock
                status = await store.put(key, pattern_tensor(key, op, tokens))
                report.put_latencies.append(time.perf_counter() - started)
                if status is PutStatus.LEGAL:
                    expected[key] = (op, tokens, put_time)
            for tier in store.tiers:
                if tier.resident_bytes > tier.budget:
                    report.problems.append(
                        f"tier {tier.name}: {tier.resident_bytes} bytes over budget {tier.budget}"
                    )
            report.ops += 1
            bar.update()

    started = time.perf_counter()
    await asyncio.gather(*(worker(task) for task in range(options.tasks)))
    bar.close()
    for key in list(expected):  # read everything back
        check(key, await store.get(key))
    report.seconds = time.perf_counter() - started
    report.problems.extend(store.audit())
    report.stats = store.stats()
    return report


def format_report(report: StressReport) -> str:
    """The per-tier table, throughput and latency, and the verdict."""
    tiers = report.stats["tiers"]
    assert isinstance(tiers, dict)
    columns = [
        "entries", "resident_bytes", "budget_bytes", "hits", "misses", "puts", "evictions",
        "demotions_in", "demotions_out", "promotions_in", "promotions_out", "drops", "corrupt",
        "errors",
    ]  # fmt: skip
    names = {"resident_bytes": "resident MiB", "budget_bytes": "budget MiB"}
    header = ["tier"] + [names.get(c, c.replace("_", " ")) for c in columns]
    rows = [header]
    for name, values in tiers.items():
        rows.append(
            [name]
            + [f"{values[c] / MB:.1f}" if c.endswith("_bytes") else str(values[c]) for c in columns]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.append("")
    lines.append(
        f"{report.ops} ops in {report.seconds:.1f} s "
        f"({report.ops / max(report.seconds, 1e-9):,.0f} ops/s); "
        f"put p50 {_ms(report.put_latencies, 50)} p99 {_ms(report.put_latencies, 99)}; "
        f"get p50 {_ms(report.get_latencies, 50)} p99 {_ms(report.get_latencies, 99)}"
    )
    lines.append(f"verified bit-exact: {report.verified}; dropped by the cascade: {report.dropped}")
    if report.ok:
        lines.append("OK: no wrong or lost entry, accounting exact, budgets held")
    else:
        lines.append(f"FAILED: {len(report.problems)} problem(s)")
        lines.extend(f"  - {p}" for p in report.problems[:20])
    return "\n".join(lines)


def _ms(samples: list[float], percentile: int) -> str:
    if len(samples) < 2:
        return "n/a"
    return f"{statistics.quantiles(samples, n=100)[percentile - 1] * 1e3:.2f} ms"
