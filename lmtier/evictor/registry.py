"""Evictor policies by name, as tier configs name them."""

from __future__ import annotations

from collections.abc import Callable

from lmtier.errors import ConfigError
from lmtier.evictor.arc_evictor import ARCEvictor
from lmtier.evictor.base_evictor import BaseEvictor
from lmtier.evictor.fifo_evictor import FIFOEvictor
from lmtier.evictor.lfu_evictor import LFUEvictor
from lmtier.evictor.lru_evictor import LRUEvictor
from lmtier.evictor.prefix_evictor import PrefixEvictor
from lmtier.evictor.s3fifo_evictor import S3FIFOEvictor

__all__ = ["EvictorFactory", "evictor_names", "make_evictor", "register_evictor"]

EvictorFactory = Callable[[int], BaseEvictor]
"""Builds an evictor for a budget given in bytes."""

_REGISTRY: dict[str, EvictorFactory] = {
    "lru": lambda capacity: LRUEvictor(max_cache_bytes=capacity),
    "fifo": FIFOEvictor,
    "lfu": LFUEvictor,
    "s3fifo": S3FIFOEvictor,
    "arc": ARCEvictor,
    "prefix": PrefixEvictor,
}


def register_evictor(name: str, factory: EvictorFactory) -> None:
    """Make ``name`` selectable in tier configs; the factory takes the budget in bytes."""
    if name in _REGISTRY:
        raise ConfigError(f"an evictor named {name!r} is already registered")
    _REGISTRY[name] = factory


def evictor_names() -> list[str]:
    return sorted(_REGISTRY)


def make_evictor(name: str, capacity_bytes: int) -> BaseEvictor:
    """A new evictor of policy ``name`` with a budget of ``capacity_bytes``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown evictor {name!r}; known: {', '.join(evictor_names())}"
        ) from None
    return factory(capacity_bytes)
