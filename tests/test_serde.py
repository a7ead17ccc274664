"""The entry format's pure pieces: a tensor's bytes as a view, and headers that round-trip."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from lmtier import CacheEngineKey, serde
from lmtier.errors import CorruptEntryError


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8, torch.bool])
def test_payload_view_is_the_tensors_own_writable_memory(dtype: torch.dtype) -> None:
    tensor = torch.zeros(4, 6, dtype=dtype)
    view = serde.payload_view(tensor)
    assert view.nbytes == tensor.numel() * tensor.element_size()
    assert view.format == "B" and not view.readonly
    view[:] = bytes(range(view.nbytes))  # writes land in the tensor
    assert bytes(serde.payload_view(tensor)) == bytes(range(view.nbytes))


def test_payload_view_keeps_the_memory_alive() -> None:
    view = serde.payload_view(torch.arange(1 << 20, dtype=torch.int32))
    gc.collect()  # the tensor has no other reference: only the view keeps it
    torch.empty(1 << 20, dtype=torch.int32).fill_(-1)  # memory a freed tensor would give back
    assert view[4:8].tobytes() == (1).to_bytes(4, "little")
    assert view[-4:].tobytes() == ((1 << 20) - 1).to_bytes(4, "little")


def test_payload_view_of_a_non_contiguous_tensor_is_of_its_contiguous_copy() -> None:
    tensor = torch.arange(12, dtype=torch.int16).reshape(3, 4).t()
    assert bytes(serde.payload_view(tensor)) == bytes(serde.payload_view(tensor.contiguous()))


@pytest.mark.parametrize(
    "key", ["plain", 'quote " and \\ back', "ünïcode ✓", CacheEngineKey("vllm", "m", 2, 0, "ab")]
)
def test_a_header_round_trips(key: str | CacheEngineKey) -> None:
    header = serde.encode_header(key, torch.bfloat16, (2, 3, 4), 48, "0123abcd", "space")
    assert len(header) % 8 == 0  # the payload starts 8-byte aligned
    decoded = serde.decode_header(header + bytes(48))
    assert decoded == (key, torch.bfloat16, (2, 3, 4), 48, "0123abcd", len(header), "space")


@pytest.mark.parametrize("shape", [(7,), (2, 16, 256, 128), ()])
@pytest.mark.parametrize("key", ["k", 'q"\\\n', "ü", CacheEngineKey("vllm", "m", 2, 0, "ab")])
def test_a_header_is_the_compact_json_of_its_fields(
    key: str | CacheEngineKey, shape: tuple[int, ...]
) -> None:
    engine = isinstance(key, CacheEngineKey)
    fields = {
        "__metadata__": {
            "format": serde.FORMAT_TAG,
            "version": str(serde.FORMAT_VERSION),
            "namespace": "ns ✓",
            "key_type": "engine" if engine else "str",
            "key": key.to_string() if isinstance(key, CacheEngineKey) else key,
            "checksum": "00ff",
        },
        "kv": {"dtype": "F16", "shape": list(shape), "data_offsets": [0, 64]},
    }
    header = serde.encode_header(key, torch.float16, shape, 64, "00ff", "ns ✓")
    assert header[8:].rstrip(b" ") == json.dumps(fields, separators=(",", ":")).encode()
    assert int.from_bytes(header[:8], "little") == len(header) - 8


def test_a_header_whose_offsets_disagree_with_its_shape_is_corrupt() -> None:
    header = serde.encode_header("k", torch.float32, (2, 3), 20, "00")
    with pytest.raises(CorruptEntryError, match="do not match"):
        serde.decode_header(header)
