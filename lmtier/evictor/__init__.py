"""Eviction policies: LMCache's evictor API plus lmtier's extensions and a name registry."""

from lmtier.evictor.arc_evictor import ARCEvictor
from lmtier.evictor.base_evictor import BaseEvictor, DummyEvictor, PutStatus
from lmtier.evictor.fifo_evictor import FIFOEvictor
from lmtier.evictor.keyed import KeyedEvictor
from lmtier.evictor.lfu_evictor import LFUEvictor
from lmtier.evictor.lru_evictor import LRUEvictor
from lmtier.evictor.prefix_evictor import PrefixEvictor
from lmtier.evictor.registry import evictor_names, make_evictor, register_evictor
from lmtier.evictor.s3fifo_evictor import S3FIFOEvictor

__all__ = [
    "ARCEvictor",
    "BaseEvictor",
    "DummyEvictor",
    "FIFOEvictor",
    "KeyedEvictor",
    "LFUEvictor",
    "LRUEvictor",
    "PrefixEvictor",
    "PutStatus",
    "S3FIFOEvictor",
    "evictor_names",
    "make_evictor",
    "register_evictor",
]
