"""The host slab: pieces allocated lazily, first-fit ranges, runs, coalescing and fallbacks."""

from __future__ import annotations

import torch

from lmtier.tiers.batch_copies import find_runs
from lmtier.tiers.host_slab import ALIGN, HostSlab, aligned


def test_a_run_is_consecutive_aligned_views_of_one_piece() -> None:
    slab = HostSlab(4096, pinned=False)
    run = slab.allocate_run([100, 64, 32])
    assert run is not None
    starts = [view.data_ptr() - run[0].data_ptr() for view in run]
    assert starts == [0, aligned(100), aligned(100) + 64]
    assert all(view.data_ptr() % ALIGN == 0 for view in run)
    assert find_runs(run, max_gap=ALIGN - 1) == [[0, 1, 2]]
    assert find_runs(run) == [[0], [1, 2]]  # the padding after 100 bytes is a gap
    assert slab.ranges_in_use == 3 and slab.free_bytes == 4096 - 112 - 96


def test_pieces_are_allocated_lazily_and_never_past_the_capacity() -> None:
    slab = HostSlab(1 << 30, pinned=False, piece_bytes=1 << 20)
    assert slab.allocated_bytes == 0
    first = slab.allocate(1000)
    assert first is not None and slab.owns(first) and slab.allocated_bytes == 1 << 20
    big = slab.allocate(2 << 20)  # larger than a piece: a tensor of its own
    assert big is not None and not slab.owns(big) and slab.standalone == 1
    small = HostSlab(3056, pinned=False, piece_bytes=1024)
    views = [small.allocate(1000, standalone=False) for _ in range(3)]
    assert all(v is not None and small.owns(v) for v in views)
    assert small.allocated_bytes == 3056  # three pieces, the last cut to the capacity
    assert small.allocate(1000, standalone=False) is None


def test_freed_neighbours_coalesce() -> None:
    slab = HostSlab(1024, pinned=False)
    a, b, c = (slab.allocate(256) for _ in range(3))
    assert a is not None and b is not None and c is not None
    slab.free(b)
    slab.free(a)
    del a, b
    slab.reclaim()
    assert slab.free_ranges() == [(0, 512), (768, 1024)]
    slab.free(c)
    del c
    slab.reclaim()
    assert slab.free_ranges() == [(0, 1024)] and slab.ranges_in_use == 0


def test_fragmentation_falls_back_to_ranges_or_standalone_memory() -> None:
    slab = HostSlab(1024, pinned=False)
    views = [slab.allocate(256) for _ in range(4)]
    slab.free(views[0])
    slab.free(views[2])
    del views[2], views[0]
    assert slab.allocate_run([256, 256]) is None  # 512 bytes free, but not in one range
    one = slab.allocate(256, standalone=False)
    two = slab.allocate(256, standalone=False)
    assert one is not None and two is not None and slab.owns(one) and slab.owns(two)
    three = slab.allocate(256)  # the slab is full: a tensor of its own, never a failure
    assert three is not None and three.numel() == 256 and not slab.owns(three)


def test_a_range_still_referenced_is_not_reused_until_let_go() -> None:
    slab = HostSlab(512, pinned=False)
    entry = slab.allocate(256)
    assert entry is not None
    entry.fill_(7)
    reader = entry  # a reader still copying out of it
    slab.free(entry)
    del entry
    other = slab.allocate(256)
    assert other is not None and other.data_ptr() != reader.data_ptr()
    other.fill_(1)
    assert bool((reader == 7).all())
    start = reader.data_ptr()
    del reader
    again = slab.allocate(256)
    assert again is not None and again.data_ptr() == start


def test_a_range_freed_twice_is_released_once() -> None:
    slab = HostSlab(512, pinned=False)
    entry = slab.allocate(256)
    assert entry is not None
    slab.free(entry)
    slab.free(entry)
    del entry
    slab.reclaim()
    assert slab.free_ranges() == [(0, 512)]


def test_entry_views_keep_dtype_and_shape() -> None:
    slab = HostSlab(4096, pinned=False)
    like = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    flat = slab.allocate(like.nbytes)
    assert flat is not None
    view = slab.as_entry(flat, like)
    view.copy_(like)
    assert view.dtype == like.dtype and view.shape == like.shape and torch.equal(view, like)
    assert slab.owns(view)
