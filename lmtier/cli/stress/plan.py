"""How much a stress run writes: a working set sized from the tiers' budgets, bounded by a cap,
and the tiers that working set cannot reach (each is named before the run, not after)."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from lmtier.cli.stress.run import HIDDEN, StressOptions, split_evenly
from lmtier.errors import ConfigError
from lmtier.sizes import human_bytes

__all__ = [
    "DEFAULT_MAX_BYTES",
    "OVERFILL",
    "StressPlan",
    "mean_entry_bytes",
    "plan_stress",
]

#: The working set against the sum of the budgets: every tier spills and the last one drops.
OVERFILL = 1.5
#: The most bytes the automatic sizing plans to write unless ``--max-bytes`` says otherwise.
DEFAULT_MAX_BYTES = 1 << 30
# Entries are [2, tokens, HIDDEN] bf16 tensors.
BYTES_PER_TOKEN = 2 * HIDDEN * 2
# After each task has put its keys once, half as many ops again read, overwrite and delete.
OPS_PER_KEY = 1.5
# Shared keys are picked at random: three puts per key put ~95% of the key space at least once.
SHARED_PUTS_PER_KEY = 3.0
# Draws that estimate the mean entry size of a skewed size distribution.
SIZE_SAMPLES = 4096


@dataclass(frozen=True)
class StressPlan:
    """The options a run uses and what they amount to against the tiers' budgets."""

    options: StressOptions  # ops and keys sized (where the caller left them to the plan)
    budgets: tuple[tuple[str, int], ...]  # (tier, budget bytes), fastest first
    entry_bytes: float  # the mean size of an entry
    working_set: int  # bytes of distinct entries the run puts, about
    written: int  # bytes its puts write, about
    # Set when the automatic sizing met the cap: what overfilling every tier would write.
    uncapped_written: int | None = None

    @property
    def total_budget(self) -> int:
        return sum(budget for _, budget in self.budgets)

    @property
    def unreachable(self) -> list[str]:
        """Tiers whose working set fits in the tiers above them: nothing would reach them."""
        above = 0
        names = []
        for name, budget in self.budgets:
            if self.working_set <= above:
                names.append(name)
            above += budget
        return names

    def describe(self) -> str:
        """One line: the working set against the budgets, and what is written."""
        keys = _keys(self.options)
        return (
            f"working set ~{human_bytes(self.working_set)} ({keys:,} keys of "
            f"~{human_bytes(self.entry_bytes)}) against {human_bytes(self.total_budget)} of "
            f"budgets; ~{human_bytes(self.written)} written"
        )

    def refusal(self) -> str:
        """Why the run would not reach every tier, and the ways out."""
        budgets = dict(self.budgets)
        names = self.unreachable
        first = [name for name, _ in self.budgets].index(names[0])
        above = self.budgets[:first]
        listed = ", ".join(f"{name!r} ({human_bytes(budgets[name])})" for name in names)
        keys = _keys(self.options)
        lines = [
            f"stress would never reach tier(s) {listed}: the run's working set, "
            f"~{human_bytes(self.working_set)} ({keys:,} keys of ~{human_bytes(self.entry_bytes)}"
            f"), fits in the {human_bytes(sum(b for _, b in above))} of the tiers above, and an "
            "entry reaches a tier only once those are full."
        ]
        if self.uncapped_written is not None:
            lines.append(
                f"Overfilling every tier (a working set {OVERFILL:g}x the "
                f"{human_bytes(self.total_budget)} of budgets) writes "
                f"~{human_bytes(self.uncapped_written)}, over --max-bytes: pass --max-bytes "
                f"{_size_argument(self.uncapped_written)},"
            )
        else:
            lines.append("Give more --keys-per-task or --ops,")
        example = f"LMTIER_{above[-1][0].upper()}__MAX_SIZE_MB=64" if above else ""
        lines.append(
            "or lower the budgets of the tiers above"
            + (f" (with --config, e.g. {example})" if example else "")
            + ", or pass --allow-unreached to run anyway (a tier never reached is then a "
            "warning, not a failure)."
        )
        return " ".join(lines)


