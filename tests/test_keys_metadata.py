"""CacheEngineKey's LMCache string form and DiskCacheMetadata."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmtier.errors import InvalidKeyError, LmtierTypeError
from lmtier.keys import CacheEngineKey, check_key
from lmtier.metadata import DiskCacheMetadata

FIELD = st.text(min_size=1).filter(lambda s: "@" not in s)


@given(FIELD, FIELD, st.integers(1, 64), st.data(), FIELD)
def test_to_string_and_from_string_are_inverse(
    fmt: str, model: str, world: int, data: st.DataObject, chunk: str
) -> None:
    worker = data.draw(st.integers(0, world - 1))
    key = CacheEngineKey(fmt, model, world, worker, chunk)
    text = key.to_string()
    assert text == f"{fmt}@{model}@{world}@{worker}@{chunk}"
    assert CacheEngineKey.from_string(text) == key
    assert hash(CacheEngineKey.from_string(text)) == hash(key)


def test_key_is_frozen() -> None:
    key = CacheEngineKey("vllm", "m", 1, 0, "abc")
    with pytest.raises(AttributeError):
        key.chunk_hash = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "args",
    [
        ("vl@lm", "m", 1, 0, "h"),
        ("vllm", "org/model@rev", 1, 0, "h"),
        ("vllm", "m", 1, 0, "a@b"),
        ("vllm", "", 1, 0, "h"),
        ("vllm", "m", 0, 0, "h"),
        ("vllm", "m", 2, 2, "h"),
    ],
)
def test_fields_that_break_the_round_trip_are_rejected(args: tuple[object, ...]) -> None:
    with pytest.raises(InvalidKeyError):
        CacheEngineKey(*args)  # type: ignore[arg-type]


def test_wrong_field_types_are_type_errors() -> None:
    with pytest.raises(LmtierTypeError, match="world_size"):
        CacheEngineKey("vllm", "m", "1", 0, "h")  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["a@b@c@d", "a@b@x@0@h", "a@b@1@0@h@extra"])
def test_malformed_text_is_rejected(text: str) -> None:
    with pytest.raises(InvalidKeyError):
        CacheEngineKey.from_string(text)


def test_check_key() -> None:
    assert check_key("../../etc/passwd\x00") == "../../etc/passwd\x00"
    with pytest.raises(LmtierTypeError, match="int"):
        check_key(12)
    with pytest.raises(InvalidKeyError):
        check_key("")


def test_disk_metadata_carries_what_the_disk_tier_needs() -> None:
    meta = DiskCacheMetadata("/x/ab/cd.safetensors", 1024, (2, 256), torch.float16, "00ff")
    assert (meta.size, meta.shape, meta.dtype) == (1024, (2, 256), torch.float16)
    with pytest.raises(ValueError):
        DiskCacheMetadata("/x", -1)
