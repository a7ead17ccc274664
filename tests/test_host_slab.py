"""The host slab: pieces allocated lazily, best-fit ranges, runs, coalescing and fallbacks."""

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


def test_best_fit_takes_the_smallest_hole_and_the_index_follows_every_merge() -> None:
    slab = HostSlab(4096, pinned=False)
    views = [slab.allocate(n) for n in (512, 256, 512, 128, 512, 1024)]
    assert all(v is not None for v in views)
    for i in (1, 3):  # holes of 256 and 128 bytes between the 512-byte entries
        slab.free(views[i])
    holes = {(views[1].data_ptr(), 256), (views[3].data_ptr(), 128)}  # type: ignore[union-attr]
    del views[3], views[1]
    small = slab.allocate(100, standalone=False)  # the 128-byte hole, not the first one
    assert small is not None and (small.data_ptr(), 128) in holes
    mid = slab.allocate(200, standalone=False)
    assert mid is not None and (mid.data_ptr(), 256) in holes
    for view in views:
        slab.free(view)
    slab.free(small)
    slab.free(mid)
    del views, view, small, mid
    slab.reclaim()
    assert slab.free_ranges() == [(0, 4096)]
    assert slab._by_length == [(4096, 0, 0)], "merged ranges leave the index"


def test_churn_of_mixed_sizes_keeps_the_index_equal_to_the_free_ranges() -> None:
    generator = torch.Generator().manual_seed(5)
    slab = HostSlab(1 << 16, pinned=False)
    live: list[torch.Tensor] = []
    for _ in range(2000):
        if live and torch.rand((), generator=generator) < 0.45:
            slab.free(live.pop(int(torch.randint(len(live), (), generator=generator))))
        else:
            got = slab.allocate(int(torch.randint(1, 2048, (), generator=generator)), False)
            if got is not None:
                live.append(got)
        slab.reclaim()
        indexed = sorted((start, start + length) for length, _, start in slab._by_length)
        assert indexed == slab.free_ranges()
    in_use = sum(aligned(v.numel()) for v in live)
    assert slab.free_bytes + in_use == slab.allocated_bytes
