"""Rows for the GPU: the GPU tier's put and get(out=), and the batched path between GPU
chunks and a pinned CPU tier (put/put_many D2H, get/get_many H2D), beside raw pinned copies."""

from __future__ import annotations

import torch

from lmtier.cli.bench.core import Goal, MiB, Row, Scale, Side, atimed, make_store, samples, touched
from lmtier.config import TierConfig
from lmtier.sizes import human_bytes

__all__ = ["GPU_GBS_GOAL", "gpu_batch_rows", "gpu_rows"]

#: What one direction of the batched path should move, in GB/s (PCIe 5 x16 peaks near 55).
GPU_GBS_GOAL = 45.0


async def gpu_rows(nbytes: int, repeats: int) -> list[Row]:
    """Host->GPU put and GPU->host get(out=) with pinned host memory, against raw ``copy_``."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory()
    out = touched(torch.empty_like(src).pin_memory())
    device_buf = touched(torch.empty(nbytes, dtype=torch.uint8, device="cuda"))
    async with make_store(TierConfig("gpu", "memory", 8 * nbytes, device="cuda")) as store:
        await store.put("k", src)
        await store.get("k", out=out)  # the first copies set up streams and pools on both paths
        put_s = [await atimed(lambda: store.put("k", src)) for _ in range(repeats)]
        get_s = [await atimed(lambda: store.get("k", out=out)) for _ in range(repeats)]

    def h2d() -> None:
        device_buf.copy_(src)
        torch.cuda.synchronize()

    def d2h() -> None:
        out.copy_(device_buf)
        torch.cuda.synchronize()

    h2d()
    d2h()
    size = human_bytes(nbytes)
    gbs = Scale.throughput(nbytes)
    return [
        Row(f"gpu put (H2D) {size}", Side(tuple(put_s), gbs), Side(samples(h2d, repeats), gbs),
            Goal.ratio(0.8)),
        Row(f"gpu get (D2H) {size}", Side(tuple(get_s), gbs), Side(samples(d2h, repeats), gbs),
            Goal.ratio(0.8)),
    ]  # fmt: skip


async def gpu_batch_rows(chunk: int, count: int, repeats: int) -> list[Row]:
    """``count`` GPU chunks of ``chunk`` bytes put into a pinned CPU tier (D2H: ``put`` for
    one, ``put_many`` for more) and got back onto the GPU (H2D: ``get``/``get_many`` with
    ``device="cuda"``), each beside one raw pinned ``copy_`` of the same bytes."""
    total = chunk * count
    generator = torch.Generator(device="cuda").manual_seed(count)
    sources = [
        torch.randint(0, 255, (chunk,), dtype=torch.uint8, device="cuda", generator=generator)
        for _ in range(count)
    ]
    keys = [f"c{i}" for i in range(count)]
    # Room for a batch and the one it replaces: a put commits before the old value goes.
    async with make_store(TierConfig("cpu", "memory", 3 * total, pinned=True)) as store:

        async def put() -> None:
            if count == 1:
                await store.put(keys[0], sources[0])
            else:
                await store.put_many(zip(keys, sources, strict=True))

        async def get() -> None:
            if count == 1:
                await store.get(keys[0], device="cuda")
            else:
                await store.get_many(keys, device="cuda")

        await put()  # the first batch allocates and pins the slab's pieces
        await get()
        put_s = [await atimed(put) for _ in range(repeats)]
        get_s = [await atimed(get) for _ in range(repeats)]
        got = await store.get_many(keys, device="cuda")
        if not all(g is not None and torch.equal(g, s) for g, s in zip(got, sources, strict=True)):
            raise AssertionError("the batched GPU path returned wrong bytes")
        del got
    host = touched(torch.empty(total, dtype=torch.uint8).pin_memory())
    device_buf = touched(torch.empty(total, dtype=torch.uint8, device="cuda"))

    def h2d() -> None:
        device_buf.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    def d2h() -> None:
        host.copy_(device_buf, non_blocking=True)
        torch.cuda.synchronize()

    h2d()
    d2h()
    size = f"{chunk // MiB} MiB"
    what = size if count == 1 else f"{count} x {size}"
    gbs = Scale.throughput(total)
    raw = "raw pinned copy_"
    rows = [
        Row(f"gpu->cpu {'put' if count == 1 else 'put_many'} (D2H) {what}",
            Side(tuple(put_s), gbs), Side(samples(d2h, repeats), gbs, raw), Goal.ratio(0.8)),
        Row(f"cpu->gpu {'get' if count == 1 else 'get_many'} (H2D) {what}",
            Side(tuple(get_s), gbs), Side(samples(h2d, repeats), gbs, raw), Goal.ratio(0.8)),
    ]  # fmt: skip
    if count > 1:  # the bandwidth a batch reaches, one way
        goal = Goal.figure_at_least(GPU_GBS_GOAL, f">= {GPU_GBS_GOAL:g} GB/s")
        rows += [Row(f"{row.name}, GB/s", row.lmtier, goal=goal, detail="(figure)") for row in rows]
    return rows
