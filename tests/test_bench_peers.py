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

from lmtier.cli.bench import format_rows, lmcache_peer, peers

MiB = 1024**2
# The goals are set for the public disk rows only.
GOALS = ["", "", ">= 1.5", ">= 1.0", "", ""]


def test_kv_shape_holds_the_same_bytes() -> None:
    assert lmcache_peer.kv_shape(2 * MiB) == torch.Size([2, 2, 256, 1024])
    assert lmcache_peer.kv_shape(16 * MiB).numel() * 2 == 16 * MiB
    assert lmcache_peer.kv_shape(3000) == torch.Size([1500])
    with pytest.raises(ValueError):
        lmcache_peer.kv_shape(3001)


def test_rows_carry_the_reason_when_lmcache_is_unusable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(lmcache_peer, "_loaded", {})
    monkeypatch.setattr(lmcache_peer, "_failure", ["LMCache 0.5.6 unusable: test"])
    assert peers.peers_available() == "LMCache 0.5.6 unusable: test"
    rows = peers.peer_rows(2 * MiB, 3, tmp_path)
    assert [r.goal.text if r.goal else "" for r in rows] == GOALS
    assert all(r.ratio is None and r.detail == "LMCache 0.5.6 unusable: test" for r in rows)
    table = format_rows(rows)
    assert "unusable" in table and "PASS" not in table and "FAIL" not in table
    assert not list(tmp_path.iterdir())


def test_missing_install_is_reported(tmp_path: Path) -> None:
    # A fresh interpreter: this one may have imported lmcache already.
    probe = "from lmtier.cli.bench.peers import peers_available; print(peers_available())"
    env = {**os.environ, "LMCACHE_PEER_SITE": str(tmp_path / "empty")}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert "not installed" in done.stdout and "install_peers.sh" in done.stdout


@pytest.mark.skipif(
    peers.peers_available() is not None,
    reason=f"{peers.peers_available()} (install it with scripts/install_peers.sh and "
    "set LMCACHE_PEER_SITE)",
)
def test_peer_rows_measure_both_sides(tmp_path: Path) -> None:
    rows = peers.peer_rows(MiB, 3, tmp_path)
    assert [r.name for r in rows] == [
        "cpu put 1 MiB vs LMCache LocalCPUBackend",
        "cpu get(out=) 1 MiB vs LMCache get_blocking+copy_",
        "disk put 1 MiB (store) vs LMCache LocalDiskBackend",
        "disk get(out=) 1 MiB (store) vs LMCache LocalDiskBackend",
        "disk write 1 MiB (private path) vs LMCache LocalDiskBackend",
        "disk read 1 MiB (private path) vs LMCache LocalDiskBackend",
    ]
    assert [r.goal.text if r.goal else "" for r in rows] == GOALS
    assert all(r.ratio is not None and r.ratio > 0 for r in rows)
    assert all(r.lmtier is not None and len(r.lmtier.seconds) == 3 for r in rows)
    assert all(r.baseline is not None and len(r.baseline.seconds) == 3 for r in rows)
    assert not list(tmp_path.rglob("*")), "benchmark files were left behind"


@pytest.mark.skipif(peers.peers_available() is not None, reason="LMCache is not installed")
def test_many_repeats_fit_lmcaches_disk_accounting(tmp_path: Path) -> None:
    """LMCache 0.5.6 never gives back the admission size of a removed file: with its budget
    sized for the files it holds at once, the 33rd put of a run was refused."""
    rows = peers.peer_rows(MiB, 16, tmp_path)
    assert all(r.baseline is not None and len(r.baseline.seconds) == 16 for r in rows)
