"""What the metrics cost on the hottest paths: a 4 KiB CPU-tier hit and an overwriting put.

Two stores in one process take turns, in rounds of 200 operations whose order flips each
pair; the median of the paired differences (CPU time of this thread) is printed, so that a busy
machine's drift cancels.  The store measured is monitored (``metrics: {}`` in its config: it
times its operations), or with ``--unmonitored`` not.  It is compared with an unmonitored store
or, with ``--before STORE_PY``, with the ``TieredStore`` of an older ``store.py`` (over today's
tiers), e.g. the one before metrics existed::

    git show 7dedf04:lmtier/store.py > /tmp/store_before.py
    python scripts/metrics_overhead.py --before /tmp/store_before.py
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from typing import Any

import torch

from lmtier import TieredStore

CONFIG = {"tiers": [{"name": "cpu", "kind": "memory", "max_size_mb": 64}]}


def older_store_class(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("lmtier_store_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.TieredStore


async def a_round(store: Any, kv: torch.Tensor, n: int = 200) -> tuple[float, float]:
    started = time.thread_time()
    for _ in range(n):
        await store.get("k")
    get = (time.thread_time() - started) / n * 1e6
    started = time.thread_time()
    for _ in range(n):
        await store.put("k", kv)
    return get, (time.thread_time() - started) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="compare with the TieredStore of this older store.py")
    parser.add_argument("--unmonitored", action="store_true", help="measure a store without")
    parser.add_argument("--pairs", type=int, default=300)
    args = parser.parse_args()
    measured = TieredStore(CONFIG if args.unmonitored else {**CONFIG, "metrics": {}})
    other = older_store_class(args.before)(CONFIG) if args.before else TieredStore(CONFIG)
    kv = torch.randn(1024)  # 4 KiB
    differences: tuple[list[float], list[float]] = ([], [])
    levels: tuple[list[float], list[float]] = ([], [])
    async with measured, other:
        for store in (measured, other):
            await store.put("k", kv)
            await a_round(store, kv, 2000)  # warm up
        for pair in range(args.pairs):
            order = (measured, other) if pair % 2 else (other, measured)
            got = {store: await a_round(store, kv) for store in order}
            for i in range(2):
                differences[i].append(got[measured][i] - got[other][i])
                levels[i].append(got[other][i])
    what = "the older store.py" if args.before else "an unmonitored store"
    which = "an unmonitored" if args.unmonitored else "a monitored"
    for i, operation in enumerate(("get (a 4 KiB CPU hit)", "put (an overwrite)")):
        base, extra = statistics.median(levels[i]), statistics.median(differences[i])
        low, _, high = statistics.quantiles(differences[i], n=4)
        print(
            f"{operation}: {base:.2f} us with {what}; {which} store takes {extra:+.2f} us "
            f"({extra / base:+.1%}), quartiles {low:+.2f} / {high:+.2f} us, {args.pairs} pairs"
        )


if __name__ == "__main__":
    asyncio.run(main())
