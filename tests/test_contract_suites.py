"""lmtier.testing's suites fail where the contract is broken: they can tell, not only pass."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lmtier import StoreConfig, TierConfig
from lmtier.evictor import BaseEvictor, LRUEvictor
from lmtier.keys import KeyLike
from lmtier.store import TieredStore
from lmtier.testing import EvictorContract, tensor_for
from lmtier.testing.store import WatchedStore

from store_helpers import KIB


class ForgetfulEvictor(LRUEvictor):
    """Discharges only half of what leaves: its charge drifts upward."""

    def update_on_remove(self, key: KeyLike, cache_size: int) -> None:
        super().update_on_remove(key, cache_size // 2)


class ForgetfulContract(EvictorContract):
    capacities = (64,)
    max_examples = 50

    def make_evictor(self, capacity: int) -> BaseEvictor:
        return ForgetfulEvictor(max_cache_bytes=capacity)


def test_the_evictor_contract_fails_an_evictor_whose_charge_drifts() -> None:
    with pytest.raises(AssertionError):
        ForgetfulContract().test_random_sequences_keep_the_contract()


def test_the_evictor_contract_demands_a_factory() -> None:
    with pytest.raises(NotImplementedError, match="make_evictor"):
        EvictorContract().test_random_sequences_keep_the_contract()


async def test_a_breach_undone_before_the_call_returns_is_still_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A put that overcharges its tier for one await and then repairs it: only an audit at
    every step catches it."""
    real_put = TieredStore.put

    async def overcharging_put(store: TieredStore, key: KeyLike, tensor: Any, **kw: Any) -> Any:
        tier: Any = store.tiers[0]
        tier._committed += 1
        await asyncio.sleep(0)
        tier._committed -= 1
        return await real_put(store, key, tensor, **kw)

    monkeypatch.setattr(TieredStore, "put", overcharging_put)
    config = StoreConfig((TierConfig("cpu", "memory", 16 * KIB),))
    watched = WatchedStore(config)
    async with watched:
        await watched.run(watched.store.put("k", tensor_for("k")))
        assert watched.store.audit() == [], "the breach was repaired before the call returned"
        assert any("committed" in breach for breach in watched.breaches)
        watched.breaches.clear()
