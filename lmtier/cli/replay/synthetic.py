"""A seeded synthetic multi-turn chat workload, as a ``Trace`` of prefix-chained block ids.

A fixed set of users (session slots) is chosen per request with Zipf-distributed popularity.
Each user holds one conversation at a time: it starts from one of a few shared system prompts
(themselves Zipf-popular) plus a first message, and each later turn re-reads the whole
conversation so far and appends new blocks (the previous answer and the next message).  A
user's next request continues its conversation with probability ``continue_prob`` and starts a
new one otherwise, or when the conversation would outgrow the context window.  Ids are
prefix-chained like Mooncake's: a system prompt's blocks are shared, every other block is
fresh, so one id always names the same whole prefix.

The defaults are loosely calibrated to Mooncake's conversation trace (12,031 requests, 288,500
references, 182,790 distinct blocks, 75.8% of them used once, ceiling 0.3664); they give
12,000 requests, 294,270 references, 168,922 distinct blocks, 76.9% used once, ceiling 0.4260.
Its reuse is nearer in time than the real trace's (a popular user's next turn comes soon), so
LRU gets closer to OPT on it: a workload with another shape, not a copy.

``synthetic:shared-prompt`` is the same generator with other defaults: 64 long system prompts
(16-48 blocks, 8k-24k tokens: agents' instructions and tool definitions) of Zipf(1.0)
popularity, and short, mostly single-turn sessions (4 new blocks a request on average, a 20%
chance to continue).  Most references are to the shared prompts (ceiling 0.8966: 12,000
requests, 482,607 references, 49,887 distinct blocks, 81.4% of them used once), and at small
capacities the prompts themselves compete for the room.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, fields, replace

from lmtier.cli.replay.traces import Request, Trace
from lmtier.errors import TraceError

__all__ = [
    "SYNTHETIC_KINDS",
    "SYNTHETIC_PREFIX",
    "SyntheticSpec",
    "parse_synthetic",
    "synthetic_trace",
]

#: A trace argument naming the generator: ``synthetic:zipf`` or ``synthetic:shared-prompt``.
SYNTHETIC_PREFIX = "synthetic:"


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the generator; the same spec always gives the same trace."""

    requests: int = 12_000
    sessions: int = 6_000  # users, each with one conversation at a time
    alpha: float = 1.0  # Zipf exponent of user popularity (rank r chosen with weight r^-alpha)
    seed: int = 0
    system_prompts: int = 8
    system_alpha: float = 1.2  # Zipf exponent of system prompt popularity
    system_blocks_min: int = 1  # a system prompt has system_blocks_min..system_blocks_max blocks
    system_blocks_max: int = 8
    first_blocks: float = 16.0  # mean new blocks in a conversation's first request (geometric)
    turn_blocks: float = 8.0  # mean new blocks a later turn appends (geometric)
    max_context_blocks: int = 128  # 64k tokens: a longer conversation ends and restarts
    continue_prob: float = 0.3  # the chance a user's next request continues its conversation
    interarrival_ms: float = 300.0  # mean gap between requests (exponential)

    def __post_init__(self) -> None:
        for name in ("requests", "sessions", "system_prompts", "system_blocks_max"):
            if getattr(self, name) < 1:
                raise TraceError(f"synthetic trace: {name} must be >= 1")
        if self.first_blocks < 1 or self.turn_blocks < 1:
            raise TraceError("synthetic trace: first_blocks and turn_blocks must be >= 1")
        if self.system_blocks_min > self.system_blocks_max:
            raise TraceError("synthetic trace: system_blocks_min must not exceed system_blocks_max")
        if self.max_context_blocks <= self.system_blocks_max:
            raise TraceError("synthetic trace: max_context_blocks must exceed system_blocks_max")
        if not 0 <= self.continue_prob <= 1:
            raise TraceError("synthetic trace: continue_prob must be within [0, 1]")
        if self.alpha < 0 or self.system_alpha < 0 or self.interarrival_ms < 0:
            raise TraceError("synthetic trace: alpha, system_alpha, interarrival_ms must be >= 0")


