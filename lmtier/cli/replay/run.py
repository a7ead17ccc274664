"""Replaying a trace as an engine would: each request's blocks looked up, hits read, misses put."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from lmtier.cli.replay.cascade_sim import CascadeSim, SimTier
from lmtier.cli.replay.optimal import belady_hits, ceiling_hits
from lmtier.cli.replay.traces import Trace
from lmtier.errors import ConfigError
from lmtier.evictor import evictor_names
from lmtier.store import TieredStore

__all__ = [
    "ReplayResult",
    "admission_label",
    "block_tensor",
    "capacity_blocks",
    "optimum",
    "replay_real",
    "replay_sizes_only",
    "tier_policies",
]


@dataclass
class ReplayResult:
    """Hits per tier of one replay, with the tiers' own counters at the end."""

    policy: str
    fraction: float  # total capacity as a fraction of the trace's footprint
    tier_names: list[str]
    capacities: list[int]  # bytes
    block_bytes: int
    references: int = 0
    block_hits: list[int] = field(default_factory=list)
    prefix_hits: list[int] = field(default_factory=list)
    wrong: int = 0  # real mode: hits whose bytes were not the block's
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    admission: str = ""  # the tiers whose admission is not "all", e.g. "disk=second_hit"

    def __post_init__(self) -> None:
        self.block_hits = [0] * len(self.tier_names)
        self.prefix_hits = [0] * len(self.tier_names)

    def record(self, tier: int | None, prefix: bool) -> None:
        self.references += 1
        if tier is not None:
            self.block_hits[tier] += 1
            if prefix:
                self.prefix_hits[tier] += 1

    @property
    def block_hit_ratio(self) -> float:
        return sum(self.block_hits) / max(self.references, 1)

    @property
    def prefix_hit_ratio(self) -> float:
        return sum(self.prefix_hits) / max(self.references, 1)


def tier_policies(policy: str, tiers: int) -> list[str]:
    """Each tier's evictor from a policy name (every tier) or ``NAME/NAME/...`` (one per tier,
    fastest first: ``lru/prefix`` is an LRU cpu tier over a prefix disk tier)."""
    names = policy.split("/")
    unknown = [name for name in names if name not in evictor_names()]
    if unknown:
        raise ConfigError(
            f"policy {policy!r}: unknown evictor {unknown[0]!r}; "
            f"known: {', '.join(evictor_names())}"
        )
    if len(names) == 1:
        return names * tiers
    if len(names) != tiers:
        raise ConfigError(
            f"policy {policy!r} names {len(names)} evictors for a cascade of {tiers} tier(s): "
            "give one name for every tier or one per tier, fastest first (see --split)"
        )
    return names


def capacity_blocks(trace: Trace, fraction: float) -> int:
    """A capacity of ``fraction`` of the trace's distinct blocks, rounded down."""
    return math.floor(fraction * trace.distinct_blocks)


def split_capacity(blocks: int, shares: Sequence[float]) -> list[int]:
    """``blocks`` divided among tiers in proportion to ``shares`` (each rounded down)."""
    total = sum(shares)
    return [math.floor(blocks * share / total) for share in shares]


def _replay(
    trace: Trace,
    result: ReplayResult,
    access: Callable[[int, int], int | None],
    progress: bool,
    label: str = "replay",
) -> None:
    started = time.perf_counter()
    for request in tqdm(trace.requests, desc=label, unit="req", disable=not progress):
        prefix = True
        for position, block in enumerate(request.hash_ids):
            tier = access(block, position)
            prefix = prefix and tier is not None
            result.record(tier, prefix)
    result.seconds = time.perf_counter() - started


