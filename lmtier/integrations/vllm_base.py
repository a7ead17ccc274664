"""What both of lmtier's vLLM secondary tiers share: the in-process one
(``lmtier.integrations.vllm``) and the client of ``lmtier serve``
(``lmtier.integrations.vllm_server``).

Both answer the scheduler's lookups from an in-process index of the keys they hold, and ask
shared storage in the background for a key the index lacks (another engine's block), answering
RETRY until the answer comes; they differ in where the bytes live and how a look is made.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
from vllm.v1.kv_offload.base import (
    LookupResult,
    Medium,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
)
from vllm.v1.kv_offload.tiering.base import SecondaryTierManager

from lmtier.integrations.activity import show_lmtier_logs
from lmtier.integrations.vllm_keys import KeyIndex, offload_key_text
from lmtier.integrations.vllm_metrics import Counters, StoreChange, connector_stats, counter_deltas
from lmtier.integrations.vllm_probe import SharedProbes

__all__ = ["IndexedTier", "primary_rows"]


def primary_rows(primary_kv_view: memoryview) -> np.ndarray:
    """vLLM's primary-tier rows as a 2-D (rows, bytes) array over the same memory.  Not kept
    past the tier's shutdown: vLLM closes the memory then, and a live export stops it."""
    assert primary_kv_view.strides is not None
    rows = np.asarray(primary_kv_view)
    if rows.ndim != 2:
        raise ValueError(f"primary_kv_view must be 2-D (rows, bytes), got shape {rows.shape}")
    return rows


class IndexedTier(SecondaryTierManager):  # type: ignore[misc]
    """A vLLM secondary tier whose lookups an in-process index answers.

    Subclasses set ``_probe_shared`` (whether a key the index lacks is looked for at all) and
    implement ``_start_probe(text)``, which starts a background look for ``text`` that ends
    with ``self._probes.settle(text, found)``.
    """

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        locality: str | None,
        backpressure_detector: Any,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if backpressure_detector is not None:
            kwargs["backpressure_detector"] = backpressure_detector
        super().__init__(offloading_spec, primary_kv_view, tier_type, **kwargs)
        show_lmtier_logs()
        if locality is not None:
            try:
                from vllm.v1.kv_offload.base import Locality

                self.locality = Locality(locality)
            except ImportError:  # older releases have no locality
                pass
        self._index = KeyIndex()
        self._counters = Counters()
        self._reported = Counters()
        self._probes = SharedProbes(self._index, self._counters)
        self._probe_shared = False
        self._closed = False

    def _start_probe(self, text: str) -> None:
        raise NotImplementedError

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        text = offload_key_text(key)
        tally = self._counters
        if text in self._index:
            tally.lookups += 1
            tally.hits += 1
            return LookupResult.HIT
        if not self._probe_shared or self._closed:
            tally.lookups += 1
            return LookupResult.MISS
        found = self._probes.answer(text, req_context.req_id, self._start_probe)
        if found is None:
            return LookupResult.RETRY
        tally.lookups += 1
        if found and text in self._index:
            tally.hits += 1
            return LookupResult.HIT
        return LookupResult.MISS

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._probes.request_finished(req_context.req_id)

    request_finished = on_request_finished  # the name in older vLLM

    def _stats_since_reported(self, store_changes: list[StoreChange]) -> Any:
        """The block counters' growth since the last call, and ``store_changes``, as vLLM's
        OffloadingConnectorStats (None if nothing changed)."""
        now = replace(self._counters)
        deltas = counter_deltas(now, self._reported)
        if not any(deltas.values()) and not store_changes:
            return None
        stats = connector_stats(self.tier_type, deltas, store_changes)
        if stats is not None:
            self._reported = now
        return stats
