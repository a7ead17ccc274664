"""`lmtier bench --peers`: rows beside LMCache 0.5.6's local backends.

LMCache is an optional peer installed apart (scripts/install_peers.sh); without it the rows must
carry the reason and no ratio, and the measured test is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmtier import bench_peers
from lmtier.bench import format_rows

MiB = 1024**2
GOALS = ["", "", ">= 1.5", ">= 1.0"]  # the issue sets goals for the disk rows only


def test_kv_shape_holds_the_same_bytes() -> None:
    assert bench_peers._kv_shape(2 * MiB) == torch.Size([2, 2, 256, 1024])
    assert bench_peers._kv_shape(16 * MiB).numel() * 2 == 16 * MiB
    assert bench_peers._kv_shape(3000) == torch.Size([1500])
    with pytest.raises(ValueError):
        bench_peers._kv_shape(3001)


def test_rows_carry_the_reason_when_lmcache_is_unusable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_peers, "_loaded", {})
    monkeypatch.setattr(bench_peers, "_failure", ["LMCache 0.5.6 unusable: test"])
    assert bench_peers.peers_available() == "LMCache 0.5.6 unusable: test"
    rows = bench_peers.peer_rows(2 * MiB, 3, tmp_path)
    assert [r.goal for r in rows] == GOALS
    assert all(r.ratio is None and r.baseline == "LMCache 0.5.6 unusable: test" for r in rows)
    assert "unusable" in format_rows(rows)
    assert not list(tmp_path.iterdir())


def test_missing_install_is_reported(tmp_path: Path) -> None:
    # A fresh interpreter: this one may have imported lmcache already.
    probe = "from lmtier.bench_peers import peers_available; print(peers_available())"
    env = {**os.environ, "LMCACHE_PEER_SITE": str(tmp_path / "empty")}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert "not installed" in done.stdout and "install_peers.sh" in done.stdout


@pytest.mark.skipif(
    bench_peers.peers_available() is not None,
    reason=f"{bench_peers.peers_available()} (install it with scripts/install_peers.sh and "
    "set LMCACHE_PEER_SITE)",
)
def test_peer_rows_measure_both_sides(tmp_path: Path) -> None:
    rows = bench_peers.peer_rows(MiB, 3, tmp_path)
    assert [r.name.split(" vs ")[1] for r in rows] == [
        "LMCache LocalCPUBackend", "LMCache get_blocking+copy_",
        "LMCache LocalDiskBackend", "LMCache LocalDiskBackend",
    ]  # fmt: skip
    assert [r.goal for r in rows] == GOALS
    assert all(r.ratio is not None and r.ratio > 0 for r in rows)
    assert all(r.lmtier.endswith("GB/s") and r.baseline.endswith("GB/s") for r in rows)
    assert not list(tmp_path.rglob("*")), "benchmark files were left behind"