def replay_sizes_only(
    trace: Trace,
    tier_names: list[str],
    capacities: list[int],
    policy: str,
    block_bytes: int,
    fraction: float,
    promote_on_hit: bool = True,
    progress: bool = False,
    admission: Sequence[str] | None = None,
    admission_window: int | None = None,
    label: str = "replay",
    *,
    clean_copies: bool = True,
    into: list[ReplayResult] | None = None,
    positions: bool = True,
) -> ReplayResult:
    """Replay through the cascade's decisions alone (no data): every block is read or put.

    ``policy`` is one evictor for every tier or one per tier (``tier_policies``);
    ``admission`` names each tier's admission policy (default: all admit everything);
    ``label`` titles the progress bar shown when ``progress``; ``positions`` False puts every
    block without its index in the request's chain (as an engine that does not know it).  The
    result is appended to ``into`` (if given) before the first reference, so that a caller
    interrupted midway holds the partial counts.
    """
    policies = list(admission) if admission is not None else ["all"] * len(tier_names)
    evictors = tier_policies(policy, len(tier_names))
    sim = CascadeSim(
        [
            SimTier(n, c, e, a, admission_window)
            for n, c, e, a in zip(tier_names, capacities, evictors, policies, strict=True)
        ],
        promote_on_hit,
        clean_copies,
    )
    result = ReplayResult(policy, fraction, tier_names, capacities, block_bytes)
    result.admission = admission_label(tier_names, policies)
    if into is not None:
        into.append(result)

    def access(block: int, position: int) -> int | None:
        tier = sim.get(block)
        if tier is None:
            sim.put(block, block_bytes, position if positions else None)
        return tier

    try:
        _replay(trace, result, access, progress, label)
    finally:
        result.counters = {t.name: t.counters.as_dict() for t in sim.tiers}
    return result


def admission_label(tier_names: Sequence[str], policies: Sequence[str]) -> str:
    """``name=policy`` for each tier that does not admit everything, or ``""``."""
    return ",".join(f"{n}={p}" for n, p in zip(tier_names, policies, strict=True) if p != "all")


def block_tensor(block: int, nbytes: int) -> torch.Tensor:
    """A block's stand-in KV: its id in the first 8 bytes, a fixed pattern after."""
    tensor = torch.arange(nbytes, dtype=torch.int64).remainder_(251).to(torch.uint8)
    tensor[:8] = torch.tensor(list(block.to_bytes(8, "little", signed=True)), dtype=torch.uint8)
    return tensor


async def replay_real(
    trace: Trace, store: TieredStore, block_bytes: int, fraction: float, policy: str,
    progress: bool = False, label: str = "replay", into: list[ReplayResult] | None = None,
    *, positions: bool = True,
) -> ReplayResult:  # fmt: skip
    """Replay through a real store with real tensors; every hit's bytes are checked (and each
    block put with its index in the chain unless not ``positions``).

    ``into`` as in ``replay_sizes_only``; the store's counters are in the result however the
    replay ends.
    """
    infos = store.tier_infos()
    names = [tier.name for tier in infos]
    result = ReplayResult(policy, fraction, names, [t.budget for t in infos], block_bytes)
    result.admission = admission_label(names, [t.admission for t in infos])
    if into is not None:
        into.append(result)
    started = time.perf_counter()
    try:
        await _replay_real(trace, store, result, progress, label, positions)
    finally:
        result.seconds = time.perf_counter() - started
        result.counters = {name: dict(stats) for name, stats in store.stats()["tiers"].items()}
    return result


async def _replay_real(
    trace: Trace,
    store: TieredStore,
    result: ReplayResult,
    progress: bool,
    label: str,
    positions: bool,
) -> None:
    names = result.tier_names
    block_bytes = result.block_bytes
    template = block_tensor(0, block_bytes)
    for request in tqdm(trace.requests, desc=label, unit="req", disable=not progress):
        prefix = True
        for position, block in enumerate(request.hash_ids):
            where = await store.contains(block_key(block))
            got = await store.get(block_key(block), "cpu") if where is not None else None
            if got is None:
                tier = None
                await store.put(
                    block_key(block),
                    block_tensor(block, block_bytes),
                    position=position if positions else None,
                )
            else:
                tier = names.index(where)  # type: ignore[arg-type]
                if not _is_block(got, block, template):
                    result.wrong += 1
            prefix = prefix and tier is not None
            result.record(tier, prefix)


def block_key(block: int) -> str:
    return f"block-{block}"


def _is_block(got: torch.Tensor, block: int, template: torch.Tensor) -> bool:
    head = int.from_bytes(bytes(got[:8].tolist()), "little", signed=True)
    return head == block and torch.equal(got[8:], template[8:])


def optimum(trace: Trace, capacity: int) -> tuple[float, float]:
    """OPT's and the infinite cache's block hit ratios for ``capacity`` blocks."""
    refs = [block for request in trace.requests for block in request.hash_ids]
    return belady_hits(refs, capacity) / len(refs), ceiling_hits(refs) / len(refs)
