"""``lmtier replay``: a sweep over a trace, its table, and the files it writes."""

from __future__ import annotations

import argparse
import sys

from lmtier.cli.exits import INTERRUPTED
from lmtier.cli.replay.report import check_plotting, format_table, write_csv, write_plot
from lmtier.cli.replay.sweep import ReplayOptions, SweepResult, run_sweep
from lmtier.cli.replay.synthetic import SYNTHETIC_PREFIX, parse_synthetic
from lmtier.cli.replay.traces import WINDOWS, trace_stats
from lmtier.cli.replay.workloads import load_trace
from lmtier.errors import LmtierError
from lmtier.sizes import human_bytes

__all__ = ["replay_command"]


def replay_command(args: argparse.Namespace) -> int:
    if args.plot:
        check_plotting()
    part = WINDOWS[args.window] if args.window else args.part
    synthetic = None
    source = str(args.trace)
    if source.startswith(SYNTHETIC_PREFIX):
        synthetic = parse_synthetic(
            source, requests=args.requests, sessions=args.sessions, alpha=args.zipf_alpha,
            seed=args.seed,
        )  # fmt: skip
    elif any(v is not None for v in (args.requests, args.sessions, args.zipf_alpha, args.seed)):
        raise LmtierError(
            "--requests, --sessions, --zipf-alpha and --seed are for synthetic:zipf and "
            "synthetic:shared-prompt"
        )
    trace = load_trace(source, args.format, args.limit, part, synthetic)
    default_bytes = 16 if args.real else ReplayOptions().bytes_per_token
    options = ReplayOptions(
        capacities=args.capacities,
        policies=args.policies,
        shares=args.split,
        bytes_per_token=args.bytes_per_token or default_bytes,
        real=args.real,
        promote_on_hit=not args.no_promote,
        positions=not args.no_positions,
        config=args.config,
        progress=args.progress,
        admission=args.admission,
        admission_window=args.admission_window,
    )
    where = f" part {part[0]}/{part[1]}" if part else ""
    block_bytes = options.bytes_per_token * trace.block_tokens
    print(
        f"{source}{where}: {trace.format}, {trace_stats(trace).describe()}; blocks of "
        f"{trace.block_tokens} tokens ({human_bytes(block_bytes)}); "
        f"{'real' if options.real else 'sizes-only'} mode",
        flush=True,
    )

    def skipped(reason: str) -> None:
        print(f"lmtier: warning: skipped: {reason}", file=sys.stderr, flush=True)

    sweep = SweepResult(trace, options.bytes_per_token * trace.block_tokens, [], {})
    try:
        run_sweep(trace, options, on_skip=skipped, sweep=sweep)
    except KeyboardInterrupt:
        # A real replay's store closed and its temporary folder went as asyncio.run unwound.
        print(format_table(sweep.results, sweep.optimum))
        references = sum(result.references for result in sweep.results)
        print(f"interrupted after {references} ops (block references); the last row is partial")
        return INTERRUPTED
    print(format_table(sweep.results, sweep.optimum))
    for path, write in ((args.csv, write_csv), (args.plot, write_plot)):
        if path is not None:
            try:
                write(path, sweep.results, sweep.optimum)
            except OSError as exc:
                raise LmtierError(f"cannot write {path}: {exc.strerror or exc}") from exc
    wrong = sum(result.wrong for result in sweep.results)
    if wrong:
        print(f"FAILED: {wrong} hit(s) returned bytes that were not the block's")
    return 1 if wrong else 0
