"""``lmtier stress``: its options, and a run that cleans up after itself however it ends."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from lmtier.admission import ADMISSION_POLICIES
from lmtier.cli.argtypes import byte_size, positive_int, user_path
from lmtier.cli.stress.plan import DEFAULT_MAX_BYTES, OVERFILL, human_bytes, plan_stress
from lmtier.cli.stress.run import (
    StressOptions,
    StressReport,
    default_stress_config,
    format_report,
    run_shared_stress,
    run_stress,
    shared_stress_config,
    unreached_tiers,
    with_policy,
)
from lmtier.cli.stress.space import StressSpace
from lmtier.config import load_config
from lmtier.errors import ConfigError
from lmtier.evictor import evictor_names
from lmtier.store import TieredStore

__all__ = ["add_stress"]

INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def add_stress(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stress = commands.add_parser(
        "stress",
        help="overfill every tier from concurrent tasks and verify every entry bit-exact",
        description="Without --config: a small gpu -> cpu -> disk cascade (gpu skipped "
        "without CUDA) with its disk tier in a temporary folder, removed afterwards. With "
        "--config: the configured tiers, in a namespace of the run's own (a disk sub-folder "
        "and a redis key prefix), removed afterwards. Unless --ops or --keys-per-task say "
        f"otherwise, the run puts {OVERFILL:g}x the sum of the tiers' budgets (bounded by "
        "--max-bytes); it fails if a tier is never reached.",
    )
    defaults = StressOptions()
    add = stress.add_argument
    add("--config", type=user_path, help="a store config YAML (default: the embedded cascade)")
    add("--tasks", type=positive_int, default=defaults.tasks, help="concurrent tasks (%(default)s)")
    add(
        "--ops", type=positive_int,
        help=f"operations in all, split evenly among the tasks (default: at least "
        f"{defaults.ops}, more if the budgets need more)",
    )  # fmt: skip
    add("--duration", type=float, help="stop after this many seconds, even if ops remain")
    add(
        "--keys-per-task", type=positive_int,
        help=f"keys each task works on; with --shared-keys, the whole key space (default: at "
        f"least {defaults.keys_per_task}, more if the budgets need more)",
    )  # fmt: skip
    add(
        "--max-bytes", type=byte_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
        help="the most the automatic sizing plans to write, e.g. 512M or 20G (default "
        f"{human_bytes(DEFAULT_MAX_BYTES)}); a tier it cannot reach is refused before the run",
    )  # fmt: skip
    add(
        "--allow-unreached", action="store_true",
        help="run even when a tier cannot be reached, and warn instead of failing when one "
        "never was",
    )  # fmt: skip
    add("--min-tokens", type=positive_int, default=defaults.min_tokens,
        help="smallest entry in tokens, 512 bytes each (%(default)s)")  # fmt: skip
    add("--max-tokens", type=positive_int, default=defaults.max_tokens,
        help="largest entry in tokens (%(default)s)")  # fmt: skip
    add(
        "--size-dist", choices=("uniform", "lognormal"), default=defaults.size_distribution,
        help="entry sizes between the two: uniform, or lognormal (many small, a few large)",
    )  # fmt: skip
    add("--get-fraction", type=float, default=defaults.get_fraction,
        help="share of ops that are gets (%(default)s)")  # fmt: skip
    add("--delete-fraction", type=float, default=defaults.delete_fraction,
        help="share of ops that are deletes (%(default)s); the rest are puts")  # fmt: skip
    add("--seed", type=int, default=defaults.seed, help="random seed (%(default)s)")
    add("--policy", choices=evictor_names(), help="every tier's evictor (default: as configured)")
    add(
        "--admission", choices=ADMISSION_POLICIES,
        help="the admission policy of every tier below the first (default: as configured)",
    )  # fmt: skip
    add(
        "--shared-keys", action="store_true",
        help="all tasks share one key space of --keys-per-task keys: they overwrite and delete "
        "each other's entries and give up on --cancel-fraction of their calls",
    )  # fmt: skip
    add("--cancel-fraction", type=float, default=defaults.cancel_fraction,
        help="--shared-keys: share of calls given up on (%(default)s)")  # fmt: skip
    add("--rounds", type=positive_int, default=defaults.rounds,
        help="--shared-keys: quiet points where every key is read back (%(default)s)")  # fmt: skip
    add("--no-progress", action="store_true", help="no progress bars (shown on a terminal)")
    stress.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    defaults = StressOptions()
    options = StressOptions(
        tasks=args.tasks,
        ops=args.ops or defaults.ops,
        keys_per_task=args.keys_per_task or defaults.keys_per_task,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        seed=args.seed,
        get_fraction=args.get_fraction,
        delete_fraction=args.delete_fraction,
        size_distribution=args.size_dist,
        duration_s=args.duration,
        progress=args.progress,
        shared_keys=args.shared_keys,
        cancel_fraction=args.cancel_fraction,
        rounds=args.rounds,
    )
    report = StressReport()
    try:
        return asyncio.run(_stress(args, options, report))
    except KeyboardInterrupt:
        # asyncio.run cancelled the run: the store closed and the run's files went first.
        if report.stats:
            print(format_report(report, interrupted=True))
        else:
            print(f"interrupted after {report.ops} ops")
        return INTERRUPTED


async def _stress(args: argparse.Namespace, options: StressOptions, report: StressReport) -> int:
    with tempfile.TemporaryDirectory(prefix="lmtier-stress-") as folder:
        embedded = shared_stress_config if options.shared_keys else default_stress_config
        config = load_config(args.config) if args.config else embedded(Path(folder))
        space = StressSpace(with_policy(config, args.policy, args.admission))
        try:
            async with TieredStore(space.config) as store:
                await _run_planned(store, args, options, report)
        finally:
            for failure in await space.remove():
                print(f"lmtier: warning: {failure}", file=sys.stderr)
    print(format_report(report))
    return 0 if report.ok else 1


async def _run_planned(
    store: TieredStore, args: argparse.Namespace, options: StressOptions, report: StressReport
) -> None:
    plan = plan_stress(
        options,
        [(tier.name, tier.budget) for tier in store.tiers],
        args.max_bytes,
        ops_given=args.ops is not None,
        keys_given=args.keys_per_task is not None,
    )
    if plan.unreachable and not args.allow_unreached:
        raise ConfigError(plan.refusal())
    options = plan.options
    print(
        "stress: "
        + " -> ".join(f"{t.name} ({t.budget / 2**20:g} MiB)" for t in store.tiers)
        + (f"; evictor {args.policy}" if args.policy else "")
        + (f"; admission {args.admission} below the first tier" if args.admission else "")
        + f"; {options.tasks} tasks, {options.ops} ops"
        + (", shared keys" if options.shared_keys else "")
        + f"\n  {plan.describe()}",
        flush=True,
    )
    if plan.unreachable:
        names = ", ".join(repr(name) for name in plan.unreachable)
        print(f"warning: tier(s) {names} cannot be reached; running anyway (--allow-unreached)")
    run = run_shared_stress if options.shared_keys else run_stress
    await run(store, options, report)
    for name in unreached_tiers(store):
        message = f"tier {name!r} was never reached: no entry was put or demoted into it"
        (report.warnings if args.allow_unreached else report.problems).append(message)
