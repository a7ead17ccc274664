"""Token sequences as chains of chunk keys: one CacheEngineKey per chunk, names a whole prefix."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lmtier.errors import ConfigError, LmtierTypeError
from lmtier.keys import CacheEngineKey

__all__ = ["ChunkKey", "ChunkSpec", "fingerprint_tensors", "token_chunks"]


@dataclass(frozen=True)
class ChunkSpec:
    """How an engine's tokens become keys.

    ``namespace`` seeds every hash chain: put in it whatever makes KV incompatible beyond the
    model name and parallelism — weights fingerprint, dtype, KV layout — so that caches of
    different namespaces never hit one another, in any tier.  A partial last chunk is stored
    only with ``save_partial`` (it then hits only prompts that repeat exactly those tokens).
    """

    model_name: str
    world_size: int = 1
    worker_id: int = 0
    chunk_size: int = 256
    fmt: str = "vllm"
    namespace: str = ""
    save_partial: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be > 0, got {self.chunk_size}")
        # Builds (and so validates) a key with these fields once, up front.
        CacheEngineKey(self.fmt, self.model_name, self.world_size, self.worker_id, "0")


@dataclass(frozen=True)
class ChunkKey:
    key: CacheEngineKey
    start: int  # first token of the chunk
    end: int  # one past its last token


def token_chunks(spec: ChunkSpec, tokens: Sequence[int] | torch.Tensor) -> list[ChunkKey]:
    """The chunks of ``tokens`` in order; each key hashes its tokens and all before them.

    The hash is blake2b over the previous chunk's hash and the tokens as little-endian int64,
    so it is the same in every process and on every machine (no Python ``hash()``).
    """
    ids = _as_int64(tokens)
    count = len(ids)
    full = count - count % spec.chunk_size
    ends = list(range(spec.chunk_size, full + 1, spec.chunk_size))
    if spec.save_partial and full < count:
        ends.append(count)
    previous = hashlib.blake2b(spec.namespace.encode(), digest_size=16).digest()
    chunks = []
    start = 0
    data = ids.numpy().tobytes()
    for end in ends:
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(data[start * 8 : end * 8])
        previous = digest.digest()
        key = CacheEngineKey(
            spec.fmt, spec.model_name, spec.world_size, spec.worker_id, previous.hex()
        )
        chunks.append(ChunkKey(key, start, end))
        start = end
    return chunks


def fingerprint_tensors(tensors: Iterable[torch.Tensor]) -> str:
    """A short hash of tensors' bytes (e.g. a model's weights) for a namespace."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(str(tensor.dtype).encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()


def _as_int64(tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise LmtierTypeError(
                f"tokens must be a 1-d integer tensor, got {tokens.dtype}{list(tokens.shape)}"
            )
        return tokens.detach().to("cpu", torch.int64)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise LmtierTypeError("tokens must be a sequence of ints or a 1-d integer tensor")
    return torch.tensor(list(tokens), dtype=torch.int64)
