"""A model's identity: its config and weights, not the folder they were loaded from."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from lmtier.integrations.model_identity import model_identity

CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 64}


def write_safetensors(path: Path, tensors: dict[str, bytes]) -> None:
    """A safetensors file of uint8 tensors, laid out as the format says."""
    header: dict[str, object] = {}
    offset = 0
    for name, data in tensors.items():
        header[name] = {
            "dtype": "U8",
            "shape": [len(data)],
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(tensors.values()))


def write_model(folder: Path, config: dict[str, object] | None = None, seed: int = 1) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**CONFIG, **(config or {})}, indent=2))
    weights = {
        f"layer.{i}": bytes((seed * 31 + i * 7 + j) % 256 for j in range(9000)) for i in range(3)
    }
    write_safetensors(folder / "model.safetensors", weights)
    return folder


def test_the_same_model_in_two_folders_is_one_identity(tmp_path: Path) -> None:
    first = write_model(tmp_path / "a" / "llama")
    second = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, second)
    # How config.json is written, and where it says it came from, are not the model.
    config = json.loads((second / "config.json").read_text())
    config["_name_or_path"] = str(second)
    (second / "config.json").write_text(json.dumps(config, sort_keys=True))
    identity = model_identity(str(first))
    assert identity == model_identity(str(second))
    assert identity.startswith("llama-")
    assert str(tmp_path) not in identity


def test_another_config_or_other_weights_are_another_identity(tmp_path: Path) -> None:
    base = model_identity(str(write_model(tmp_path / "base")))
    assert model_identity(str(write_model(tmp_path / "deeper", {"num_hidden_layers": 3}))) != base
    assert model_identity(str(write_model(tmp_path / "retrained", seed=2))) != base
    # A fine-tune that changed one tensor (here its first byte) is another model.
    tuned = write_model(tmp_path / "tuned")
    data = bytearray((tuned / "model.safetensors").read_bytes())
    data[-9000] ^= 0xFF  # the first byte of the last tensor
    (tuned / "model.safetensors").write_bytes(bytes(data))
    assert model_identity(str(tuned)) != base


def test_a_given_model_id_wins(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    assert (
        model_identity(str(folder), "meta-llama/Llama-3-8B@abc123")
        == "meta-llama/Llama-3-8B@abc123"
    )
    with pytest.raises(ValueError, match="model_id"):
        model_identity(str(folder), " ")


def test_a_name_that_is_no_folder_is_its_own_identity(tmp_path: Path) -> None:
    assert model_identity(str(tmp_path / "no-such-model")) == str(tmp_path / "no-such-model")
