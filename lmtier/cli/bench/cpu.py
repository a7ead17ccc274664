"""Rows for the cpu memory tier and the checksum: each beside a plain tensor operation."""

from __future__ import annotations

import functools
import random
import zlib

import torch
import xxhash

from lmtier.cli.bench.core import (
    Goal,
    KiB,
    MiB,
    Row,
    Scale,
    Side,
    atimed,
    make_store,
    samples,
    timed,
    touched,
)
from lmtier.config import TierConfig
from lmtier.serde import payload_view
from lmtier.sizes import human_bytes

__all__ = ["checksum_rows", "cpu_put_get", "hit_latency", "ops_per_second"]


async def cpu_put_get(nbytes: int, repeats: int) -> list[Row]:
    """put + get of one entry, into a preallocated ``out=`` and as a new tensor, against
    ``copy_`` into and out of as many preallocated buffers as the store keeps entries.

    Every buffer either side writes is touched before timing: the store's (by warm-up puts
    that fill its buffer pool), ``out`` and the baseline's slots.
    """
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    out = touched(torch.empty_like(src))
    slots = [touched(torch.empty_like(src)) for _ in range(4)]
    turn = 0

    def raw() -> None:
        nonlocal turn
        turn += 1
        slots[turn % 4].copy_(src)
        out.copy_(slots[turn % 4])

    into_s, fresh_s, raw_s = [], [], []
    async with make_store(TierConfig("cpu", "memory", 8 * nbytes)) as store:

        async def put_get(into: torch.Tensor | None) -> None:
            nonlocal turn
            turn += 1
            await store.put(f"k{turn % 4}", src)
            await store.get(f"k{turn % 4}", out=into)

        for _ in range(8):
            await put_get(None)  # fill the buffer pool
        for _ in range(repeats):  # interleaved, so drift weighs on all three alike
            into_s.append(await atimed(lambda: put_get(out)))
            fresh_s.append(await atimed(lambda: put_get(None)))
            raw_s.append(timed(raw))
    size = human_bytes(nbytes)
    moved = Scale.throughput(2 * nbytes)
    base = Side(tuple(raw_s), moved)
    return [
        Row(f"cpu put+get(out=) {size}", Side(tuple(into_s), moved), base, Goal.ratio(0.8)),
        Row(f"cpu put+get new tensor {size}", Side(tuple(fresh_s), moved), base),
    ]


async def hit_latency(repeats: int, entries: int) -> Row:
    """Gets of resident 4 KiB entries (each a new tensor) against ``clone`` of the same."""
    tensors = [torch.randint(0, 255, (4 * KiB,), dtype=torch.uint8) for _ in range(entries)]
    async with make_store(TierConfig("cpu", "memory", 64 * MiB)) as store:
        for i, tensor in enumerate(tensors):
            await store.put(f"k{i}", tensor)

        async def gets() -> None:
            for i in range(entries):
                await store.get(f"k{i}")

        get_s = [await atimed(gets) for _ in range(repeats)]

    def clones() -> None:
        for tensor in tensors:
            tensor.clone()

    per_get = Scale.latency(entries)
    return Row("cpu 4 KiB hit latency", Side(tuple(get_s), per_get),
               Side(samples(clones, repeats), per_get, "clone"),
               Goal.figure_at_most(15, "<= 15 us"))  # fmt: skip


async def ops_per_second(counts: list[int], ops: int, repeats: int) -> list[Row]:
    """Half gets, half overwrites of 1 KiB entries, at several resident entry counts.

    Each count's ``ops`` operations are timed in ``repeats`` slices; the baseline of every row
    is the first count's rate.
    """
    value = torch.zeros(256, dtype=torch.int32)
    per_slice = ops // repeats
    sides: dict[int, Side] = {}
    for entries in counts:
        async with make_store(TierConfig("cpu", "memory", entries * KiB)) as store:
            for i in range(entries):
                await store.put(f"k{i}", value)
            rng = random.Random(0)
            keys = [f"k{rng.randrange(entries)}" for _ in range(per_slice * repeats)]

            async def run(part: list[str]) -> None:
                for n, key in enumerate(part):
                    if n % 2:
                        await store.get(key)
                    else:
                        await store.put(key, value)

            slices = [keys[i * per_slice : (i + 1) * per_slice] for i in range(repeats)]
            seconds = [await atimed(functools.partial(run, part)) for part in slices]
        sides[entries] = Side(tuple(seconds), Scale.rate(per_slice, "ops/s"))
    first = counts[0]
    base = Side(sides[first].seconds, sides[first].scale, f"at {first:.0e}")
    return [Row(f"ops/s at {n:.0e} entries", sides[n], base, Goal.ratio(0.7)) for n in counts]


def checksum_rows(repeats: int) -> list[Row]:
    """xxh3-64 (what lmtier uses) and zlib.crc32 over 64 MiB, against ``copy_`` of them."""
    source = torch.randint(0, 255, (64 * MiB,), dtype=torch.uint8)
    target = touched(torch.empty_like(source))
    data = payload_view(source)
    gbs = Scale.throughput(len(data))
    copy = Side(samples(lambda: target.copy_(source), repeats), gbs, "copy_")
    xxh = samples(lambda: xxhash.xxh3_64_hexdigest(data), repeats)
    crc = samples(lambda: zlib.crc32(data), repeats)
    return [
        Row("checksum xxh3-64 (used)", Side(xxh, gbs), copy),
        Row("checksum zlib.crc32", Side(crc, gbs), copy),
    ]
