"""``lmtier bench --engine``: the requests of a trace as token prompts with the trace's reuse.

A trace names each 512-token block of a request's input by a prefix-chained hash id (the same
id: the same whole prefix up to that block).  A prompt gives each id ``tokens_per_id`` tokens
drawn from a generator seeded by the id, so two requests share exactly the tokens of the ids
they share, and an engine's prefix cache can find exactly the reuse the trace has.

Consecutive requests of the raw conversation trace share little beyond the system prompt
(its first id): in its first 100 requests about 4% of the tokens could come from a cache.
Its conversations (the requests that share the id after the system prompt, ``hash_ids[1]``)
come back minutes apart, so the replay takes consecutive requests of the conversations with
at least ``min_turns`` requests, in trace order: the requests a cache exists for.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from lmtier.cli.replay.traces import Request, Trace
from lmtier.errors import TraceError

__all__ = ["PromptPlan", "build_prompts", "conversation_requests", "reuse_ceiling"]


@dataclass(frozen=True)
class PromptPlan:
    """How trace requests become prompts: tokens per hash id, the longest prompt, the
    vocabulary tokens are drawn from, and the selection (``start``, ``count``, ``min_turns``)."""

    count: int
    tokens_per_id: int = 64
    max_prompt_tokens: int = 4096
    vocab: int = 32000
    min_turns: int = 5
    start: int = 0


def conversation_requests(trace: Trace, plan: PromptPlan) -> list[Request]:
    """``plan.count`` consecutive requests (from ``plan.start``) of the conversations that have
    at least ``plan.min_turns`` requests (``min_turns`` 1: the trace as it is)."""
    turns = Counter(r.hash_ids[1] for r in trace.requests if len(r.hash_ids) > 1)
    chosen = [
        r
        for r in trace.requests
        if plan.min_turns <= 1 or (len(r.hash_ids) > 1 and turns[r.hash_ids[1]] >= plan.min_turns)
    ]
    picked = chosen[plan.start : plan.start + plan.count]
    if len(picked) < plan.count:
        raise TraceError(
            f"the trace has {len(chosen)} requests in conversations of >= {plan.min_turns} "
            f"requests; {plan.count} from {plan.start} asked"
        )
    return picked


def _id_tokens(hash_id: int, count: int, vocab: int) -> list[int]:
    rng = random.Random(hash_id)
    return [rng.randrange(1, vocab) for _ in range(count)]


def build_prompts(requests: Sequence[Request], plan: PromptPlan) -> list[list[int]]:
    """One prompt per request: ``tokens_per_id`` tokens per hash id, cut to whole ids within
    ``max_prompt_tokens``."""
    ids_per_prompt = max(1, plan.max_prompt_tokens // plan.tokens_per_id)
    cache: dict[int, list[int]] = {}
    prompts = []
    for request in requests:
        prompt: list[int] = []
        for hash_id in request.hash_ids[:ids_per_prompt]:
            if hash_id not in cache:
                cache[hash_id] = _id_tokens(hash_id, plan.tokens_per_id, plan.vocab)
            prompt.extend(cache[hash_id])
        prompts.append(prompt)
    return prompts


def reuse_ceiling(prompts: Sequence[Sequence[int]], block_tokens: int) -> float:
    """The fraction of prompt tokens in whole blocks an earlier prompt began with (short of
    each prompt's last token, which an engine always computes): the most an infinite cache
    that starts empty can serve."""
    names: dict[tuple[int, tuple[int, ...]], int] = {}  # (previous block's name, tokens)
    hit = total = 0
    for prompt in prompts:
        total += len(prompt)
        name, reused = -1, True
        for end in range(block_tokens, len(prompt), block_tokens):
            key = (name, tuple(prompt[end - block_tokens : end]))
            if key in names and reused:
                hit += block_tokens
            else:
                reused = False
                names.setdefault(key, len(names))
            name = names[key]
    return hit / max(total, 1)
