"""The entry format's pure pieces: a tensor's bytes as a view, and headers that round-trip."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from lmtier import CacheEngineKey, checksums, serde
from lmtier.errors import CorruptEntryError, InvalidValueError


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
    checksum = "0123456789abcdef"
    header = serde.encode_header(key, torch.bfloat16, (2, 3, 4), 48, checksum, "space")
    assert len(header) % serde.PAYLOAD_ALIGN == 0  # the payload starts aligned in its file
    decoded = serde.decode_header(header + bytes(48))
    assert decoded == (key, torch.bfloat16, (2, 3, 4), 48, checksum, len(header), "space")


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
    header = serde.encode_header("k", torch.float32, (2, 3), 20, "00" * 8)
    with pytest.raises(CorruptEntryError, match="do not match"):
        serde.decode_header(header)


def _fields(**changes: object) -> dict[str, object]:
    """A valid header's JSON fields for a 6-element float32 tensor, with ``changes`` applied
    (``meta.<name>`` in the metadata, ``kv.<name>`` in the tensor's entry)."""
    meta: dict[str, object] = {
        "format": serde.FORMAT_TAG,
        "version": str(serde.FORMAT_VERSION),
        "namespace": "",
        "key_type": "str",
        "key": "k",
        "checksum": "0123456789abcdef",
    }
    info: dict[str, object] = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    fields: dict[str, object] = {"__metadata__": meta, "kv": info}
    for name, value in changes.items():
        where, _, field = name.partition("__")
        target = {"meta": meta, "kv": info, "top": fields}[where]
        if value is _DROP:
            del target[field]
        else:
            target[field] = value
    return fields


_DROP = "<drop>"


def _raw_header(fields: object, tail: bytes = b"") -> bytes:
    text = json.dumps(fields, separators=(",", ":")).encode() + tail
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def test_the_reference_fields_decode() -> None:
    header = serde.decode_header(_raw_header(_fields()))
    assert (header.key, header.dtype, header.shape, header.nbytes) == (
        "k",
        torch.float32,
        (2, 3),
        24,
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"kv__shape": [-2, -3]},  # numel 6, bytes 24: only the signs are wrong
        {"kv__shape": [2.0, 3]},
        {"kv__shape": [True, 6]},
        {"kv__shape": ["2", 3]},
        {"kv__shape": 6},
        {"kv__data_offsets": [0.0, 24]},
        {"kv__data_offsets": [0, 24, 0]},
        {"kv__dtype": "C64"},
        {"kv__dtype": ["F32"]},
        {"kv__extra": 1},
        {"meta__key_type": "other"},
        {"meta__key_type": _DROP},
        {"meta__key": 7},
        {"meta__key": ""},
        {"meta__key_type": "engine", "meta__key": "f@m@01@0@h"},  # not to_string()'s text
        {"meta__key_type": "engine", "meta__key": "f@m@ 1@0@h"},
        {"meta__checksum": 81985529216486895},
        {"meta__checksum": "0123"},
        {"meta__checksum": "0123456789abcdeg"},
        {"meta__checksum": "0123456789ABCDEF"},
        {"meta__namespace": None},
        {"meta__namespace": _DROP},
        {"meta__version": serde.FORMAT_VERSION},
        {"meta__extra": "x"},
        {"top__other": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
        {"top__kv": [1, 2]},
    ],
    ids=repr,
)
def test_every_header_field_is_checked(changes: dict[str, object]) -> None:
    with pytest.raises(CorruptEntryError):
        serde.decode_header(_raw_header(_fields(**changes)))


def test_a_header_followed_by_anything_but_padding_is_corrupt() -> None:
    with pytest.raises(CorruptEntryError):
        serde.decode_header(_raw_header(_fields(), tail=b' {"x":1}'))


def test_a_header_of_another_format_version_is_corrupt() -> None:
    with pytest.raises(CorruptEntryError, match="format version"):
        serde.decode_header(_raw_header(_fields(meta__version=str(serde.FORMAT_VERSION - 1))))


def _checksum(**changes: object) -> str:
    fields: dict[str, object] = {
        "key": "k",
        "dtype": torch.float32,
        "shape": (2, 3),
        "nbytes": 24,
        "namespace": "",
    }
    fields.update(changes)
    payload = fields.pop("payload", bytes(24))
    fields["payload_digest"] = serde.payload_digest(payload)  # type: ignore[arg-type]
    return serde.entry_checksum(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"key": "k2"},
        {"key": CacheEngineKey("f", "m", 1, 0, "h")},
        {"dtype": torch.int32},
        {"shape": (3, 2)},
        {"shape": (6,)},
        {"namespace": "other"},
        {"payload": b"\x01" + bytes(23)},
    ],
    ids=repr,
)
def test_the_checksum_covers_the_key_namespace_dtype_shape_and_payload(
    changes: dict[str, object],
) -> None:
    assert _checksum(**changes) != _checksum()
    assert len(_checksum()) == serde.CHECKSUM_CHARS


def test_the_checksum_tells_a_str_key_from_an_engine_key_of_the_same_text() -> None:
    assert _checksum(key="f@m@1@0@h") != _checksum(key=CacheEngineKey("f", "m", 1, 0, "h"))


def test_the_checksum_covers_the_format_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _checksum()
    # The checksum's field text reads the version where the checksum is defined.
    monkeypatch.setattr(checksums, "FORMAT_VERSION", serde.FORMAT_VERSION + 1)
    assert _checksum() != before


def test_a_streamed_payload_hash_equals_the_one_shot_digest() -> None:
    data = bytes(range(256)) * 100
    hasher = serde.payload_hasher()
    hasher.update(data[:1000])
    hasher.update(data[1000:])
    assert hasher.intdigest() == serde.payload_digest(data)


def _neg_view() -> torch.Tensor:
    return torch._neg_view(torch.arange(1.0, 7.0))


def _conj_imag() -> torch.Tensor:
    return torch.tensor([1 + 2j]).conj().imag  # a one-element view with its negative bit set


@pytest.mark.parametrize("make", [_neg_view, _conj_imag])
def test_payload_view_resolves_a_negative_view(make: object) -> None:
    tensor = make()  # type: ignore[operator]
    assert tensor.is_neg() and tensor.is_contiguous()
    plain = tensor.clone().resolve_neg()
    assert not plain.is_neg()
    assert bytes(serde.payload_view(tensor)) == bytes(serde.payload_view(plain))


@pytest.mark.parametrize(
    "value",
    [
        torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
        torch.ones(4, 4).to_sparse(),
        torch.ones(4, 4).to_sparse_csr(),
        torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8),
        torch.ones(4, dtype=torch.complex64),
    ],
    ids=["nested", "jagged", "sparse", "sparse_csr", "quantized", "complex"],
)
def test_values_of_odd_layouts_and_kinds_are_rejected_clearly(value: torch.Tensor) -> None:
    with pytest.raises(InvalidValueError):
        serde.check_storable(value)


def test_a_tensor_requiring_grad_is_storable() -> None:
    tensor = torch.ones(4, requires_grad=True)
    assert serde.check_storable(tensor) is tensor
    assert bytes(serde.payload_view(tensor)) == bytes(serde.payload_view(torch.ones(4)))
