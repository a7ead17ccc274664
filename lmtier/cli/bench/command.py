"""``lmtier bench``: one or several runs of the table, with what made them unreliable."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from lmtier.cli.bench import BenchOptions, Row, format_rows, run_bench

__all__ = ["bench_command"]


def bench_command(args: argparse.Namespace) -> int:
    if args.engine:
        from lmtier.cli.bench.engine import engine_command  # runs vLLM engines: only when asked

        return engine_command(args)
    # The bench package's helpers beyond its table, loaded with the command that uses them.
    from lmtier.cli.bench.machine import LoadWatch, folder_warning, spread_warning
    from lmtier.cli.bench.repeat import format_repeated, repeated

    options = BenchOptions(
        args.quick,
        args.folder,
        args.fsync,
        args.restart_entries,
        args.peers,
        args.redis,
        args.vllm,
        args.gpu_only,
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    runs = f", {args.repeat} runs" if args.repeat > 1 else ""
    print(
        f"lmtier bench: torch {torch.__version__}, {os.cpu_count()} CPUs, {device}; "
        f"medians of {options.repeats}{runs}",
        flush=True,
    )
    on_tmpfs = folder_warning(args.folder or Path(tempfile.gettempdir()))
    if on_tmpfs:
        print(on_tmpfs, flush=True)
    load = LoadWatch()

    def progress(row: Row) -> None:
        if args.progress:
            print(f"  measured {row.name}", file=sys.stderr, flush=True)

    tables = []
    for run in range(args.repeat):
        if args.progress and args.repeat > 1:
            print(f"run {run + 1} of {args.repeat}", file=sys.stderr, flush=True)
        tables.append(run_bench(options, progress))
        load.sample(f"end of run {run + 1}" if args.repeat > 1 else "end")
    if args.repeat == 1:
        rows = tables[0]
        print(format_rows(rows))
    else:
        summaries = repeated(tables)
        rows = [summary.row for summary in summaries]
        print(format_repeated(summaries))
    # Repeated after the table, where a reader of its figures looks.
    for warning in (on_tmpfs, load.warning(), spread_warning(rows)):
        if warning:
            print(warning)
    return 0
