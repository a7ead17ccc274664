"""The docs' examples of subclassing lmtier.testing's contracts run as test files of their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = ["docs/evictors.md", "docs/architecture.md"]


def contract_snippets() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = (REPO / doc).read_text(encoding="utf-8")
        blocks = re.findall(r"```python\n(.*?)```", text, re.S)
        found += [(doc, block) for block in blocks if "from lmtier.testing import" in block]
    return found


def test_each_doc_shows_a_contract_subclass() -> None:
    assert sorted({doc for doc, _ in contract_snippets()}) == sorted(DOCS)


@pytest.mark.parametrize(("doc", "snippet"), contract_snippets(), ids=lambda v: v[:30])
def test_a_contract_snippet_passes_as_a_test_file(doc: str, snippet: str, tmp_path: Path) -> None:
    (tmp_path / "test_snippet.py").write_text(snippet, encoding="utf-8")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *("-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function"),
            "test_snippet.py",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed is not None and int(passed.group(1)) >= 2, done.stdout[-2000:]
