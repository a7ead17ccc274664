"""What a ``ServerClient`` hands back and how it turns values into requests and replies back.

Kept apart from the connection (``lmtier.server.client``) because none of it touches the
socket: the results of finished jobs, the conversion of keys, dtypes and tensors into what a
request carries, the layout of blocks in a region, and a failed reply raised as the error
class the server named.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lmtier import errors
from lmtier.errors import InvalidValueError, LmtierError
from lmtier.keys import KeyLike, check_key
from lmtier.server import protocol as p

__all__ = [
    "HoldsResult",
    "JobResult",
    "LoadResult",
    "StoreResult",
    "as_bytes",
    "checked",
    "dtype_from_name",
    "dtype_name",
    "error_text",
    "layout",
    "wire_keys",
]

# Where blocks start in a region the client lays out itself: no dtype is misaligned there.
_ALIGN = 64


@dataclass(frozen=True)
class LoadResult:
    """A finished load: ``found[i]`` describes key i's hit (None: a miss); its bytes are in
    the region at the offset the job gave, if ``found[i].copied``.  ``error`` says why the
    whole job failed (every key then a miss)."""

    job_id: int
    found: list[p.Found | None]
    error: str | None = None


@dataclass(frozen=True)
class StoreResult:
    """A finished store: ``placed[i]`` is True when key i was stored."""

    job_id: int
    placed: list[bool]
    error: str | None = None


@dataclass(frozen=True)
class HoldsResult:
    """A finished ``submit_holds``: ``tiers[i]`` names the tier holding key i (None: none)."""

    job_id: int
    tiers: list[str | None]
    error: str | None = None


JobResult = LoadResult | StoreResult | HoldsResult


def wire_keys(keys: Sequence[KeyLike]) -> list[p.WireKey]:
    return [p.key_to_wire(check_key(key)) for key in keys]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidValueError(f"the server named an unknown dtype {name!r}")
    return dtype


def as_bytes(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor's bytes as a flat uint8 CPU tensor, and the tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise errors.LmtierTypeError(f"a value must be a torch.Tensor, got {type(tensor).__name__}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8), tensor


def layout(sizes: Iterable[int]) -> tuple[list[int], int]:
    """Offsets for blocks of ``sizes`` placed one after another, each aligned; the total."""
    offsets: list[int] = []
    end = 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // _ALIGN) * _ALIGN
    return offsets, end


def error_text(outcome: p.Reply | LmtierError) -> str:
    if isinstance(outcome, p.Error):
        return f"{outcome.kind}: {outcome.message}"
    return str(outcome)


def checked(outcome: p.Reply | LmtierError) -> p.Reply:
    """The reply, or the error it carries raised as the class the server named."""
    if isinstance(outcome, LmtierError):
        raise outcome
    if isinstance(outcome, p.Error):
        error_class = getattr(errors, outcome.kind, None)
        if isinstance(error_class, type) and issubclass(error_class, LmtierError):
            raise error_class(outcome.message)
        raise LmtierError(f"{outcome.kind}: {outcome.message}")
    return outcome
