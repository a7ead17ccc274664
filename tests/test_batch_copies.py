"""Run detection and batched gather/scatter plans, run with CPU tensors (bit-exact, counted)."""

from __future__ import annotations

import random

import pytest
import torch

from lmtier.tiers import batch_copies
from lmtier.tiers.batch_copies import (
    execute,
    find_runs,
    plan_to_device,
    plan_to_host,
    run_steps,
    span,
    to_device_views,
)
from lmtier.tiers.host_slab import ALIGN, HostSlab


def chunks(sizes: list[int], dtype: torch.dtype = torch.int32) -> list[torch.Tensor]:
    """Separate tensors (no run among them) with distinct contents."""
    generator = torch.Generator().manual_seed(sum(sizes))
    return [
        torch.randint(-(2**30), 2**30, (n,), generator=generator, dtype=torch.int64).to(dtype)
        for n in sizes
    ]


def run_of(like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of one slab run shaped as ``like`` (consecutive, aligned)."""
    slab = HostSlab(1 << 20, pinned=False)
    flats = slab.allocate_run([t.nbytes for t in like])
    assert flats is not None
    return [slab.as_entry(f, t) for f, t in zip(flats, like, strict=True)]


def test_runs_are_found_in_address_order_whatever_the_order_given() -> None:
    base = torch.zeros(1024, dtype=torch.uint8)
    views = [base[i * 64 : (i + 1) * 64] for i in range(8)]
    shuffled = views[:]
    random.Random(3).shuffle(shuffled)
    (run,) = find_runs(shuffled)
    assert [shuffled[i].data_ptr() for i in run] == [v.data_ptr() for v in views]


def test_runs_split_at_gaps_storages_and_strides() -> None:
    base = torch.zeros(1024, dtype=torch.uint8)
    other = torch.zeros(64, dtype=torch.uint8)
    tensors = [
        base[0:64],
        base[64:128],
        base[128 + ALIGN : 192 + ALIGN],  # a whole ALIGN past the end: a new run
        other,
        base[256:512].view(16, 16)[:, :8],  # not contiguous: on its own
        base[192 + ALIGN : 200 + ALIGN],
    ]
    assert sorted(find_runs(tensors)) == [[0, 1], [2, 5], [3], [4]]
    assert sorted(map(sorted, find_runs(tensors, max_gap=ALIGN))) == [[0, 1, 2, 5], [3], [4]]


def test_a_run_of_host_destinations_is_one_gather_and_one_copy() -> None:
    sources = chunks([256, 1000, 64, 512])
    destinations = run_of(sources)
    steps = plan_to_host(destinations, sources)
    assert [step.kind for step in steps] == ["cat", "copy"]
    execute(steps)
    assert all(torch.equal(d, s) for d, s in zip(destinations, sources, strict=True))


def test_sources_already_laid_out_as_the_run_skip_the_gather() -> None:
    sources = run_of(chunks([256, 128, 64]))
    destinations = run_of(sources)
    steps = plan_to_host(destinations, sources)
    assert [step.kind for step in steps] == ["copy"]
    execute(steps)
    assert all(torch.equal(d, s) for d, s in zip(destinations, sources, strict=True))


def test_scattered_host_destinations_are_one_copy_each() -> None:
    sources = chunks([64, 64, 64])
    destinations = [torch.empty_like(s) for s in sources]
    steps = plan_to_host(destinations, sources)
    assert [step.kind for step in steps] == ["copy"] * 3
    execute(steps)
    assert all(torch.equal(d, s) for d, s in zip(destinations, sources, strict=True))


@pytest.mark.parametrize("sizes", [[256, 512, 64], [25, 7, 100, 3]])  # the second with gaps
def test_a_run_of_host_sources_is_one_copy_and_one_scatter(sizes: list[int]) -> None:
    sources = run_of(chunks(sizes, torch.int8))
    destinations = [torch.empty_like(s) for s in sources]
    steps = plan_to_device(destinations, sources)
    assert [step.kind for step in steps] == ["copy", "scatter"]
    execute(steps)
    assert all(torch.equal(d, s) for d, s in zip(destinations, sources, strict=True))


def test_device_views_of_a_run_are_one_copy_into_one_buffer() -> None:
    like = [
        torch.arange(12, dtype=torch.float32).reshape(3, 4),
        torch.arange(5, dtype=torch.int64),
        torch.arange(33, dtype=torch.int8),  # padding after it
        torch.arange(8, dtype=torch.float16).reshape(2, 2, 2),
    ]
    sources = run_of(like)
    for s, t in zip(sources, like, strict=True):
        s.copy_(t)
    loose = torch.arange(7, dtype=torch.int16)
    given = [sources[2], loose, sources[0], sources[3], sources[1]]
    results, steps = to_device_views(given, torch.device("cpu"))
    assert sorted(step.kind for step in steps) == ["copy", "copy"]  # the run, and the loose one
    execute(steps)
    for result, expected in zip(results, [like[2], loose, like[0], like[3], like[1]], strict=True):
        assert result.dtype == expected.dtype and result.shape == expected.shape
        assert torch.equal(result, expected)
    in_run = (results[0], results[2], results[3], results[4])
    assert len({r.untyped_storage().data_ptr() for r in in_run}) == 1  # views of one buffer
    assert not {s.data_ptr() for s in sources} & {r.data_ptr() for r in results}


def test_span_covers_the_run_with_its_gaps() -> None:
    sources = run_of(chunks([5, 16], torch.int8))
    whole = span(sources)
    assert whole.numel() == ALIGN + 16 and whole.data_ptr() == sources[0].data_ptr()


async def test_run_steps_on_the_host_counts_its_steps() -> None:
    sources = chunks([64] * 16)
    destinations = run_of(sources)
    before = dict(batch_copies.step_counts)
    await run_steps(plan_to_host(destinations, sources))
    assert batch_copies.step_counts["cat"] - before.get("cat", 0) == 1
    assert batch_copies.step_counts["copy"] - before.get("copy", 0) == 1
    assert all(torch.equal(d, s) for d, s in zip(destinations, sources, strict=True))
