"""lmtier.sizing against KV sizes computed by hand from published config.json files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lmtier.errors import ConfigError, UnsupportedModelError
from lmtier.sizing import (
    GIB,
    chunks_for_tokens,
    kv_geometry,
    read_model_config,
    tier_capacity,
)

MODELS = Path(__file__).resolve().parent / "data" / "models"


def _config(name: str) -> dict[str, Any]:
    return read_model_config(MODELS / f"{name}.json")


# Per token: layers x 2 (K and V) x KV heads x head dim x bytes per element; MLA: layers x
# (kv_lora_rank + qk_rope_head_dim) x bytes per element.
HAND_COMPUTED = {
    # 32 layers, 8 KV heads (GQA), head dim 4096 / 32 heads = 128, bfloat16
    "Meta-Llama-3-8B": 32 * 2 * 8 * 128 * 2,  # 131,072 = 128 KiB
    # 28 layers, 4 KV heads, head dim 3584 / 28 = 128, bfloat16
    "Qwen2.5-7B": 28 * 2 * 4 * 128 * 2,  # 57,344 = 56 KiB
    # 32 layers, 8 KV heads, head dim 4096 / 32 = 128, bfloat16; sliding window 4096
    "Mistral-7B-v0.1": 32 * 2 * 8 * 128 * 2,  # 131,072
    # MLA: 27 layers x (512 + 64) latent, bfloat16 (not 16 heads x (128 + 128) per layer)
    "DeepSeek-V2-Lite": 27 * (512 + 64) * 2,  # 31,104
    # 42 layers, 8 KV heads, head_dim 256 given (not 3584 / 16 = 224), bfloat16
    "gemma-2-9b-it": 42 * 2 * 8 * 256 * 2,  # 344,064 = 336 KiB
}


def test_the_hand_computed_figures_are_the_expected_constants() -> None:
    assert HAND_COMPUTED["Meta-Llama-3-8B"] == 131_072
    assert HAND_COMPUTED["Qwen2.5-7B"] == 57_344
    assert HAND_COMPUTED["DeepSeek-V2-Lite"] == 31_104
    assert HAND_COMPUTED["gemma-2-9b-it"] == 344_064


@pytest.mark.parametrize("name", sorted(HAND_COMPUTED))
def test_bytes_per_token_and_chunk_match_the_hand_computed_ones(name: str) -> None:
    geometry = kv_geometry(_config(name))
    assert geometry.bytes_per_token == HAND_COMPUTED[name]
    assert geometry.bytes_per_chunk(16) == 16 * HAND_COMPUTED[name]
    assert geometry.bytes_per_chunk(256) == 256 * HAND_COMPUTED[name]
    assert geometry.dtype == "bfloat16"


def test_gqa_geometry_reads_kv_heads_and_derives_head_dim() -> None:
    geometry = kv_geometry(_config("Qwen2.5-7B"))
    assert (geometry.layers, geometry.kv_heads, geometry.head_dim) == (28, 4, 128)
    assert geometry.mla is None
    assert geometry.describe() == (
        "28 layers x 2 (K, V) x 4 KV heads x 128 head dim x 2 bytes (bfloat16)"
    )


def test_mla_stores_one_latent_per_token_and_layer() -> None:
    geometry = kv_geometry(_config("DeepSeek-V2-Lite"))
    assert geometry.mla == (512, 64)
    assert geometry.kv_heads is None
    # A K/V count would be 27 x 2 x 16 heads x 192 x 2 = 331,776: over ten times the latent.
    assert geometry.bytes_per_token * 10 < 27 * 2 * 16 * 192 * 2
    assert "MLA" in geometry.describe()


def test_sliding_window_layers_are_counted_as_full_attention_and_said_so() -> None:
    mistral = kv_geometry(_config("Mistral-7B-v0.1"))
    assert (mistral.sliding_layers, mistral.sliding_window) == (32, 4096)
    gemma = kv_geometry(_config("gemma-2-9b-it"))
    assert (gemma.sliding_layers, gemma.sliding_window) == (21, 4096)  # every other of 42
    for geometry in (mistral, gemma):
        assert any("counted as full attention" in note for note in geometry.notes())


def test_qwen2_sliding_window_is_off_unless_use_sliding_window() -> None:
    config = _config("Qwen2.5-7B")
    assert kv_geometry(config).sliding_layers == 0
    assert kv_geometry(config).notes() == []
    # use_sliding_window: the layers from max_window_layers on slide.
    config.update(use_sliding_window=True, max_window_layers=20, sliding_window=32768)
    assert kv_geometry(config).sliding_layers == 28 - 20


def test_layer_types_decide_the_sliding_layers() -> None:
    config = _config("Meta-Llama-3-8B")
    config.update(layer_types=["sliding_attention", "full_attention"] * 16, sliding_window=512)
    assert (kv_geometry(config).sliding_layers, kv_geometry(config).sliding_window) == (16, 512)


@pytest.mark.parametrize(
    ("dtype", "per_element"), [("fp8", 1), ("float16", 2), ("float32", 4), ("torch.bfloat16", 2)]
)
def test_the_dtype_override_sets_bytes_per_element(dtype: str, per_element: int) -> None:
    geometry = kv_geometry(_config("Meta-Llama-3-8B"), dtype)
    assert geometry.bytes_per_token == 32 * 2 * 8 * 128 * per_element


def test_the_dtype_key_of_newer_configs_is_read() -> None:
    config = _config("Meta-Llama-3-8B")
    del config["torch_dtype"]
    config["dtype"] = "float32"
    assert kv_geometry(config).bytes_per_token == 32 * 2 * 8 * 128 * 4


def test_mha_without_kv_heads_and_a_nested_text_config() -> None:
    text = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4,
            "hidden_size": 64, "torch_dtype": "float16"}  # fmt: skip
    assert kv_geometry(text).bytes_per_token == 2 * 2 * 4 * 16 * 2  # MHA: 4 KV heads of 16
    assert kv_geometry({"text_config": text, "model_type": "llava"}).bytes_per_token == 512


def test_tier_capacity_counts_whole_chunks() -> None:
    geometry = kv_geometry(_config("Meta-Llama-3-8B"))  # 2 MiB per 16-token chunk
    cpu = tier_capacity("cpu", 16 * GIB, geometry, 16)
    assert (cpu.chunks, cpu.tokens) == (16 * 1024 // 2, 16 * 1024 // 2 * 16)  # 8,192; 131,072
    partial = tier_capacity("disk", 5 * 1024**2, geometry, 16)  # 2.5 chunks
    assert (partial.chunks, partial.tokens) == (2, 32)
    assert chunks_for_tokens(2064, 16) == 129 and chunks_for_tokens(2048, 16) == 128


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"model_type": "jamba"}, "model_type 'jamba' has state-space"),
        ({"model_type": "qwen3_next"}, "linear-attention layers: sizing it is not supported yet"),
        ({"is_encoder_decoder": True}, "an encoder and a decoder"),
        ({"index_topk": 2048}, "indexer cache"),
        ({"mamba_d_state": 16}, "state-space or linear-attention layers"),
        ({"layer_types": ["linear_attention"] * 32}, "layers of type linear_attention"),
        ({"torch_dtype": "int4"}, "KV dtype 'int4' is not supported yet"),
    ],
)
def test_what_cannot_be_sized_is_refused_as_not_supported_yet(
    update: dict[str, Any], message: str
) -> None:
    config = {**_config("Meta-Llama-3-8B"), **update}
    with pytest.raises(UnsupportedModelError, match=message):
        kv_geometry(config, source="m.json")


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"num_hidden_layers": None}, "no 'num_hidden_layers'"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a whole number > 0, not 0"),
        ({"hidden_size": 4100}, "not a multiple of num_attention_heads"),
        ({"torch_dtype": None}, "no 'torch_dtype' or 'dtype'"),
    ],
)
def test_a_malformed_config_is_a_config_error_naming_the_field(
    update: dict[str, Any], message: str
) -> None:
    config = {**_config("Meta-Llama-3-8B"), **update}
    with pytest.raises(ConfigError, match=message) as raised:
        kv_geometry(config, source="m.json")
    assert not isinstance(raised.value, UnsupportedModelError)
    assert str(raised.value).startswith("m.json: ")


def test_read_model_config_takes_a_file_a_folder_or_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    assert read_model_config(tmp_path) == read_model_config(tmp_path / "config.json") == {"a": 1}
    assert read_model_config({"b": 2}) == {"b": 2}
    with pytest.raises(ConfigError, match="no such file"):
        read_model_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        read_model_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigError, match="a JSON object, not list"):
        read_model_config(tmp_path / "list.json")
