"""The bench package has no import cycle: row modules import the core, never one another, and
the core imports none of them."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lmtier.cli.bench

ROWS = ["cpu", "disk", "gpu", "peers", "redis", "vllm"]
PACKAGE = Path(lmtier.cli.bench.__file__).parent
# What importing the lmtier.cli package brings along: the bench command, over the core.
COMMAND = {"lmtier.cli.bench", "lmtier.cli.bench.core", "lmtier.cli.bench.command"}
# What a row module may bring along besides itself: the above, the peers' LMCache loader and
# the stall probe.
HELPERS = {"lmtier.cli.bench.lmcache_peer", "lmtier.cli.bench.stall"}
SHARED = COMMAND | HELPERS


def _bench_modules_after(statement: str) -> set[str]:
    """The lmtier.cli.bench modules loaded by ``statement`` in a fresh interpreter."""
    probe = (
        f"import sys, json; {statement}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[:3] == "
        "['lmtier', 'cli', 'bench'])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("row", ROWS)
def test_each_row_module_imports_alone(row: str) -> None:
    loaded = _bench_modules_after(f"import lmtier.cli.bench.{row}")
    assert f"lmtier.cli.bench.{row}" in loaded
    assert loaded - SHARED == {f"lmtier.cli.bench.{row}"}, "a row module imported another"


def test_the_core_imports_no_row_module() -> None:
    assert _bench_modules_after("import lmtier.cli.bench.core") == COMMAND
    tree = ast.parse((PACKAGE / "core.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert not {name for name in imported if name and name.startswith("lmtier.cli.bench")}


def test_row_modules_import_only_the_core_of_the_package() -> None:
    # Static as well as at run time: a row module's lazy import would not show above.
    helpers = {"lmtier.cli.bench.core", *HELPERS}
    for row in ROWS:
        tree = ast.parse((PACKAGE / f"{row}.py").read_text())
        modules = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert {m for m in modules if m.startswith("lmtier.cli.bench")} <= helpers, row
