"""Eviction policies: LMCache's evictor API plus lmtier's extensions and a name registry."""

from lmtier.evictor.base_evictor import BaseEvictor, DummyEvictor, PutStatus
from lmtier.evictor.lru_evictor import LRUEvictor
from lmtier.evictor.registry import evictor_names, make_evictor, register_evictor

__all__ = [
    "BaseEvictor",
    "DummyEvictor",
    "LRUEvictor",
    "PutStatus",
    "evictor_names",
    "make_evictor",
    "register_evictor",
]
