"""What the disk tier keeps in memory per entry instead of the tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DiskCacheMetadata"]


@dataclass(frozen=True)
class DiskCacheMetadata:
    """A disk entry: its file, its payload size in bytes, and what the payload decodes to.

    ``size`` is what ``BaseEvictor.get_size`` returns for it; nothing ever stats the file.
    """

    path: str
    size: int
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    checksum: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"DiskCacheMetadata.size must be an int >= 0, got {self.size!r}")
