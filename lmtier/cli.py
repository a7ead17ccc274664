"""The ``lmtier`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lmtier.config import load_config
from lmtier.errors import LmtierError
from lmtier.inspect import inspect_path
from lmtier.store import TieredStore
from lmtier.stress import StressOptions, default_stress_config, format_report, run_stress

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmtier", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    stress = commands.add_parser(
        "stress",
        help="overfill every tier from concurrent tasks and verify every entry bit-exact",
        description="Without --config: a small gpu -> cpu -> disk cascade (gpu skipped "
        "without CUDA) with its disk tier in a temporary folder, removed afterwards.",
    )
    stress.add_argument("--config", type=Path, help="a store config YAML (default: embedded)")
    defaults = StressOptions()
    stress.add_argument("--tasks", type=int, default=defaults.tasks)
    stress.add_argument("--ops", type=int, default=defaults.ops)
    stress.add_argument("--keys-per-task", type=int, default=defaults.keys_per_task)
    stress.add_argument("--min-tokens", type=int, default=defaults.min_tokens)
    stress.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    stress.add_argument("--seed", type=int, default=defaults.seed)
    stress.add_argument("--no-progress", action="store_true")
    inspect = commands.add_parser(
        "inspect",
        help="verify every file of a disk tier's folder (header and checksum)",
        description="PATH is a disk tier's configured path (or one of its ns-* folders). "
        "Lists entries, bytes, corrupt or foreign files and leftover temporary files; "
        "exits 1 while any remain.",
    )
    inspect.add_argument("path", type=Path)
    inspect.add_argument("--repair", action="store_true", help="remove corrupt and temporary files")
    inspect.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "inspect":
            return _inspect(args.path, args.repair, not args.no_progress and sys.stderr.isatty())
        options = StressOptions(
            tasks=_positive("--tasks", args.tasks),
            ops=_positive("--ops", args.ops),
            keys_per_task=_positive("--keys-per-task", args.keys_per_task),
            min_tokens=_positive("--min-tokens", args.min_tokens),
            max_tokens=max(_positive("--max-tokens", args.max_tokens), args.min_tokens),
            seed=args.seed,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
        return asyncio.run(_stress(args.config, options))
    except LmtierError as exc:
        print(f"lmtier: error: {exc}", file=sys.stderr)
        return 2


async def _stress(config_path: Path | None, options: StressOptions) -> int:
    with tempfile.TemporaryDirectory(prefix="lmtier-stress-") as folder:
        config = load_config(config_path) if config_path else default_stress_config(Path(folder))
        async with TieredStore(config) as store:
            print(
                "stress: "
                + " -> ".join(f"{t.name} ({t.budget / 2**20:g} MiB)" for t in store.tiers)
                + f"; {options.tasks} tasks, {options.ops} ops",
                flush=True,
            )
            report = await run_stress(store, options)
        print(format_report(report))
    return 0 if report.ok else 1


def _inspect(path: Path, repair: bool, progress: bool) -> int:
    reports = inspect_path(path, repair=repair, progress=progress)
    if not reports:
        print(f"{path}: no disk tier folder (ns-*) here")
        return 0
    for report in reports:
        scan = report.scan
        names = ", ".join(repr(n) for n in sorted(report.namespaces)) or "-"
        print(
            f"{report.folder}: {report.entries} entries, {report.payload_bytes:,} bytes "
            f"(namespace {names}); {len(scan.unreadable)} corrupt or foreign, "
            f"{len(scan.temp_files)} temporary"
        )
        for bad, why in scan.unreadable:
            print(f"  corrupt  {bad}: {why}")
        for temp in scan.temp_files:
            print(f"  temp     {temp}")
        if repair:
            print(f"  repaired: removed {report.removed} file(s)")
    return 1 if any(report.problems for report in reports) else 0


def _positive(flag: str, value: int) -> int:
    if value <= 0:
        raise SystemExit(f"lmtier: error: {flag} must be > 0, got {value}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
