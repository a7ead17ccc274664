"""Tensors whose content names their key and version, so a wrong or stale read shows."""

from __future__ import annotations

import torch


def tensor_for(key: str, version: int = 0, numel: int = 256) -> torch.Tensor:
    """``numel`` int32 values derived from ``key`` and ``version``: two keys, or two versions
    of one key, never read back as each other."""
    seed = (sum(key.encode()) * 1_000_003 + version * 7_919) % 2**31
    return (torch.arange(numel, dtype=torch.int64) * 2_654_435_761 + seed).to(torch.int32)
