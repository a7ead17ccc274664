"""Every policy's sizes-only replay of one trace, on the whole trace and on each half.

Prints block and prefix hit ratios per policy and capacity, and each policy's replay time as a
ratio to LRU's over the same requests in the same run (machines here are noisy; ratios are
stable); times are the process's CPU seconds, which other load on the machine disturbs least::

    python scripts/bench_policies.py tests/data/conversation_trace.jsonl \
        --policies lru,fifo,lfu,s3fifo,arc,prefix --parts full,first,second
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from lmtier.cli.replay.run import capacity_blocks, replay_sizes_only
from lmtier.cli.replay.sweep import DEFAULT_BYTES_PER_TOKEN
from lmtier.cli.replay.traces import Trace, read_trace
from lmtier.evictor import evictor_names


def parts_of(trace: Trace, names: list[str]) -> dict[str, Trace]:
    """The whole trace and its halves by request order."""
    half = len(trace.requests) // 2
    every = {
        "full": trace,
        "first": replace(trace, requests=trace.requests[:half]),
        "second": replace(trace, requests=trace.requests[half:]),
    }
    return {name: every[name] for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--policies", default=",".join(evictor_names()))
    parser.add_argument("--capacities", default="0.01,0.05,0.1,0.25")
    parser.add_argument("--parts", default="full,first,second")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument(
        "--repeat", type=int, default=1, help="timing: rounds over the policies, best kept"
    )
    args = parser.parse_args()
    policies = args.policies.split(",")
    if "lru" in policies:
        policies.remove("lru")
    policies.insert(0, "lru")  # first: the others' times are ratios to it
    trace = read_trace(args.trace, limit=args.limit)
    block_bytes = DEFAULT_BYTES_PER_TOKEN * trace.block_tokens
    print(f"{'part':<7}{'capacity':>9}  {'policy':<8}{'block hit':>10}{'prefix hit':>11}"
          f"{'seconds':>9}{'vs lru':>8}")  # fmt: skip
    for part, sub in parts_of(trace, args.parts.split(",")).items():
        for fraction in (float(f) for f in args.capacities.split(",")):
            capacity = capacity_blocks(sub, fraction) * block_bytes
            seconds = {policy: float("inf") for policy in policies}
            results = {}
            # Rounds interleave the policies, and each keeps its best time, so that load from
            # elsewhere on the machine falls on all of them alike.
            for _ in range(args.repeat):
                for policy in policies:
                    started = time.process_time()
                    results[policy] = replay_sizes_only(
                        sub, ["cpu"], [capacity], policy, block_bytes, fraction
                    )
                    seconds[policy] = min(seconds[policy], time.process_time() - started)
            for policy in policies:
                result, best = results[policy], seconds[policy]
                print(f"{part:<7}{fraction:>9g}  {policy:<8}{result.block_hit_ratio:>10.4f}"
                      f"{result.prefix_hit_ratio:>11.4f}{best:>9.2f}"
                      f"{best / seconds['lru']:>8.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
