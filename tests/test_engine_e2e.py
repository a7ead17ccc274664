"""A real model implementation reuses cached prefix KV from each tier and gets the same logits."""

from __future__ import annotations

import inspect
import runpy
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lmtier import StoreConfig, TierConfig, TieredStore
from lmtier.engine import ChunkSpec, KVCacheEngine, fingerprint_tensors, token_chunks

# The KV cache's argument and output field: ``cache`` from transformers 5 on (which deprecates
# ``past_key_values``, to be removed in 5.40), ``past_key_values`` before.
FORWARD_ARGS = inspect.signature(LlamaForCausalLM.forward).parameters
CACHE = "cache" if "cache" in FORWARD_ARGS else "past_key_values"

CHUNK = 16
KIB = 1024


def tiny_llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def spec_for(model: LlamaForCausalLM) -> ChunkSpec:
    weights = fingerprint_tensors(model.state_dict().values())
    return ChunkSpec("tiny-llama", chunk_size=CHUNK, namespace=f"{weights}|float32|hnd")


def engine_kv(cache: DynamicCache, count: int) -> torch.Tensor:
    """The model's cache as lmtier's layout: [layers, 2, tokens, kv_heads, head_dim]."""
    return torch.stack(
        [
            torch.stack([layer.keys[0, :, :count], layer.values[0, :, :count]]).transpose(1, 2)
            for layer in cache.layers
        ]
    )


def model_cache(kv: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    for index, layer in enumerate(kv):
        keys, values = layer.transpose(1, 2).unsqueeze(1)  # -> [1, heads, tokens, dim] each
        cache.update(keys.contiguous(), values.contiguous(), index)
    return cache


# budgets (gpu role, cpu, disk) so that 8 KiB chunks land in the named tier
BUDGETS = {"gpu": (64 * KIB, 64 * KIB), "cpu": (4 * KIB, 64 * KIB), "disk": (4 * KIB, 4 * KIB)}


@pytest.mark.parametrize("tier", ["gpu", "cpu", "disk"])
async def test_reused_prefix_gives_the_logits_of_a_full_recompute(
    tmp_path: Path, tier: str
) -> None:
    gpu, cpu = BUDGETS[tier]
    config = StoreConfig(
        (
            TierConfig("gpu", "memory", gpu),  # a CPU memory tier in the GPU's role
            TierConfig("cpu", "memory", cpu),
            TierConfig("disk", "disk", 256 * KIB, path=str(tmp_path)),
        ),
        promote_on_hit=False,
    )
    model = tiny_llama(0)
    generator = torch.Generator().manual_seed(1)
    request_a = torch.randint(0, 128, (3 * CHUNK + 5,), generator=generator)
    request_b = torch.cat(
        [request_a[: 2 * CHUNK], torch.randint(0, 128, (12,), generator=generator)]
    )
    async with TieredStore(config) as store:
        engine = KVCacheEngine(store, spec_for(model))
        with torch.no_grad():
            prefill = getattr(model(input_ids=request_a[None], use_cache=True), CACHE)
        kv_a = engine_kv(prefill, len(request_a))
        assert await engine.store(request_a, kv_a) == 3 * CHUNK

        assert await engine.lookup(request_b) == 2 * CHUNK
        first_chunk = token_chunks(engine.spec, request_b)[0].key
        assert await store.contains(first_chunk) == tier
        reused, kv = await engine.retrieve(request_b)
        assert reused == 2 * CHUNK and kv is not None
        with torch.no_grad():
            suffix = model(input_ids=request_b[None, reused:], **{CACHE: model_cache(kv)})
            full = model(input_ids=request_b[None])
        difference = (suffix.logits[0, -1] - full.logits[0, -1]).abs().max().item()
        assert difference <= 1e-4, difference

        other = KVCacheEngine(store, spec_for(tiny_llama(1)))
        assert other.spec.namespace != engine.spec.namespace
        assert await other.lookup(request_b) == 0, "another model's weights hit this cache"
        assert store.audit() == []


def test_the_example_engine_loop_reuses_the_shared_system_prompt(
    capsys: pytest.CaptureFixture[str],
) -> None:
    script = Path(__file__).parent.parent / "scripts" / "engine_loop.py"
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and "reused 0" in lines[0]
    assert all("reused 48" in line for line in lines[1:4])  # the 48-token system prompt
    assert "reused 64" in lines[4], "a repeated prompt reuses all its full chunks"
    assert lines[4].rsplit(" ", 1)[1] == lines[1].rsplit(" ", 1)[1], "same next token"
