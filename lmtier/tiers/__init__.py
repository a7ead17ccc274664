"""Storage tiers: the Tier base class and its memory and disk backends.

The redis tier lives in ``lmtier.tiers.remote``, imported only when configured (an extra).
"""

from lmtier.tiers.base import Tier
from lmtier.tiers.disk import DiskTier
from lmtier.tiers.memory import MemoryTier

__all__ = ["DiskTier", "MemoryTier", "Tier"]
