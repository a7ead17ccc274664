"""A ``Load`` job: each hit read straight into its block of the client's region.

The store's index says each entry's dtype and shape before any byte is read, so the read's
destination is the region itself (``get(key, out=view)``): a disk hit is one ``preadv`` into
the client's shared pages, with no buffer and no copy between.  An entry whose layout the
index cannot tell (a shared tier's, not indexed yet) is read as a tensor and copied in.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import torch

from lmtier.errors import InvalidValueError
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
    bytes): a ``Found`` per hit, None per miss.  The reads run concurrently."""
    return list(
        await asyncio.gather(
            *(
                _load_one(store, region, key, offset, room)
                for key, offset, room in zip(keys, offsets, sizes, strict=True)
            )
        )
    )


async def _load_one(
    store: TieredStore, region: torch.Tensor, key: KeyLike, offset: int, room: int
) -> p.Found | None:
    layout = entry_layout(store, key)
    if layout is not None:
        dtype, shape = layout
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > room:
            return p.Found(_dtype_name(dtype), list(shape), nbytes, False)
        if offset % dtype.itemsize == 0:
            out = region[offset : offset + nbytes].view(dtype).view(shape)
            try:
                got = await store.get(key, out=out)
            except InvalidValueError:
                pass  # replaced by an entry of another layout meanwhile: read it as it is now
            else:
                if got is None:
                    return None
                return p.Found(_dtype_name(dtype), list(shape), nbytes, True)
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
