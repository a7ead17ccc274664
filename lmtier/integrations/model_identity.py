"""A model's identity from what determines its KV bytes, not from the folder it was loaded from.

Two engines that load the same model from different folders (or machines) must name their
entries alike to share them through a redis tier; two that load different weights under the
same name must not.  ``model_identity`` answers, for a model given as a local folder or a
Hugging Face hub name (looked up in the local hub cache only):

* ``config.json``'s content (less the entries that name a path or a hub commit), parsed and
  written back sorted, so that formatting does not matter;
* the weights: for each ``*.safetensors`` file its name, size, header (every tensor's name,
  dtype, shape and offsets) and the first ``TENSOR_SAMPLE_BYTES`` of every tensor's data; for
  other weight files (``.bin``, ``.pt``, ``.pth``, ``.gguf``) name, size and their first and
  last ``FILE_SAMPLE_BYTES``.  Reading a few KiB per tensor keeps start-up quick while any
  fine-tune that changes a tensor changes the identity.

A model that is neither a folder nor in the hub cache is known by its name alone.  Whoever
knows better (weights served from elsewhere, a revision) gives the identity outright.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

__all__ = ["model_fingerprint", "model_folder", "model_identity"]

log = logging.getLogger(__name__)

#: Bytes read from the start of each safetensors tensor's data.
TENSOR_SAMPLE_BYTES = 4096
#: Bytes read from each end of a weight file of another format.
FILE_SAMPLE_BYTES = 1 << 20
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf")
# config.json entries that say where the model came from, not what it is.
_NOT_IDENTITY = ("_name_or_path", "_commit_hash")
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header


def model_folder(model: str) -> Path | None:
    """The folder holding ``model``'s config.json: ``model`` itself, or its snapshot in the
    local Hugging Face cache (never downloaded); None where neither exists."""
    folder = Path(model).expanduser()
    if (folder / "config.json").is_file():
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # not a valid repo id: a name that is no folder either
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_fingerprint(folder: Path) -> str:
    """A hex digest of the model in ``folder``: its config.json's content and its weights'."""
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in _NOT_IDENTITY}
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.suffix == ".safetensors":
            _digest_safetensors(path, digest)
        elif path.suffix in _OTHER_WEIGHTS:
            _digest_ends(path, digest)
    return digest.hexdigest()


def model_identity(model: str, model_id: str | None = None) -> str:
    """``model_id`` if given; else ``<model_type>-<fingerprint>`` of the model's folder; else
    ``model`` as named (a hub name with no local copy)."""
    if model_id is not None:
        if not model_id.strip():
            raise ValueError("model_id must not be empty")
        return model_id
    folder = model_folder(model)
    if folder is None:
        log.info("lmtier: model %r is no local folder: its entries are named by that name", model)
        return model
    fingerprint = model_fingerprint(folder)
    model_type = _model_type(folder)
    return f"{model_type}-{fingerprint[:24]}"


def _model_type(folder: Path) -> str:
    try:
        config: Any = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "model"
    kind = config.get("model_type") if isinstance(config, dict) else None
    return kind if isinstance(kind, str) and kind else "model"


def _digest_safetensors(path: Path, digest: Any) -> None:
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        digest.update(f"{path.name}:{size}:".encode())
        head = file.read(8)
        if len(head) < 8:
            digest.update(head)
            return
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):  # not a safetensors file after all
            _digest_ends(path, digest)
            return
        header_bytes = file.read(length)
        digest.update(header_bytes)
        try:
            header = json.loads(header_bytes)
        except ValueError:
            return
        starts = sorted(
            int(entry["data_offsets"][0])
            for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
        )
        for start in starts:
            digest.update(os.pread(file.fileno(), TENSOR_SAMPLE_BYTES, 8 + length + start))


def _digest_ends(path: Path, digest: Any) -> None:
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        digest.update(f"{path.name}:{size}:".encode())
        digest.update(os.pread(file.fileno(), FILE_SAMPLE_BYTES, 0))
        digest.update(os.pread(file.fileno(), FILE_SAMPLE_BYTES, max(0, size - FILE_SAMPLE_BYTES)))
