"""Store micro-benchmarks, each printed beside a raw baseline measured in the same run.

    python scripts/bench_store.py [--quick]

1. CPU-tier hit latency for 4 KiB entries, against a bare ``clone()`` of the same tensor.
2. put + get of 16 MiB entries, against ``copy_`` into and out of preallocated buffers with
   the same traffic (the ratio is baseline time / store time: 1.0 is as fast as raw copies).
3. Mixed-op throughput with 10^3 vs 10^5 resident entries (the ratio shows scaling).
"""

from __future__ import annotations

import argparse
import asyncio
import random

import torch
from timing import amedian_time, median_time

from lmtier import StoreConfig, TierConfig, TieredStore

MB = 1024**2


def cpu_store(budget: int) -> TieredStore:
    return TieredStore(StoreConfig(tiers=(TierConfig("cpu", "memory", budget),)))


async def hit_latency_4k(entries: int, repeats: int) -> tuple[float, float]:
    """Per-get seconds for 4 KiB hits, and per-clone seconds for the same bytes."""
    tensors = [torch.randint(0, 255, (4096,), dtype=torch.uint8) for _ in range(entries)]
    async with cpu_store(64 * MB) as store:
        for i, t in enumerate(tensors):
            await store.put(f"k{i}", t)

        async def gets() -> None:
            for i in range(entries):
                await store.get(f"k{i}")

        store_s = await amedian_time(gets, repeats) / entries

    def clones() -> None:
        for t in tensors:
            t.clone()

    return store_s, median_time(clones, repeats) / entries


async def big_put_get(nbytes: int, repeats: int) -> tuple[float, float, float]:
    """Seconds per put+get of one ``nbytes`` entry (a new tensor, then into ``out=``), and per
    two copy_ calls of it into preallocated buffers."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    async with cpu_store(8 * nbytes) as store:
        counter = 0

        async def put_get(out: torch.Tensor | None) -> None:
            nonlocal counter
            counter += 1
            await store.put(f"k{counter % 4}", src)
            await store.get(f"k{counter % 4}", out=out)

        for _ in range(4):
            await put_get(None)  # warm the pool
        fresh_s = await amedian_time(lambda: put_get(None), repeats)
        into_s = await amedian_time(lambda: put_get(dst), repeats)

    # The same traffic without the store: into one of as many preallocated buffers as the
    # store keeps entries, then out of it (two buffers alone would stay in the CPU's cache).
    slots = [torch.empty_like(src) for _ in range(4)]

    def copies() -> None:
        nonlocal counter
        counter += 1
        slots[counter % 4].copy_(src)
        dst.copy_(slots[counter % 4])

    copies()
    return fresh_s, into_s, median_time(copies, repeats)


async def gpu_put_get(nbytes: int, repeats: int) -> tuple[float, float]:
    """Seconds per put (host -> gpu tier) + get (gpu tier -> host) of one ``nbytes`` entry,
    and per the same two copies between preallocated pinned host and device buffers."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory()
    out = torch.empty_like(src).pin_memory()
    config = StoreConfig(tiers=(TierConfig("gpu", "memory", 8 * nbytes, device="cuda"),))
    async with TieredStore(config) as store:
        counter = 0

        async def put_get() -> None:
            nonlocal counter
            counter += 1
            await store.put(f"k{counter % 4}", src)
            await store.get(f"k{counter % 4}", out=out)

        for _ in range(4):
            await put_get()
        store_s = await amedian_time(put_get, repeats)
    slots = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(4)]

    def copies() -> None:
        nonlocal counter
        counter += 1
        slots[counter % 4].copy_(src)
        out.copy_(slots[counter % 4])
        torch.cuda.synchronize()

    copies()
    return store_s, median_time(copies, repeats)


async def mixed_ops_per_second(entries: int, ops: int, repeats: int) -> float:
    """Ops/s of half gets, half overwrites over ``entries`` resident 1 KiB entries."""
    value = torch.zeros(256, dtype=torch.int32)
    async with cpu_store(entries * 1024) as store:
        for i in range(entries):
            await store.put(f"k{i}", value)
        rng = random.Random(0)
        keys = [f"k{rng.randrange(entries)}" for _ in range(ops)]
        kinds = [rng.random() < 0.5 for _ in range(ops)]

        async def run() -> None:
            for key, is_get in zip(keys, kinds, strict=True):
                if is_get:
                    await store.get(key)
                else:
                    await store.put(key, value)

        seconds = await amedian_time(run, repeats)
        assert store.audit() == []
    return ops / seconds


async def main(quick: bool) -> None:
    repeats = 3 if quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {repeats}")
    store_s, clone_s = await hit_latency_4k(500 if quick else 2000, repeats)
    print(
        f"4 KiB cpu hit: get {store_s * 1e6:.1f} us   raw clone {clone_s * 1e6:.1f} us   "
        f"overhead {(store_s - clone_s) * 1e6:.1f} us   (goal: get <= 15 us)"
    )
    nbytes = 16 * MB
    fresh_s, into_s, copy_s = await big_put_get(nbytes, repeats * 2)
    print(
        f"16 MiB put+get: {2 * nbytes / fresh_s / 1e9:.2f} GB/s (ratio {copy_s / fresh_s:.2f}), "
        f"get(out=) {2 * nbytes / into_s / 1e9:.2f} GB/s (ratio {copy_s / into_s:.2f});   "
        f"raw copy_ in+out {2 * nbytes / copy_s / 1e9:.2f} GB/s   (goal: ratio >= 0.8)"
    )
    if torch.cuda.is_available():
        store_s, copy_s = await gpu_put_get(nbytes, repeats * 2)
        print(
            f"16 MiB gpu put+get(out=) with pinned host buffers: "
            f"{2 * nbytes / store_s / 1e9:.2f} GB/s   raw H2D+D2H copy_ "
            f"{2 * nbytes / copy_s / 1e9:.2f} GB/s   ratio {copy_s / store_s:.2f}"
        )
    else:
        print("no CUDA device: gpu put+get skipped")
    ops = 5000 if quick else 20000
    small = await mixed_ops_per_second(1000, ops, repeats)
    large = await mixed_ops_per_second(10_000 if quick else 100_000, ops, repeats)
    print(
        f"mixed ops: {small:,.0f} ops/s at 10^3 entries   {large:,.0f} ops/s at "
        f"{'10^4' if quick else '10^5'} entries   ratio {large / small:.2f}   (goal >= 0.7)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer entries and repeats")
    asyncio.run(main(parser.parse_args().quick))
