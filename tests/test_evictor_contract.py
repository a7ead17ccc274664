"""Every registered evictor, and DummyEvictor, against the evictor contract."""

from __future__ import annotations

import pytest

from lmtier.evictor import DummyEvictor, LRUEvictor, evictor_names, make_evictor

from evictor_contract import lru_victims, run_contract

KNOWN_ORDER = {"lru": lru_victims}


@pytest.mark.parametrize("name", evictor_names())
@pytest.mark.parametrize("capacity", [64, 1000])
def test_registered_evictor_keeps_the_contract(name: str, capacity: int) -> None:
    run_contract(lambda cap: make_evictor(name, cap), capacity, KNOWN_ORDER.get(name))


def test_lru_built_directly_keeps_the_contract() -> None:
    run_contract(lambda cap: LRUEvictor(max_cache_bytes=cap), 100, lru_victims)


def test_dummy_evictor_keeps_the_contract() -> None:
    run_contract(lambda _cap: DummyEvictor(), 100)
