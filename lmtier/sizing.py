"""KV-cache sizes from a Hugging Face ``config.json``: bytes per token and per chunk, and how many
tokens and chunks a tier of a given size holds (``lmtier plan``; docs/sizing.md).

Pure arithmetic on the config's fields, no torch and no model weights:

* attention with K and V heads (MHA, GQA, MQA): per layer and token, K and V of every KV head,
  ``2 x num_key_value_heads x head_dim`` elements (``head_dim``, else ``hidden_size /
  num_attention_heads``);
* MLA (DeepSeek-V2/V3, ``kv_lora_rank`` set): per layer and token one compressed latent plus the
  shared rotary key, ``kv_lora_rank + qk_rope_head_dim`` elements, as vLLM and SGLang store it;
* sliding-window layers are counted as full attention: every layer's K and V for every token of
  a chunk. An engine that drops the blocks of sliding layers outside their window (vLLM's
  hybrid KV-cache manager) stores less than this; never more.

What it cannot size (state-space and linear-attention layers, encoder-decoder models,
DeepSeek-V3.2's indexer cache) is an :class:`~lmtier.errors.UnsupportedModelError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtier.errors import ConfigError, UnsupportedModelError

__all__ = [
    "DTYPE_BYTES",
    "GIB",
    "KVGeometry",
    "TierCapacity",
    "chunks_for_tokens",
    "kv_geometry",
    "read_model_config",
    "tier_capacity",
]

GIB = 1024**3

#: Bytes per element of the KV cache, by the names config.json and the engines use.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "float": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "half": 2, "fp16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}  # fmt: skip

# Architectures whose layers keep state other than per-token K and V (or next to it).
_UNSUPPORTED_MODEL_TYPES = {
    "mamba": "state-space (Mamba) layers",
    "mamba2": "state-space (Mamba) layers",
    "falcon_mamba": "state-space (Mamba) layers",
    "jamba": "state-space (Mamba) layers between attention layers",
    "zamba": "state-space (Mamba) layers between attention layers",
    "zamba2": "state-space (Mamba) layers between attention layers",
    "falcon_h1": "state-space (Mamba) layers beside attention",
    "nemotron_h": "state-space (Mamba) layers between attention layers",
    "granitemoehybrid": "state-space (Mamba) layers between attention layers",
    "bamba": "state-space (Mamba) layers between attention layers",
    "qwen3_next": "linear-attention layers",
    "minimax": "linear-attention layers",
    "minimax_text_01": "linear-attention layers",
    "lfm2": "convolution layers between attention layers",
    "rwkv": "recurrent (RWKV) layers",
    "recurrent_gemma": "recurrent layers",
}
_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}


@dataclass(frozen=True)
class KVGeometry:
    """What one token's KV cache is made of, and the dtype it is stored in."""

    model: str
    layers: int
    dtype: str
    dtype_bytes: int
    #: Elements per layer and token: 2 x KV heads x head dim, or MLA's latent width.
    elements_per_layer: int
    kv_heads: int | None = None
    head_dim: int | None = None
    #: MLA: kv_lora_rank and qk_rope_head_dim (None for K/V attention).
    mla: tuple[int, int] | None = None
    sliding_layers: int = 0
    sliding_window: int | None = None

    @property
    def bytes_per_token(self) -> int:
        return self.layers * self.elements_per_layer * self.dtype_bytes

    def bytes_per_chunk(self, tokens_per_chunk: int) -> int:
        return self.bytes_per_token * tokens_per_chunk

    def describe(self) -> str:
        """The formula with this model's numbers, e.g. ``32 layers x 2 (K, V) x 8 KV heads x
        128 head dim x 2 bytes (bfloat16)``."""
        unit = "byte" if self.dtype_bytes == 1 else "bytes"
        dtype = f"{self.dtype_bytes} {unit} ({self.dtype})"
        if self.mla is not None:
            rank, rope = self.mla
            return (
                f"{self.layers} layers x (kv_lora_rank {rank} + qk_rope_head_dim {rope}) "
                f"x {dtype}: MLA, one latent per token and layer"
            )
        return (
            f"{self.layers} layers x 2 (K, V) x {self.kv_heads} KV heads x {self.head_dim} "
            f"head dim x {dtype}"
        )

    def notes(self) -> list[str]:
        """What the figure assumes, in words (sliding-window layers, MLA)."""
        notes = []
        if self.sliding_layers:
            window = f" (window {self.sliding_window:,} tokens)" if self.sliding_window else ""
            notes.append(
                f"{self.sliding_layers} of {self.layers} layers use sliding-window attention"
                f"{window}: counted as full attention, K and V of every token in every layer; "
                "an engine that drops their blocks outside the window stores less"
            )
        if self.mla is not None:
            notes.append(
                "MLA: the latent is not split by tensor parallelism, every rank holds it whole"
            )
        return notes


@dataclass(frozen=True)
class TierCapacity:
    """How much of a model's KV cache ``size_bytes`` holds."""

    name: str
    size_bytes: int
    tokens: int
    chunks: int


def read_model_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A model's config: a mapping as given, or read from a ``config.json`` file or a model
    folder that holds one."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file (give a config.json or its model folder)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config is a JSON object, not {type(data).__name__}")
    return data