def plan_stress(
    options: StressOptions,
    budgets: Sequence[tuple[str, int]],
    max_bytes: int = DEFAULT_MAX_BYTES,
    ops_given: bool = False,
    keys_given: bool = False,
) -> StressPlan:
    """Size ``options`` to overfill ``budgets`` (each tier's name and bytes, fastest first).

    The working set aims at ``OVERFILL`` times the sum of the budgets; ops and keys per task
    grow from ``options``' values to reach it, and shrink below them only when writing it
    would exceed ``max_bytes``.  Ops or keys the caller gave (``ops_given``, ``keys_given``)
    are used as given, and given ops are not capped.
    """
    if max_bytes <= 0:
        raise ConfigError(f"max_bytes must be > 0, got {max_bytes}")
    entry = mean_entry_bytes(options)
    target = OVERFILL * sum(budget for _, budget in budgets)
    sized = _sized(options, entry, target, ops_given, keys_given, at_least_given=True)
    plan = _plan(sized, budgets, entry)
    # Given ops write what they write: the cap bounds only the ops the plan chooses.
    if plan.written > max_bytes and not ops_given:
        scaled = target * max_bytes / plan.written
        smaller = _sized(options, entry, scaled, ops_given, keys_given, at_least_given=False)
        plan = dataclasses.replace(_plan(smaller, budgets, entry), uncapped_written=plan.written)
    return plan


def mean_entry_bytes(options: StressOptions) -> float:
    """The mean bytes of the entries ``options`` draws (sampled for skewed distributions)."""
    if options.size_distribution == "uniform":
        return BYTES_PER_TOKEN * (options.min_tokens + options.max_tokens) / 2
    rng = random.Random(options.seed)
    draws = sum(options.draw_tokens(rng) for _ in range(SIZE_SAMPLES))
    return BYTES_PER_TOKEN * draws / SIZE_SAMPLES


def _size_argument(count: int) -> str:
    """A ``--max-bytes`` value at least ``count``, in the largest unit that keeps it short."""
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if count >= 10 * size:
            return f"{math.ceil(count / size)}{unit}"
    return str(count)


def _put_fraction(options: StressOptions) -> float:
    return max(0.0, 1.0 - options.get_fraction - options.delete_fraction)


def _keys(options: StressOptions) -> int:
    """Distinct keys of the run: one key space shared by every task, or one per task."""
    return options.keys_per_task * (1 if options.shared_keys else options.tasks)


def _sized(
    options: StressOptions,
    entry: float,
    target: float,
    ops_given: bool,
    keys_given: bool,
    at_least_given: bool,
) -> StressOptions:
    """``options`` with the keys and ops a working set of ``target`` bytes needs; with
    ``at_least_given`` never below ``options``' own values (they are defaults to grow from)."""
    keys = options.keys_per_task
    if not keys_given:
        spaces = 1 if options.shared_keys else options.tasks
        needed = target / entry / spaces
        keys = max(keys, math.ceil(needed)) if at_least_given else max(1, math.floor(needed))
    ops = options.ops
    if not ops_given:
        if options.shared_keys:
            puts = _put_fraction(options)
            needed_ops = math.ceil(SHARED_PUTS_PER_KEY * keys / puts) if puts else options.ops
        else:
            needed_ops = math.ceil(OPS_PER_KEY * keys * options.tasks)
        floor = options.tasks * (options.rounds if options.shared_keys else 1)
        ops = max(ops, needed_ops) if at_least_given else max(floor, needed_ops)
    return dataclasses.replace(options, keys_per_task=keys, ops=ops)


def _plan(options: StressOptions, budgets: Sequence[tuple[str, int]], entry: float) -> StressPlan:
    puts = _put_fraction(options)
    if options.shared_keys:
        keys = options.keys_per_task
        # Keys are picked at random: the share of the key space put at least once.
        covered = keys * (1 - math.exp(-options.ops * puts / keys))
        working_set, written = covered * entry, options.ops * puts * entry
    else:
        # Each task puts its keys once in order, then reads, overwrites and deletes at random.
        shares = split_evenly(options.ops, options.tasks)
        fills = [min(share, options.keys_per_task) for share in shares]
        later = sum(share - fill for share, fill in zip(shares, fills, strict=True))
        working_set, written = sum(fills) * entry, (sum(fills) + later * puts) * entry
    return StressPlan(options, tuple(budgets), entry, int(working_set), int(written))
