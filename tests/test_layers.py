"""The tools sit on a floor of their own: the library below lmtier/cli/ never imports from it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmtier"
TOOLS = PACKAGE / "cli"


def _imported(path: Path) -> set[str]:
    """Every module ``path`` names in an import statement, lazy ones inside functions too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_library_module_imports_the_tools() -> None:
    library = [
        path
        for path in PACKAGE.rglob("*.py")
        if TOOLS not in path.parents and path.name != "__main__.py"
    ]
    assert len(library) > 20, "the library's modules were found"
    upward = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            name
            for name in _imported(path)
            if name == "lmtier.cli" or name.startswith("lmtier.cli.")
        )
        for path in library
    }
    assert {path: names for path, names in upward.items() if names} == {}


def test_importing_the_library_loads_no_tool() -> None:
    probe = (
        "import sys, json, lmtier, lmtier.store, lmtier.engine; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('lmtier.cli'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


# The store owns tiers, their indexes and their evictors: everything else goes through its
# facade (keys, holder, touch, layout, tier_infos, ...), so no arrow escapes the import graph.
INTERNALS = ("tiers", "cache_dict", "evictor")
OWNERS = ("store", "tiers", "evictor", "testing")


def _internal_reads(path: Path) -> list[str]:
    """``store.tiers`` and ``x.cache_dict`` / ``x.evictor`` attribute reads in ``path``."""
    return [
        f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr in INTERNALS
        and (node.attr != "tiers" or "store" in ast.unparse(node.value))
    ]


def test_only_the_store_and_the_tiers_reach_into_tiers() -> None:
    outside = [
        path for path in PACKAGE.rglob("*.py") if path.relative_to(PACKAGE).parts[0] not in OWNERS
    ]
    assert len(outside) > 20
    found = [read for path in outside for read in _internal_reads(path)]
    assert found == [], found
    assert _internal_reads(PACKAGE / "tiers" / "base.py"), "the check sees attribute reads"