def synthetic_trace(spec: SyntheticSpec | None = None) -> Trace:
    """The multi-turn chat trace ``spec`` describes (512-token blocks, format ``synthetic``)."""
    spec = spec or SyntheticSpec()
    rng = random.Random(spec.seed)
    fresh = itertools.count()
    prompts = [
        tuple(
            next(fresh) for _ in range(rng.randint(spec.system_blocks_min, spec.system_blocks_max))
        )
        for _ in range(spec.system_prompts)
    ]
    pick_user = _zipf(spec.sessions, spec.alpha)
    pick_prompt = _zipf(spec.system_prompts, spec.system_alpha)
    # Ranks are shuffled onto users so that popularity does not follow creation order.
    users = list(range(spec.sessions))
    rng.shuffle(users)
    conversations: dict[int, list[int]] = {}
    requests = []
    now = 0.0
    for _ in range(spec.requests):
        user = users[pick_user(rng)]
        context = conversations.get(user)
        new = _geometric(rng, spec.turn_blocks)
        ended = rng.random() >= spec.continue_prob
        if context is None or ended or len(context) + new > spec.max_context_blocks:
            context = list(prompts[pick_prompt(rng)])
            new = _geometric(rng, spec.first_blocks)
            new = min(new, spec.max_context_blocks - len(context))
            conversations[user] = context
        context.extend(next(fresh) for _ in range(new))
        requests.append(Request(round(now), tuple(context)))
        now += rng.expovariate(1 / spec.interarrival_ms) if spec.interarrival_ms else 0.0
    return Trace(tuple(requests), 512, "synthetic")


#: Each generator name's defaults (``synthetic:NAME``); parameters given override them.
SYNTHETIC_KINDS: dict[str, SyntheticSpec] = {
    "zipf": SyntheticSpec(),
    "shared-prompt": SyntheticSpec(
        system_prompts=64,
        system_alpha=1.0,
        system_blocks_min=16,
        system_blocks_max=48,
        first_blocks=4.0,
        turn_blocks=4.0,
        continue_prob=0.2,
    ),
}


def parse_synthetic(text: str, **overrides: float | None) -> SyntheticSpec:
    """The spec a trace argument ``synthetic:NAME`` names, with the non-None ``overrides``."""
    kind = text[len(SYNTHETIC_PREFIX) :] if text.startswith(SYNTHETIC_PREFIX) else ""
    if kind not in SYNTHETIC_KINDS:
        names = ", ".join(SYNTHETIC_PREFIX + name for name in SYNTHETIC_KINDS)
        raise TraceError(f"unknown synthetic trace {text!r}; known: {names}")
    known = {f.name: f.type for f in fields(SyntheticSpec)}
    values: dict[str, float | int] = {}
    for name, value in overrides.items():
        if name not in known:
            raise TraceError(f"synthetic trace: unknown parameter {name!r}")
        if value is not None:
            values[name] = int(value) if known[name] == "int" else float(value)
    return replace(SYNTHETIC_KINDS[kind], **values)  # type: ignore[arg-type]


def _zipf(count: int, alpha: float) -> _Picker:
    cumulative = list(itertools.accumulate((rank + 1) ** -alpha for rank in range(count)))
    return _Picker(cumulative)


class _Picker:
    """Draws an index with probability proportional to its weight (O(log n) a draw)."""

    def __init__(self, cumulative: list[float]) -> None:
        self.cumulative = cumulative
        self.total = cumulative[-1]

    def __call__(self, rng: random.Random) -> int:
        index = bisect.bisect_right(self.cumulative, rng.random() * self.total)
        return min(index, len(self.cumulative) - 1)


def _geometric(rng: random.Random, mean: float) -> int:
    """A count >= 1 with the given mean, geometric (memoryless: most short, a few long)."""
    if mean <= 1:
        return 1
    keep = 1 - 1 / mean  # the chance of one more block
    return 1 + int(math.log(1 - rng.random()) / math.log(keep))
