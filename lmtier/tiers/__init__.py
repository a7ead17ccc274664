"""Storage tiers: the Tier base class and its memory and disk backends."""

from lmtier.tiers.base import Tier
from lmtier.tiers.disk import DiskTier
from lmtier.tiers.memory import MemoryTier

__all__ = ["DiskTier", "MemoryTier", "Tier"]
