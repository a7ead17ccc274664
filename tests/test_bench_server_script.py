"""scripts/bench_server.py runs end to end (a tiny load) and reports every row it promises."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server_helpers import REPO


@pytest.mark.slow
def test_bench_server_reports_the_three_paths_and_the_raw_baseline() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/bench_server.py", "--blocks", "2", "--rounds", "1"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("raw os.preadv of the same bytes:") for line in lines)
    rows = {line[:20].strip(): line[20:].split() for line in lines if line.startswith("(")}
    assert set(rows) == {"(a) no lmtier work", "(b) BlockingStore", "(c) lmtier serve"}
    for name in ("(b) BlockingStore", "(c) lmtier serve"):
        *numbers, stall = rows[name]
        assert len(numbers) == 5 and all(float(n) > 0 for n in numbers[1:])
        assert float(numbers[0]) >= 0  # the engine's µs per block
        assert len(stall.split("/")) == 3
