"""``lmtier stress``: a run that cleans up after itself however it ends."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from lmtier.cli.exits import INTERRUPTED
from lmtier.cli.stress.plan import plan_stress
from lmtier.cli.stress.report import format_report
from lmtier.cli.stress.run import (
    StressOptions,
    StressReport,
    default_stress_config,
    run_stress,
    shared_stress_config,
    unreached_tiers,
    with_policy,
)
from lmtier.cli.stress.shared import run_shared_stress
from lmtier.cli.stress.space import StressSpace
from lmtier.config import load_config
from lmtier.errors import ConfigError
from lmtier.sizes import human_bytes
from lmtier.store import TieredStore

__all__ = ["stress_command"]


def stress_command(args: argparse.Namespace) -> int:
    """Run the stress ``args`` ask for, removing what it wrote however it ends."""
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
        [(tier.name, tier.budget) for tier in store.tier_infos()],
        args.max_bytes,
        ops_given=args.ops is not None,
        keys_given=args.keys_per_task is not None,
    )
    if plan.unreachable and not args.allow_unreached:
        raise ConfigError(plan.refusal())
    options = plan.options
    print(
        "stress: "
        + " -> ".join(f"{t.name} ({human_bytes(t.budget)})" for t in store.tier_infos())
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
        message = f"tier {name!r} was never reached: {_why_unreached(report, name)}"
        (report.warnings if args.allow_unreached else report.problems).append(message)


def _why_unreached(report: StressReport, name: str) -> str:
    """Why nothing landed in tier ``name``: its server could not be reached, or the cascade
    never spilled that far."""
    tiers = report.stats.get("tiers", {})
    stats = tiers.get(name, {}) if isinstance(tiers, dict) else {}
    refused = stats.get("unavailable", 0)
    if stats.get("available", True) and not refused:
        return "no entry was put or demoted into it"
    return (
        f"its server was unreachable the whole run ({refused} call(s) refused as unavailable; "
        "check the tier's url and that the server is running)"
    )
