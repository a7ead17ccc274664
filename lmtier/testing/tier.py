"""The contract every Tier backend keeps; a subclass of TierContract supplies ``make_tier``.

``store_in`` writes one entry into a tier through the steps the store takes; a backend's own
tests use it to fill a tier without a store.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from lmtier.evictor import LRUEvictor
from lmtier.testing.values import tensor_for
from lmtier.tiers.base import Tier


async def store_in(tier: Tier, key: str, tensor: torch.Tensor) -> list[tuple[Any, Any]]:
    """Place one entry through the tier's slot, the way the store does (its victims are
    removed and discarded, not moved down); the victims."""
    size = tensor.numel() * tensor.element_size()
    async with tier.place(key, size) as slot:
        assert slot.victims is not None
        victims = list(slot.victims)
        for victim, _ in victims:
            await tier.discard(tier.remove(victim))
        await slot.reserve(timeout=1)
        await slot.write(tensor)
        slot.publish()
        slot.commit()
    return victims


class TierContract:
    """The tier contract as a pytest class: subclass it in a test module.

    Override ``async make_tier(budget)``: a new, opened tier of your backend whose evictor is
    ``lru(budget)`` (the tests expect LRU's victims) and whose budget is ``budget`` bytes; an
    autouse fixture of the subclass may prepare what it needs (a folder, a server) and close
    the tiers afterwards.  The tests are coroutines: run them with pytest-asyncio in auto mode.

    Inherited tests: bit-exact round trips of several dtypes and a strided tensor, loads into
    a preallocated buffer, a stored copy independent of the caller's tensor, accounting through
    puts, victims and removals, victims readable until removed and never chosen twice,
    ``reserve`` waiting for leaving bytes and timing out, pinned entries never victims, and an
    entry larger than the budget refused.
    """

    async def make_tier(self, budget: int) -> Tier:
        """A new, opened tier of ``budget`` bytes over ``lru(budget)``."""
        raise NotImplementedError(f"{type(self).__name__} must define make_tier(budget)")

    async def test_round_trip_is_bit_exact(self) -> None:
        tier = await self.make_tier(1 << 20)
        cases = {
            "f32": torch.randn(3, 7),
            "bf16": torch.randn(2, 4, 8).to(torch.bfloat16),
            "i8": torch.randint(-128, 127, (33,), dtype=torch.int8),
            "bool": torch.rand(17) > 0.5,
            "strided": torch.randn(8, 8).t(),
        }
        for key, tensor in cases.items():
            await store_in(tier, key, tensor)
        for key, tensor in cases.items():
            loaded = await tier.load(tier.lookup(key))
            assert loaded is not None
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
            assert torch.equal(loaded.cpu(), tensor)
        assert tier.audit(quiescent=True) == []

    async def test_load_into_a_preallocated_buffer(self) -> None:
        tier = await self.make_tier(1 << 20)
        tensor = torch.randn(3, 100).to(torch.bfloat16)
        await store_in(tier, "k", tensor)
        out = torch.empty(3, 100, dtype=torch.bfloat16)
        assert await tier.load_into(tier.lookup("k"), out) is out
        assert torch.equal(out, tensor)
        with pytest.raises(ValueError, match="out is"):
            await tier.load_into(tier.lookup("k"), torch.empty(300, dtype=torch.bfloat16))

    async def test_stored_copy_is_independent_of_the_callers_tensor(self) -> None:
        tier = await self.make_tier(1 << 20)
        tensor = tensor_for("k")
        expected = tensor.clone()
        await store_in(tier, "k", tensor)
        tensor.zero_()
        loaded = await tier.load(tier.lookup("k"))
        assert loaded is not None and torch.equal(loaded.cpu(), expected)

    async def test_accounting_follows_puts_victims_and_removals(self) -> None:
        tensor = tensor_for("a")  # 1 KiB
        tier = await self.make_tier(3 * 1024)
        for key in "abc":
            assert await store_in(tier, key, tensor) == []
        tier.touch("a")
        victims = await store_in(tier, "d", tensor)
        assert [key for key, _ in victims] == ["b"]
        assert list(tier.cache_dict) == ["c", "a", "d"]
        assert tier.resident_bytes == 3 * 1024 == tier.evictor.charged_bytes
        await tier.discard(tier.remove("a"))
        assert tier.resident_bytes == 2 * 1024 == tier.evictor.charged_bytes
        assert tier.remove("a") is None
        assert tier.audit(quiescent=True) == []

    async def test_victims_stay_readable_until_removed(self) -> None:
        tensor = tensor_for("a")
        tier = await self.make_tier(1024)
        await store_in(tier, "a", tensor)
        victims = tier.admit("b", 1024)
        assert victims is not None and [k for k, _ in victims] == ["a"]
        assert tier.is_leaving("a")
        loaded = await tier.load(tier.lookup("a"))
        assert loaded is not None and torch.equal(loaded.cpu(), tensor)
        assert tier.admit("c", 1024) is None, "a leaving victim was chosen twice"
        assert tier.audit() == []
        await tier.discard(tier.remove("a"))
        tier.cancel("b", 1024)
        assert tier.audit(quiescent=True) == []

    async def test_reserve_waits_for_leaving_bytes_and_times_out(self) -> None:
        tier = await self.make_tier(1024)
        await store_in(tier, "a", tensor_for("a"))
        victims = tier.admit("b", 1024)
        assert victims is not None
        with pytest.raises(TimeoutError):
            await tier.reserve(1024, timeout=0.05)
        waiting = asyncio.create_task(tier.reserve(1024, timeout=5))
        await asyncio.sleep(0.01)
        assert not waiting.done() and tier.resident_bytes <= tier.budget
        tier.remove("a")
        await asyncio.wait_for(waiting, 1)
        assert tier.resident_bytes == 1024
        tier.unreserve("b", 1024)
        assert tier.resident_bytes == 0 and tier.audit(quiescent=True) == []

    async def test_a_pinned_entry_is_never_a_victim(self) -> None:
        tier = await self.make_tier(2048)
        await store_in(tier, "a", tensor_for("a"))
        await store_in(tier, "b", tensor_for("b"))
        tier.pin("a")
        victims = tier.admit("c", 1024)
        assert victims is not None and [k for k, _ in victims] == ["b"]
        tier.pin("c")  # nothing else may go while a is pinned
        tier.remove("b")
        assert tier.admit("d", 1024) is None
        tier.unpin("a")
        tier.unpin("c")
        tier.cancel("c", 1024)
        assert tier.audit() == []

    async def test_an_entry_larger_than_the_budget_is_refused(self) -> None:
        tier = await self.make_tier(1000)
        assert tier.admit("big", 1001) is None
        assert tier.evictor.charged_bytes == 0


def lru(budget: int) -> LRUEvictor:
    """The evictor ``make_tier`` gives its tier: LRU over ``budget`` bytes."""
    return LRUEvictor(max_cache_bytes=budget)
