"""Every registered evictor, and DummyEvictor, against the evictor contract."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from lmtier.evictor import (
    BaseEvictor,
    DummyEvictor,
    LRUEvictor,
    PutStatus,
    evictor_names,
    make_evictor,
)
from lmtier.testing.evictor import lru_victims, run_contract, run_shared_key_contract

KNOWN_ORDER = {"lru": lru_victims}


@pytest.mark.parametrize("name", evictor_names())
@pytest.mark.parametrize("capacity", [64, 1000])
def test_registered_evictor_keeps_the_contract(name: str, capacity: int) -> None:
    run_contract(lambda cap: make_evictor(name, cap), capacity, KNOWN_ORDER.get(name))


def test_lru_built_directly_keeps_the_contract() -> None:
    run_contract(lambda cap: LRUEvictor(max_cache_bytes=cap), 100, lru_victims)


def test_dummy_evictor_keeps_the_contract() -> None:
    run_contract(lambda _cap: DummyEvictor(), 100)


@pytest.mark.parametrize("name", evictor_names())
@pytest.mark.parametrize("capacity", [16, 200])
def test_registered_evictor_keeps_the_contract_on_shared_keys(name: str, capacity: int) -> None:
    run_shared_key_contract(lambda cap: make_evictor(name, cap), capacity, KNOWN_ORDER.get(name))


def test_dummy_evictor_keeps_the_contract_on_shared_keys() -> None:
    run_shared_key_contract(lambda _cap: DummyEvictor(), 100)


# Two puts of one key in flight at once, as ``gather(put(k, big), put(k, small))`` makes them:
# each is admitted before either commits; then each commits (replacing the other's entry, which
# is removed with its own size) or is abandoned (removed with its own size), in either order.
CAPACITY = 64
BIG, SMALL, FILL = 8, 1, 4


class _Tier:
    """The bookkeeping a tier does around its evictor, checked after every step."""

    def __init__(self, evictor: BaseEvictor) -> None:
        self.evictor = evictor
        self.cache: OrderedDict[str, bytes] = OrderedDict()
        self.pins: set[str] = set()
        self.expected = 0  # bytes admitted and not yet committed or abandoned

    def check(self) -> None:
        assert self.evictor.charged_bytes == self.expected + sum(
            len(v) for v in self.cache.values()
        )

    def admit(self, key: str, size: int) -> None:
        victims, status = self.evictor.update_on_put(self.cache, size, key)
        assert status is PutStatus.LEGAL
        for victim in victims:
            assert victim not in self.pins
            del self.cache[victim]
        self.expected += size
        self.check()

    def commit(self, key: str, size: int) -> None:
        if key in self.cache:
            self.evictor.update_on_remove(key, len(self.cache.pop(key)))
        self.cache[key] = bytes(size)
        self.expected -= size
        self.check()

    def abandon(self, key: str, size: int) -> None:
        self.evictor.update_on_remove(key, size)
        self.expected -= size
        self.check()

    def fill(self, puts: int) -> None:
        for i in range(puts):
            self.admit(f"fill{i}", FILL)
            self.commit(f"fill{i}", FILL)


@pytest.mark.parametrize("name", evictor_names())
@pytest.mark.parametrize("sizes", [(BIG, SMALL), (SMALL, BIG)], ids=["big-first", "small-first"])
@pytest.mark.parametrize("order", ["first-lands-first", "second-lands-first"])
@pytest.mark.parametrize("fate", ["both-commit", "one-abandoned", "both-abandoned"])
@pytest.mark.parametrize("pinned", [False, True], ids=["unpinned", "pinned"])
@pytest.mark.parametrize("old", [False, True], ids=["new-key", "overwrite"])
def test_two_overlapping_puts_of_one_key_keep_the_charge_exact(
    name: str,
    sizes: tuple[int, int],
    order: str,
    fate: str,
    pinned: bool,
    old: bool,
) -> None:
    tier = _Tier(make_evictor(name, CAPACITY))
    if old:  # an entry of a third size is already there
        tier.admit("k", 3)
        tier.commit("k", 3)
    first, second = ("k", sizes[0]), ("k", sizes[1])
    tier.admit(*first)
    tier.admit(*second)
    if pinned:
        tier.evictor.pin("k")
        tier.pins.add("k")
    landing = [first, second] if order == "first-lands-first" else [second, first]
    for i, put in enumerate(landing):
        if fate == "both-commit" or (fate == "one-abandoned" and i == 0):
            tier.commit(*put)
        else:
            tier.abandon(*put)
    tier.fill(3 * CAPACITY // FILL)  # turn the tier over: k is a victim unless pinned
    if pinned:
        assert ("k" in tier.cache) == (fate != "both-abandoned" or old)
        tier.evictor.unpin("k")
        tier.pins.clear()
        tier.fill(3 * CAPACITY // FILL)
    assert "k" not in tier.cache
    assert tier.evictor.charged_bytes == sum(len(v) for v in tier.cache.values())
    for key in list(tier.cache):  # everything removes with the size it was charged
        tier.evictor.update_on_remove(key, len(tier.cache.pop(key)))
    assert tier.evictor.charged_bytes == 0
