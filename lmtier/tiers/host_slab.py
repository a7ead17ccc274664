"""Host memory for a CPU tier: pieces allocated once, carved by a best-fit range allocator."""

from __future__ import annotations

import bisect
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ALIGN", "PIECE_BYTES", "HostSlab", "aligned"]

#: Every range starts on this many bytes: any dtype's view of it is aligned.
ALIGN = 16
#: The largest piece allocated at once: a budget of many GiB is never one giant allocation.
PIECE_BYTES = 256 << 20


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to ``ALIGN``."""
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class _Range:
    piece: int
    start: int
    length: int


class HostSlab:
    """Host memory in pieces (pinned where CUDA is available), handed out as byte ranges.

    Pieces are allocated lazily, up to ``capacity`` bytes in all, and kept until ``close``:
    their pages are touched and pinned once, not on every write (fresh memory costs a page
    fault per page, pinned memory is slow to allocate).  Free ranges are kept per piece,
    sorted, and coalesced with their neighbours as they are freed.  ``allocate`` is best fit,
    by bisection in an index of the free ranges by length: first fit would scan past every
    hole too small, and chunks of mixed sizes (a prompt's partial last chunk) leave many.
    ``allocate_run`` hands out the ranges of a batch as one contiguous run (consecutive
    views), so that a batch moves with one copy.

    A freed range whose tensor somebody still refers to (a reader copying out of it) is held
    back until that reference is gone: every reader of a stored tensor holds that tensor
    object for as long as it reads it.  Where no range is free, an allocation falls back to a
    standalone tensor, so it never fails because of the slab (only ``allocate_run`` and
    ``allocate(..., standalone=False)`` answer None).
    """

    def __init__(self, capacity: int, pinned: bool, piece_bytes: int = PIECE_BYTES) -> None:
        self.capacity = capacity
        self.pinned = pinned
        self.piece_bytes = max(ALIGN, min(aligned(piece_bytes), aligned(max(capacity, 1))))
        self._pieces: list[torch.Tensor] = []
        self._free: list[list[tuple[int, int]]] = []  # per piece: sorted (start, end)
        self._by_length: list[tuple[int, int, int]] = []  # sorted (length, piece, start)
        self._ranges: dict[int, _Range] = {}  # data_ptr of a handed-out view -> its range
        self._held: list[torch.Tensor] = []  # freed, reused once nobody refers to them
        self._held_ptrs: set[int] = set()
        self.standalone = 0  # allocations that fell back to a tensor of their own

    # ------------------------------------------------------------------ allocation
    def allocate(self, nbytes: int, standalone: bool = True) -> torch.Tensor | None:
        """A flat uint8 tensor of ``nbytes``: a range of the slab where one is free, else (with
        ``standalone``) a tensor of its own, else None."""
        if nbytes > 0:
            found = self._find(aligned(nbytes))
            if found is not None:
                return self._carve(found, [nbytes])[0]
        if not standalone:
            return None
        self.standalone += 1
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def allocate_run(self, sizes: Sequence[int]) -> list[torch.Tensor] | None:
        """Flat uint8 views of ``sizes`` bytes laid out one after another in one range (each
        starting on ``ALIGN``), or None where no free range holds them all."""
        if not sizes or min(sizes) <= 0:
            return None
        found = self._find(sum(aligned(n) for n in sizes))
        return None if found is None else self._carve(found, sizes)

    def as_entry(self, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``flat`` (from this slab) viewed with ``like``'s dtype and shape."""
        if like.dtype == torch.uint8 and like.dim() == 1:
            return flat
        return flat.view(like.dtype).view(like.shape)

    def free(self, tensor: torch.Tensor) -> None:
        """Give back a tensor ``allocate`` or ``allocate_run`` handed out (any view of it with
        the same start); its range is reused once nothing else refers to ``tensor``."""
        ptr = tensor.data_ptr()
        if ptr in self._ranges and ptr not in self._held_ptrs:
            self._held_ptrs.add(ptr)
            self._held.append(tensor)

    def close(self) -> None:
        self._pieces.clear()
        self._free.clear()
        self._by_length.clear()
        self._ranges.clear()
        self._held.clear()
        self._held_ptrs.clear()

    # ------------------------------------------------------------------ observation
    @property
    def allocated_bytes(self) -> int:
        """Bytes of the pieces allocated so far."""
        return sum(piece.numel() for piece in self._pieces)

    @property
    def free_bytes(self) -> int:
        """Bytes of free ranges in the allocated pieces (held-back ranges not included)."""
        return sum(end - start for ranges in self._free for start, end in ranges)

    @property
    def ranges_in_use(self) -> int:
        """Ranges handed out and not yet reusable (held-back ones included)."""
        return len(self._ranges)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` starts a range of this slab that is handed out."""
        return tensor.data_ptr() in self._ranges

    def free_ranges(self, piece: int = 0) -> list[tuple[int, int]]:
        return list(self._free[piece]) if piece < len(self._free) else []

    def reclaim(self) -> None:
        """Return the held-back ranges that nobody refers to any more to the free lists."""
        still: list[torch.Tensor] = []
        for tensor in self._held:
            # References: the list, the loop variable and getrefcount's argument.
            if sys.getrefcount(tensor) <= 3:
                self._held_ptrs.discard(tensor.data_ptr())
                self._release(self._ranges.pop(tensor.data_ptr()))
            else:
                still.append(tensor)
        self._held = still

    # ------------------------------------------------------------------ internals
    def _find(self, need: int) -> _Range | None:
        """Best fit of ``need`` aligned bytes in the free ranges (the held-back ones nobody
        uses now returned to them first, so freed neighbours coalesce), else in a new piece
        while the capacity allows one."""
        if self._held:
            self.reclaim()
        found = self._best_fit(need)
        if found is None and need <= self.piece_bytes:
            size = min(self.piece_bytes, self.capacity - self.allocated_bytes)
            if size >= need:
                self._add_piece(size)
                found = self._best_fit(need)
        return found

    def _best_fit(self, need: int) -> _Range | None:
        """The smallest free range of at least ``need`` bytes, its first ``need`` taken."""
        slot = bisect.bisect_left(self._by_length, (need, -1, -1))
        if slot == len(self._by_length):
            return None
        length, piece, start = self._by_length.pop(slot)
        ranges = self._free[piece]
        at = bisect.bisect_left(ranges, (start, start + length))
        if length == need:
            del ranges[at]
        else:
            ranges[at] = (start + need, start + length)
            bisect.insort(self._by_length, (length - need, piece, start + need))
        return _Range(piece, start, need)

    def _add_piece(self, size: int) -> None:
        piece = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
        piece.fill_(0)  # touched once, here, so no write into it pays the page faults later
        self._pieces.append(piece)
        self._free.append([(0, size)])
        bisect.insort(self._by_length, (size, len(self._pieces) - 1, 0))

    def _carve(self, found: _Range, sizes: Sequence[int]) -> list[torch.Tensor]:
        piece = self._pieces[found.piece]
        views = []
        offset = found.start
        for nbytes in sizes:
            view = piece[offset : offset + nbytes]
            self._ranges[view.data_ptr()] = _Range(found.piece, offset, aligned(nbytes))
            views.append(view)
            offset += aligned(nbytes)
        return views

    def _release(self, done: _Range) -> None:
        ranges = self._free[done.piece]
        start, end = done.start, done.start + done.length
        slot = bisect.bisect_left(ranges, (start, end))
        if slot < len(ranges) and ranges[slot][0] == end:  # merge the next neighbour
            end = self._unindex(done.piece, ranges.pop(slot))
        if slot and ranges[slot - 1][1] == start:  # and the previous one
            slot -= 1
            start = ranges.pop(slot)[0]
            self._unindex(done.piece, (start, done.start))
        ranges.insert(slot, (start, end))
        bisect.insort(self._by_length, (end - start, done.piece, start))

    def _unindex(self, piece: int, free: tuple[int, int]) -> int:
        """Drop a free range from the index by length; its end."""
        start, end = free
        del self._by_length[bisect.bisect_left(self._by_length, (end - start, piece, start))]
        return end
