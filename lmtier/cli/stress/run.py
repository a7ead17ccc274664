"""Tier-spill stress: many tasks overfill every tier, then every entry is checked bit-exact."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmtier.config import MB, StoreConfig, TierConfig
from lmtier.errors import LmtierError
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike
from lmtier.store import TieredStore

__all__ = [
    "StressOptions",
    "StressReport",
    "default_stress_config",
    "pattern_tensor",
    "run_shared_stress",
    "run_stress",
    "shared_stress_config",
    "split_evenly",
    "unreached_tiers",
    "with_policy",
]

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
    # Shared keys: every task works on one key space of ``keys_per_task`` keys, overwriting
    # and deleting the others' entries, and gives up on ``cancel_fraction`` of its calls.
    shared_keys: bool = False
    cancel_fraction: float = 0.2
    rounds: int = 4  # quiescent points where every key is read and the model resettles
    audit_every: int = 50  # ops between audits while running

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
        if not 0 <= self.cancel_fraction <= 1:
            raise ValueError("cancel_fraction must be between 0 and 1")
        if self.rounds <= 0 or self.audit_every <= 0:
            raise ValueError("rounds and audit_every must be > 0")

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
    # Counted by the shared-keys mode (each also adds to ``problems`` except where noted).
    shared: bool = False
    wrong_reads: int = 0
    audits: int = 0
    audit_failures: int = 0
    budget_breaches: int = 0
    raw_exceptions: int = 0
    lmtier_errors: int = 0  # errors from lmtier.errors: reported, not a failure
    illegal_puts: int = 0  # reported, not a failure
    cancelled: int = 0
    # Gets given a timeout that returned a miss instead of raising TimeoutError; not checked
    # against the model (a miss seen only this way is under investigation), not a failure.
    timed_misses: int = 0
    # Misses while a tier's storage was down or failing (the quiet read-backs still check the
    # key): not a failure.
    unavailable_misses: int = 0
    warnings: list[str] = field(default_factory=list)  # printed, not a failure

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


def shared_stress_config(root: Path) -> StoreConfig:
    """Budgets small enough that a shared key space of 64 entries spills through every tier."""
    return StoreConfig(
        tiers=(
            TierConfig("gpu", "memory", MB // 2, device="cuda"),
            TierConfig("cpu", "memory", MB),
            TierConfig("disk", "disk", 2 * MB, path=str(root)),
        )
    )


def with_policy(
    config: StoreConfig, policy: str | None = None, admission: str | None = None
) -> StoreConfig:
    """``config`` with every tier's evictor set to ``policy``, and every tier below the first
    admitting by ``admission`` (each left as configured when ``None``)."""
    tiers = []
    for index, tier in enumerate(config.tiers):
        if policy is not None:
            tier = dataclasses.replace(tier, evictor=policy)
        if admission is not None and index > 0:
            tier = dataclasses.replace(tier, admission=admission)
        tiers.append(tier)
    return dataclasses.replace(config, tiers=tuple(tiers))


def unreached_tiers(store: TieredStore) -> list[str]:
    """The tiers into which no entry was ever put or demoted since the store opened."""
    return [t.name for t in store.tiers if t.counters.puts + t.counters.demotions_in == 0]


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` divided into ``parts`` whole shares that differ by at most one and sum to it."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


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


async def run_stress(
    store: TieredStore, options: StressOptions, report: StressReport | None = None
) -> StressReport:
    """Drive ``store`` with ``options``; the report's ``problems`` lists every failed check.

    ``report``, when given, is the one filled (a caller that cancels the run keeps its partial
    counts; the store's stats are in it however the run ends).
    """
    report = StressReport() if report is None else report
    clock = 0  # a logical time: drops after a key's last put explain a miss
    dropped_at: dict[KeyLike, int] = {}
    expected: dict[str, tuple[int, int, int] | None] = {}  # key -> (version, tokens, put time)
    store._on_drop = lambda key: dropped_at.__setitem__(key, clock)
    per_task = split_evenly(options.ops, options.tasks)
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

    async def worker(task: int, bar: tqdm[Any]) -> None:
        nonlocal clock
        rng = random.Random(options.seed * 1_000_003 + task)
        keys = [f"stress/{task}/{i}" for i in range(options.keys_per_task)]
        for op in range(per_task[task]):
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
    try:
        with _bar(options, options.ops, "stress", "op") as bar:
            await asyncio.gather(*(worker(task, bar) for task in range(options.tasks)))
        with _bar(options, len(expected), "verify", "key") as bar:
            for key in list(expected):  # read everything back
                check(key, await store.get(key))
                bar.update()
        report.problems.extend(store.audit())
    finally:
        report.seconds = time.perf_counter() - started
        report.stats = store.stats()
    return report


def _bar(options: StressOptions, total: int, desc: str, unit: str) -> tqdm[Any]:
    """A progress bar in the style of every long phase; off unless ``options.progress``."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not options.progress)


@dataclass
class _Call:
    """A put (``version``) or delete (``version`` None) of one key, as the model sees it."""

    version: int | None
    start: int
    end: int | None = None  # None while in flight, and for good once cancelled or failed


async def run_shared_stress(
    store: TieredStore, options: StressOptions, report: StressReport | None = None
) -> StressReport:
    """Tasks on one shared key space: overwrites, deletes and cancelled calls, checked soundly.

    For each key the model keeps the calls whose value may be the key's current one: every
    call in flight, cancelled or failed (a put whose caller gave up may still land), and every
    call that returned, unless another call that returned began after it ended.  A read must
    return a value of one of those calls or of a put that began while the read ran; a miss
    must be allowed by a delete among them, a put of the key in flight (the store reports a
    drop only once no put of the key is in flight) or a drop since the oldest of them.
    Between rounds the store goes quiet, every key is read, and the model resettles on what
    was read.  Audits run every ``audit_every`` ops and at each quiet point.  ``report``, when
    given, is the one filled, as with ``run_stress``.
    """
    report = StressReport() if report is None else report
    report.shared = True
    clock = 0
    versions = 0
    dropped_at: dict[KeyLike, int] = {}
    keys = [f"shared/{i}" for i in range(options.keys_per_task)]
    calls: dict[str, list[_Call]] = {key: [_Call(None, 0, 0)] for key in keys}
    started_puts: dict[str, dict[int, tuple[int, int]]] = {key: {} for key in keys}
    audit_messages: set[str] = set()
    store._on_drop = lambda key: dropped_at.__setitem__(key, clock)
    deadline = None if options.duration_s is None else time.perf_counter() + options.duration_s

    def storage_failures() -> int:
        return sum(t.counters.unavailable + t.counters.errors for t in store.tiers)

    def tick() -> int:
        nonlocal clock
        clock += 1
        return clock

    def audit() -> None:
        report.audits += 1
        problems = store.audit()
        if problems:
            report.audit_failures += 1
            for problem in problems:
                if len(audit_messages) < 20 and problem not in audit_messages:
                    audit_messages.add(problem)

    def returned(key: str, call: _Call) -> None:
        """A call that took effect returned: calls that ended before it began are overwritten."""
        call.end = tick()
        calls[key] = [c for c in calls[key] if c.end is None or c.end >= call.start]

    def matches(key: str, got: torch.Tensor, version: int) -> bool:
        tokens = started_puts[key][version][0]
        return _same_bytes(got, pattern_tensor(key, version, tokens))

    def check(
        key: str, got: torch.Tensor | None, since: int, allowed: list[_Call], quiet: bool = False
    ) -> bool:
        """Whether a read that began at ``since`` may return ``got``."""
        if got is None:
            if any(c.version is None for c in allowed):
                return True
            if not quiet and any(c.end is None or c.end >= since for c in allowed):
                # A put in flight at any moment of the read explains a miss: an overwrite in a
                # full tier takes the older value out before the new one lands, and the store
                # holds back a drop of a key while a put of it is in flight.
                return True
            oldest = min((c.start for c in allowed), default=0)
            if dropped_at.get(key, -1) >= oldest:
                report.dropped += 1
                return True
            holder = next((t for t in store.tiers if t.lookup(key) is not None), None)
            if holder is not None and not holder.stats().get("available", True):
                report.unavailable_misses += 1  # held by a tier whose server is down
                return True
            where = "no tier" if holder is None else f"tier {holder.name}"
            report.problems.append(
                f"{key}: lost (no delete or drop explains a miss; {where} holds it"
                f"{', quiet' if quiet else ''})"
            )
            return False
        got = got.cpu()
        candidates = {c.version for c in allowed if c.version is not None}
        candidates.update(v for v, (_, start) in started_puts[key].items() if start > since)
        if any(matches(key, got, version) for version in candidates):
            report.verified += 1
            return True
        report.wrong_reads += 1
        if report.wrong_reads <= 20:
            written = [v for v in started_puts[key] if matches(key, got, v)]
            legal = sorted(candidates)
            report.problems.append(
                f"{key}: read a value that no legal call wrote (it is version {written}; "
                f"the legal ones: {legal})"
            )
        return False

    async def call(coro: Any, cancel: bool, rng: random.Random) -> Any:
        """``coro``'s result; raises TimeoutError when this call gives up on it."""
        if not cancel:
            return await coro
        return await asyncio.wait_for(coro, timeout=rng.uniform(0.0, 0.002))

    async def worker(task: int, round_: int, count: int, bar: tqdm[Any]) -> None:
        nonlocal versions
        rng = random.Random((options.seed * 1_000_003 + task) * 101 + round_)
        for _ in range(count):
            if deadline is not None and time.perf_counter() > deadline:
                break
            key = rng.choice(keys)
            roll = rng.random()
            cancel = rng.random() < options.cancel_fraction
            began = time.perf_counter()
            try:
                if roll < options.delete_fraction:
                    record = _Call(None, tick())
                    calls[key].append(record)
                    await call(store.delete(key), cancel, rng)
                    returned(key, record)
                elif roll < options.delete_fraction + options.get_fraction:
                    since = tick()
                    allowed = list(calls[key])
                    failures = storage_failures()
                    got = await call(store.get(key), cancel, rng)
                    failing = storage_failures() != failures
                    report.get_latencies.append(time.perf_counter() - began)
                    allowed += [c for c in calls[key] if c not in allowed]
                    if got is None and cancel:
                        # A get given a timeout that answered a miss rather than TimeoutError:
                        # counted apart (see StressReport), the quiet reads check the key.
                        report.timed_misses += 1
                    elif got is None and failing:
                        report.unavailable_misses += 1  # a tier's storage failed meanwhile
                    else:
                        check(key, got, since, allowed)
                else:
                    versions += 1
                    version = versions
                    tokens = options.draw_tokens(rng)
                    record = _Call(version, tick())
                    started_puts[key][version] = (tokens, record.start)
                    calls[key].append(record)
                    status = await call(
                        store.put(key, pattern_tensor(key, version, tokens)), cancel, rng
                    )
                    report.put_latencies.append(time.perf_counter() - began)
                    if status is PutStatus.LEGAL:
                        returned(key, record)
                    else:
                        report.illegal_puts += 1
                        calls[key].remove(record)
            except TimeoutError:
                report.cancelled += 1
            except LmtierError:
                report.lmtier_errors += 1  # a clean refusal (e.g. storage trouble): counted
            except Exception as exc:
                report.raw_exceptions += 1
                if report.raw_exceptions <= 20:
                    report.problems.append(f"{key}: raw {type(exc).__name__}: {exc}")
            for tier in store.tiers:
                if tier.resident_bytes > tier.budget:
                    report.budget_breaches += 1
                    report.problems.append(
                        f"tier {tier.name}: {tier.resident_bytes} bytes over budget {tier.budget}"
                    )
            report.ops += 1
            if report.ops % options.audit_every == 0:
                audit()
            bar.update()

    async def settle() -> None:
        """Wait for the store to go quiet, read every key, resettle the model on the reads."""
        while store._tasks or store._active:
            if store._tasks:
                await asyncio.gather(*list(store._tasks), return_exceptions=True)
            else:
                await asyncio.sleep(0.001)
        audit()
        for key in keys:
            since = tick()
            got = await store.get(key)
            allowed = list(calls[key])
            now = tick()
            if not check(key, got, since, allowed, quiet=True):
                calls[key] = [_Call(None, now, now)]
                continue
            version = None
            # A read may return a value whose entry is dropped meanwhile (its promotion's room
            # was made by evicting it below): the key is gone from then on.
            if got is not None and dropped_at.get(key, -1) < since:
                cpu = got.cpu()
                candidates = [c.version for c in allowed if c.version is not None]
                version = next(v for v in candidates if matches(key, cpu, v))
            calls[key] = [_Call(version, now, now)]
        audit()

    started = time.perf_counter()
    try:
        with _bar(options, options.ops, "stress", "op") as bar:
            for round_, round_ops in enumerate(split_evenly(options.ops, options.rounds)):
                shares = split_evenly(round_ops, options.tasks)
                await asyncio.gather(
                    *(worker(task, round_, shares[task], bar) for task in range(options.tasks))
                )
                await settle()
    finally:
        report.seconds = time.perf_counter() - started
        if report.audit_failures:
            report.problems.append(f"{report.audit_failures} of {report.audits} audits failed:")
            report.problems.extend(f"audit: {m}" for m in sorted(audit_messages))
        report.stats = store.stats()
    return report


def format_report(report: StressReport, interrupted: bool = False) -> str:
    """The per-tier table, throughput and latency, and the verdict (none for a run that was
    ``interrupted``: its counts are partial and its entries were not all read back)."""
    tiers = report.stats.get("tiers", {})
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
    if report.shared:
        lines.append(
            f"shared keys: wrong reads {report.wrong_reads}; audit failures "
            f"{report.audit_failures} of {report.audits}; budget breaches "
            f"{report.budget_breaches}; raw exceptions {report.raw_exceptions}; lmtier errors "
            f"{report.lmtier_errors}; ILLEGAL puts {report.illegal_puts}; cancelled calls "
            f"{report.cancelled}; misses of gets given a timeout {report.timed_misses}; "
            f"misses while a tier was down {report.unavailable_misses}"
        )
    lines.extend(f"warning: {w}" for w in report.warnings)
    if interrupted:
        lines.append(f"interrupted after {report.ops} ops: the counts above are partial")
        lines.extend(f"  - {p}" for p in report.problems[:20])
    elif report.ok:
        lines.append("OK: no wrong or lost entry, accounting exact, budgets held")
    else:
        lines.append(f"FAILED: {len(report.problems)} problem(s)")
        lines.extend(f"  - {p}" for p in report.problems[:20])
    return "\n".join(lines)


def _ms(samples: list[float], percentile: int) -> str:
    if len(samples) < 2:
        return "n/a"
    return f"{statistics.quantiles(samples, n=100)[percentile - 1] * 1e3:.2f} ms"
