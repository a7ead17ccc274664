"""``lmtier bench``: lmtier's data paths beside raw baselines measured in the same run.

Every row is a median of several repetitions and a ratio to a baseline taken side by side,
because absolute times on shared machines drift from run to run while ratios hold.

Layout: ``core`` (options, timing, rows, goals, the table's text) is shared by the row modules
(``cpu``, ``disk``, ``gpu``, ``peers`` over ``lmcache_peer``, ``redis``, ``vllm``), which
import it and never one another; ``core`` imports none of them.  ``table`` runs them all in
order, ``repeat`` merges several runs, ``machine`` says when the machine made a run unreliable.
This package imports only ``core`` up front, so importing one row module loads no other.
``engine`` (``lmtier bench --engine``) is apart from the table: it replays a trace through real
vLLM engines, each in a process running ``engine_run``, over prompts from ``engine_prompts``.
"""

from __future__ import annotations

from collections.abc import Callable

from lmtier.cli.bench.core import BenchOptions, Row, format_rows

__all__ = ["BenchOptions", "Row", "format_rows", "run_bench"]


def run_bench(options: BenchOptions, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """One run of the whole table (``lmtier.cli.bench.table.run_table``)."""
    from lmtier.cli.bench.table import run_table  # every row module: loaded when a table is run

    return run_table(options, on_row)
