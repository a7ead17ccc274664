"""Reading an entry's bytes out of its tier, and dropping an entry whose bytes are wrong."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lmtier.errors import CorruptEntryError, StorageError
from lmtier.keys import KeyLike
from lmtier.monitoring import StoreMetrics
from lmtier.store.ledger import KeyLedger
from lmtier.tiers.base import Tier

__all__ = ["Loader"]

log = logging.getLogger("lmtier.store")


class Loader:
    """Loads stored objects, timing reads of storage tiers for the metrics."""

    __slots__ = ("_ledger", "_metrics")

    def __init__(self, metrics: StoreMetrics, ledger: KeyLedger) -> None:
        self._metrics = metrics
        self._ledger = ledger

    async def load_or_drop(
        self, tier: Tier, key: KeyLike, obj: Any, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``tier.load(obj)`` (into ``out`` if given), or None: a miss.

        Only evidence that the stored bytes are wrong (``CorruptEntryError``) or gone (the
        tier answers None) drops the entry.  An error of the environment (out of file
        descriptors or memory, an I/O error, a server down) is counted and leaves the entry
        where it is, to be read again later.
        """
        timed = tier.name in self._metrics.timed_loads  # reads of storage, not of memory tiers
        started = time.perf_counter() if timed else 0.0
        try:
            data = await (tier.load(obj) if out is None else tier.load_into(obj, out))
        except CorruptEntryError as exc:
            if out is not None:  # it may hold the bad bytes: never leave them to the caller
                out.zero_()
            self._drop_bad(tier, key, obj, str(exc), corrupt=True)
            return None
        except StorageError:
            return None  # a tier that names its own failures (a server down) counted them
        except OSError as exc:
            errors = tier.record_error()
            if errors & (errors - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a storm logs little
                log.warning(
                    "tier %r could not read %r (its error %d): %s", tier.name, key, errors, exc
                )
            return None
        if data is None:
            self._drop_bad(tier, key, obj, "its storage vanished", corrupt=False)
        elif timed:
            self._metrics.observe_load(tier.name, time.perf_counter() - started, data.nbytes)
        return data

    def _drop_bad(self, tier: Tier, key: KeyLike, obj: Any, why: str, corrupt: bool) -> None:
        """Drop an entry whose stored bytes cannot be served (if the tier still holds it)."""
        if tier.lookup(key) is not obj:
            return  # it moved or was replaced meanwhile: nothing is wrong
        log.warning("tier %r dropped %r: %s", tier.name, key, why)
        tier.remove(key)
        tier.record_unservable(corrupt)
        self._ledger.notify_drop(key)
        self._ledger.discard_behind(tier, key, obj)
