"""A toy engine loop: prompts sharing a system prompt, served through lmtier's paged adapter.

    python scripts/engine_loop.py      # needs transformers (pip install 'lmtier[examples]')

A tiny Llama with random weights (nothing is downloaded) keeps its KV in vLLM-style paged
buffers. Each request loads its cached prefix from lmtier into its blocks, computes only the
rest, saves its full chunks back, and reports how many tokens it reused.
"""

from __future__ import annotations

import asyncio
import inspect
import tempfile

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lmtier import StoreConfig, TierConfig, TieredStore
from lmtier.engine import ChunkSpec, KVCacheEngine, PagedKVAdapter, fingerprint_tensors

# The KV cache's argument and output field: ``cache`` from transformers 5 on (which deprecates
# ``past_key_values``, to be removed in 5.40), ``past_key_values`` before.
FORWARD_ARGS = inspect.signature(LlamaForCausalLM.forward).parameters
CACHE = "cache" if "cache" in FORWARD_ARGS else "past_key_values"

BLOCK, CHUNK, NUM_BLOCKS = 8, 16, 128


def paged_to_cache(caches: list[torch.Tensor], blocks: list[int], count: int) -> DynamicCache:
    """The first ``count`` tokens of a request's blocks as the model's cache."""
    cache = DynamicCache()
    index = torch.tensor(blocks, dtype=torch.long)
    for layer, paged in enumerate(caches):
        kv = paged.index_select(1, index).flatten(1, 2)[:, :count]  # [2, tokens, heads, dim]
        keys, values = kv.transpose(1, 2).unsqueeze(1)
        cache.update(keys.contiguous(), values.contiguous(), layer)
    return cache


def cache_to_paged(
    cache: DynamicCache, caches: list[torch.Tensor], blocks: list[int], start: int, end: int
) -> None:
    """Write the model's KV for tokens ``start..end`` into the request's blocks."""
    positions = torch.arange(start, end)
    block_index = torch.tensor(blocks, dtype=torch.long)[positions // BLOCK]
    offsets = positions % BLOCK
    for layer, paged in zip(cache.layers, caches, strict=True):
        paged[0, block_index, offsets] = layer.keys[0, :, start:end].transpose(0, 1)
        paged[1, block_index, offsets] = layer.values[0, :, start:end].transpose(0, 1)


async def main() -> None:
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    caches = [
        torch.zeros(2, NUM_BLOCKS, BLOCK, heads, dim) for _ in range(config.num_hidden_layers)
    ]
    namespace = f"{fingerprint_tensors(model.state_dict().values())}|float32|paged"
    system = torch.randint(0, 256, (48,)).tolist()
    questions = [torch.randint(0, 256, (n,)).tolist() for n in (10, 23, 7, 31)]
    prompts = [system + q for q in questions] + [system + questions[1]]  # the last one repeats
    with tempfile.TemporaryDirectory() as folder:
        store_config = StoreConfig(
            (
                TierConfig("cpu", "memory", 1 << 20),
                TierConfig("disk", "disk", 8 << 20, path=folder),
            ),
            namespace=namespace,
        )
        async with TieredStore(store_config) as store:
            engine = KVCacheEngine(
                store, ChunkSpec("tiny-llama", chunk_size=CHUNK, namespace=namespace)
            )
            adapter = PagedKVAdapter(engine, caches)
            free = list(range(NUM_BLOCKS))
            for number, tokens in enumerate(prompts):
                blocks = [free.pop() for _ in range(-(-len(tokens) // BLOCK))]
                reused = await adapter.load(tokens, blocks)
                prefix = paged_to_cache(caches, blocks, reused)
                with torch.no_grad():
                    out = model(input_ids=torch.tensor([tokens[reused:]]), **{CACHE: prefix})
                cache_to_paged(getattr(out, CACHE), caches, blocks, reused, len(tokens))
                await adapter.save(tokens, blocks)
                next_token = int(out.logits[0, -1].argmax())
                print(
                    f"request {number}: {len(tokens)} prompt tokens, reused {reused}, "
                    f"computed {len(tokens) - reused}, next token {next_token}"
                )
                free.extend(blocks)


if __name__ == "__main__":
    asyncio.run(main())
