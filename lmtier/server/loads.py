"""A ``Load`` job: each hit read straight into its block of the client's region.

The store's index says each entry's dtype and shape before any byte is read, so the read's
destination is the region itself: a disk hit is one ``preadv`` into the client's shared pages,
with no buffer and no copy between.  The job's blocks go to the store as one batch
(``get_into_many``): the hits it can read on the spot are read in one pass, with no task per
block.  An entry whose layout the index cannot tell (a shared tier's, not indexed yet), or
whose layout changed before its read, is read as a tensor and copied in.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import torch

from lmtier.keys import KeyLike
from lmtier.server import protocol as p
from lmtier.store import TieredStore

__all__ = ["load_into_region"]


async def load_into_region(
    store: TieredStore,
    region: torch.Tensor,
    keys: Sequence[KeyLike],
    offsets: Sequence[int],
    sizes: Sequence[int],
) -> list[p.Found | None]:
    """Each key's entry written at ``offsets[i]`` of ``region`` (at most ``sizes[i]``
    bytes): a ``Found`` per hit, None per miss."""
    found: list[p.Found | None] = [None] * len(keys)
    direct: list[int] = []  # read straight into the region as one batch
    outs: list[torch.Tensor] = []
    apart: list[int] = []  # read as tensors, then copied in
    for i, (key, offset, room) in enumerate(zip(keys, offsets, sizes, strict=True)):
        layout = entry_layout(store, key)
        if layout is None:
            apart.append(i)
            continue
        dtype, shape = layout
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > room:
            found[i] = p.Found(_dtype_name(dtype), list(shape), nbytes, False)
        elif offset % dtype.itemsize:
            apart.append(i)
        else:
            direct.append(i)
            outs.append(region[offset : offset + nbytes].view(dtype).view(shape))
    if direct:
        got = await store.get_into_many([keys[i] for i in direct], outs)
        for i, out, read in zip(direct, outs, got, strict=True):
            if read is not None:
                found[i] = p.Found(_dtype_name(out.dtype), list(out.shape), out.nbytes, True)
            elif store.layout(keys[i]) not in (None, (out.dtype, tuple(out.shape))):
                apart.append(i)  # replaced by an entry of another layout: read it as it is now
    if apart:
        copied = await asyncio.gather(
            *(_copy_in(store, region, keys[i], offsets[i], sizes[i]) for i in apart)
        )
        for i, result in zip(apart, copied, strict=True):
            found[i] = result
    return found


async def _copy_in(
    store: TieredStore, region: torch.Tensor, key: KeyLike, offset: int, room: int
) -> p.Found | None:
    tensor = await store.get(key, "cpu")
    if tensor is None:
        return None
    nbytes = tensor.nbytes
    copied = nbytes <= room
    if copied:
        region[offset : offset + nbytes].copy_(tensor.reshape(-1).view(torch.uint8))
    return p.Found(_dtype_name(tensor.dtype), list(tensor.shape), nbytes, copied)


def entry_layout(store: TieredStore, key: KeyLike) -> tuple[torch.dtype, tuple[int, ...]] | None:
    """The dtype and shape of ``key``'s entry from the store's index (``TieredStore.layout``)."""
    return store.layout(key)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
