"""Rows for the GPU tier: host->GPU put and GPU->host get(out=), beside raw pinned copies."""

from __future__ import annotations

import torch

from lmtier.bench.core import Goal, MiB, Row, Scale, Side, atimed, make_store, samples, touched
from lmtier.config import TierConfig

__all__ = ["gpu_rows"]


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
    size = f"{nbytes // MiB} MiB"
    gbs = Scale.throughput(nbytes)
    return [
        Row(f"gpu put (H2D) {size}", Side(tuple(put_s), gbs), Side(samples(h2d, repeats), gbs),
            Goal.ratio(0.8)),
        Row(f"gpu get (D2H) {size}", Side(tuple(get_s), gbs), Side(samples(d2h, repeats), gbs),
            Goal.ratio(0.8)),
    ]  # fmt: skip