def kv_geometry(
    config: Mapping[str, Any], dtype: str | None = None, *, source: str = "config.json"
) -> KVGeometry:
    """The KV geometry ``config`` describes, in ``dtype`` if given (e.g. ``fp8`` for an engine
    run with an fp8 KV cache), else the config's ``torch_dtype`` / ``dtype``."""
    top = config
    if isinstance(config.get("text_config"), Mapping):  # a multimodal model's language part
        config = {**config["text_config"]}
    model = str(config.get("model_type") or top.get("model_type") or "unknown")
    _refuse_unsupported(config, model, source)
    layers = _positive(config, "num_hidden_layers", source)
    name, size = _dtype(dtype or config.get("torch_dtype") or config.get("dtype")
                        or top.get("torch_dtype") or top.get("dtype"), source)  # fmt: skip
    sliding_layers, window = _sliding(config, model, layers)
    if config.get("kv_lora_rank") is not None:
        rank = _positive(config, "kv_lora_rank", source)
        rope = _positive(config, "qk_rope_head_dim", source)
        return KVGeometry(
            model, layers, name, size, rank + rope, mla=(rank, rope),
            sliding_layers=sliding_layers, sliding_window=window,
        )  # fmt: skip
    heads = _positive(config, "num_attention_heads", source)
    kv_heads = (
        _positive(config, "num_key_value_heads", source)
        if config.get("num_key_value_heads") is not None
        else heads
    )
    if config.get("head_dim") is not None:
        head_dim = _positive(config, "head_dim", source)
    else:
        hidden = _positive(config, "hidden_size", source)
        if hidden % heads:
            raise ConfigError(
                f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads "
                f"{heads}, and no head_dim is given"
            )
        head_dim = hidden // heads
    return KVGeometry(
        model, layers, name, size, 2 * kv_heads * head_dim, kv_heads=kv_heads,
        head_dim=head_dim, sliding_layers=sliding_layers, sliding_window=window,
    )  # fmt: skip


def chunks_for_tokens(tokens: int, tokens_per_chunk: int) -> int:
    """Chunks (engine blocks) a request of ``tokens`` tokens occupies, the last one partial."""
    return math.ceil(tokens / tokens_per_chunk)


def tier_capacity(
    name: str, size_bytes: int, geometry: KVGeometry, tokens_per_chunk: int
) -> TierCapacity:
    """Whole chunks ``size_bytes`` holds, and their tokens."""
    chunks = size_bytes // geometry.bytes_per_chunk(tokens_per_chunk)
    return TierCapacity(name, size_bytes, chunks * tokens_per_chunk, chunks)


def _refuse_unsupported(config: Mapping[str, Any], model: str, source: str) -> None:
    def refuse(why: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{source}: model_type {model!r} has {why}: sizing it is not supported yet"
        )

    if model in _UNSUPPORTED_MODEL_TYPES:
        raise refuse(_UNSUPPORTED_MODEL_TYPES[model])
    if config.get("is_encoder_decoder"):
        raise refuse("an encoder and a decoder (cross-attention KV)")
    if config.get("index_topk") is not None:
        raise refuse("an indexer cache beside its MLA latent (DeepSeek-V3.2 sparse attention)")
    ssm = sorted(key for key in config if key.startswith(("mamba_", "ssm_", "linear_attn")))
    if ssm:
        raise refuse(f"state-space or linear-attention layers ({', '.join(ssm[:3])})")
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list):
        other = sorted({str(kind) for kind in layer_types} - _LAYER_TYPES)
        if other:
            raise refuse(f"layers of type {', '.join(other)}")


def _sliding(config: Mapping[str, Any], model: str, layers: int) -> tuple[int, int | None]:
    """Sliding-window layers and their window, as transformers assigns them."""
    window = config.get("sliding_window")
    window = window if isinstance(window, int) and window > 0 else None
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list):
        count = sum(kind in ("sliding_attention", "chunked_attention") for kind in layer_types)
        return count, window if count else None
    if window is None or config.get("use_sliding_window") is False:
        return 0, None
    if model == "gemma2":  # every other layer, the first one sliding
        return (layers + 1) // 2, window
    pattern = config.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1:  # Gemma 3: every pattern-th layer is global
        return layers - layers // pattern, window
    if config.get("use_sliding_window") is True:  # Qwen2: the layers from max_window_layers on
        first = config.get("max_window_layers")
        first = first if isinstance(first, int) and 0 <= first <= layers else 0
        return layers - first, window if layers > first else None
    return layers, window  # Mistral: every layer


def _positive(config: Mapping[str, Any], field: str, source: str) -> int:
    value = config.get(field)
    if value is None:
        raise ConfigError(f"{source}: no {field!r}: is this a Hugging Face model's config.json?")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{source}: {field} must be a whole number > 0, not {value!r}")
    return value


def _dtype(value: object, source: str) -> tuple[str, int]:
    if value is None:
        raise ConfigError(f"{source}: no 'torch_dtype' or 'dtype': give the KV dtype (--dtype)")
    name = str(value).lower().removeprefix("torch.")
    if name not in DTYPE_BYTES:
        known = ", ".join(sorted(DTYPE_BYTES))
        raise UnsupportedModelError(
            f"{source}: KV dtype {value!r} is not supported yet (known: {known})"
        )
    return name, DTYPE_BYTES[name]
