"""A replay sweep: every policy at every capacity, with OPT and the ceiling beside them."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmtier.admission import ADMISSION_POLICIES
from lmtier.cli.replay.capacity import plan_capacities
from lmtier.cli.replay.run import (
    ReplayResult,
    optimum,
    replay_real,
    replay_sizes_only,
    tier_policies,
)
from lmtier.cli.replay.traces import Trace
from lmtier.config import DiskTierSpec, StoreConfig, TierConfig, load_config
from lmtier.errors import ConfigError
from lmtier.store import TieredStore

__all__ = ["ReplayOptions", "SweepResult", "progress_label", "resolve_admission", "run_sweep"]

log = logging.getLogger(__name__)

# 8B-class model in bf16: 32 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes.
DEFAULT_BYTES_PER_TOKEN = 128 * 1024


@dataclass(frozen=True)
class ReplayOptions:
    capacities: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25)
    policies: tuple[str, ...] = ("lru",)
    shares: tuple[float, ...] = (1.0,)  # how the capacity divides among tiers, fastest first
    bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN
    real: bool = False
    promote_on_hit: bool = True
    clean_copies: bool = True  # False: exclusive tiers (see StoreConfig.clean_copies)
    positions: bool = True  # False: blocks put without their chain index, as the engines put them
    config: Path | None = None  # real mode: tier kinds and devices from here, budgets replaced
    progress: bool = False
    # Admission per tier: "POLICY" (the last tier) or "TIER=POLICY" items; other tiers admit all.
    admission: tuple[str, ...] = ()
    admission_window: int | None = None  # second_hit's memory in entries (default: 4x capacity)


@dataclass
class SweepResult:
    trace: Trace
    block_bytes: int
    results: list[ReplayResult]
    optimum: dict[float, tuple[float, float]]  # fraction -> (OPT, ceiling) block hit ratios
    skipped: list[str] = field(default_factory=list)  # one reason per capacity left out


def run_sweep(
    trace: Trace,
    options: ReplayOptions,
    on_skip: Callable[[str], None] | None = None,
    sweep: SweepResult | None = None,
) -> SweepResult:
    """Replay ``trace`` with every policy at every capacity it can use.

    A capacity the trace is too small for (a tier of no block) or too large for (its whole
    working set) is left out, its reason passed to ``on_skip`` (default: a logged warning)
    before any replay and listed in ``skipped``; ConfigError when none is left.
    ``sweep``, when given, is filled as the replays run (each result from its first
    reference on), so a caller interrupted midway holds partial counts.
    """
    for policy in options.policies:  # a bad name fails now, not after the first replays
        tier_policies(policy, len(options.shares))
    plan = plan_capacities(trace, options.capacities, options.shares)
    for problem in plan.skipped:
        if on_skip is None:
            log.warning("skipped: %s", problem)
        else:
            on_skip(problem)
    block_bytes = options.bytes_per_token * trace.block_tokens
    if sweep is None:
        sweep = SweepResult(trace, block_bytes, [], {})
    sweep.skipped = plan.skipped
    results, best = sweep.results, sweep.optimum
    for number, (fraction, per_tier) in enumerate(plan.usable, start=1):
        capacities = [n * block_bytes for n in per_tier]
        best[fraction] = optimum(trace, sum(per_tier))
        for index, policy in enumerate(options.policies, start=1):
            label = progress_label(
                (number, len(plan.usable)), fraction, (index, len(options.policies)), policy
            )
            if options.real:
                asyncio.run(
                    _real(trace, options, capacities, policy, block_bytes, fraction, label, results)
                )
            else:
                names = _default_names(len(capacities))
                replay_sizes_only(
                    trace, names, capacities, policy, block_bytes, fraction,
                    options.promote_on_hit, options.progress,
                    resolve_admission(options.admission, names), options.admission_window,
                    label=label, clean_copies=options.clean_copies, into=results,
                    positions=options.positions,
                )  # fmt: skip
    return sweep


def progress_label(
    capacity: tuple[int, int], fraction: float, policy: tuple[int, int], name: str
) -> str:
    """A replay's progress bar title: ``capacity 2/5 (10%), lru`` (``policy 1/3 lru`` when
    several policies are compared)."""
    which = f"policy {policy[0]}/{policy[1]} {name}" if policy[1] > 1 else name
    return f"capacity {capacity[0]}/{capacity[1]} ({fraction * 100:g}%), {which}"


def resolve_admission(items: Sequence[str], tier_names: Sequence[str]) -> list[str]:
    """Each tier's admission policy from ``POLICY`` (the last tier) and ``TIER=POLICY`` items."""
    policies = ["all"] * len(tier_names)
    for item in items:
        name, named, policy = item.rpartition("=")
        if policy not in ADMISSION_POLICIES:
            raise ConfigError(
                f"unknown admission policy {policy!r} in {item!r}; "
                f"known: {', '.join(ADMISSION_POLICIES)}"
            )
        if not named:
            policies[-1] = policy
        elif name in tier_names:
            policies[list(tier_names).index(name)] = policy
        else:
            raise ConfigError(f"admission {item!r}: no tier named {name!r}; tiers: {tier_names}")
    return policies


def _default_names(count: int) -> list[str]:
    return {1: ["cpu"], 2: ["cpu", "disk"], 3: ["gpu", "cpu", "disk"]}.get(
        count, [f"tier{i}" for i in range(count)]
    )


async def _real(
    trace: Trace,
    options: ReplayOptions,
    capacities: list[int],
    policy: str,
    block_bytes: int,
    fraction: float,
    label: str,
    into: list[ReplayResult],
) -> ReplayResult:
    with tempfile.TemporaryDirectory(prefix="lmtier-replay-") as folder:
        config = _real_config(options, capacities, policy, Path(folder))
        async with TieredStore(config) as store:
            return await replay_real(
                trace, store, block_bytes, fraction, policy, options.progress, label, into,
                positions=options.positions,
            )  # fmt: skip


def _real_config(
    options: ReplayOptions, capacities: list[int], policy: str, folder: Path
) -> StoreConfig:
    """The tiers to replay through: the config's (budgets replaced) or memory tiers over disk."""
    if options.config is not None:
        specs = list(load_config(options.config).tiers)
        if len(specs) != len(capacities):
            raise ConfigError(
                f"{options.config} has {len(specs)} tiers but --split gives {len(capacities)}"
            )
    else:
        names = _default_names(len(capacities))
        specs = [TierConfig(name, "memory", 1) for name in names]
        if len(specs) > 1:
            specs[-1] = TierConfig(names[-1], "disk", 1, path=str(folder))
        if len(specs) == 3 and torch.cuda.is_available():
            specs[0] = TierConfig(names[0], "memory", 1, device="cuda")
    admission = resolve_admission(options.admission, [spec.name for spec in specs])
    evictors = tier_policies(policy, len(specs))
    tiers = tuple(
        replace(
            replace(spec, path=str(folder / spec.name)) if isinstance(spec, DiskTierSpec) else spec,
            max_size_bytes=capacity,
            evictor=evictor,
            # A config's own admission stays unless the replay names one.
            admission=admitted if options.admission else spec.admission,
            admission_window=options.admission_window or spec.admission_window,
        )
        for spec, capacity, admitted, evictor in zip(
            specs, capacities, admission, evictors, strict=True
        )
    )
    return StoreConfig(
        tiers, promote_on_hit=options.promote_on_hit, clean_copies=options.clean_copies
    )
