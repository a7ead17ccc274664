"""The seed API surface of the evictors, and lmtier's fixes of its known defects."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from lmtier.errors import ConfigError
from lmtier.evictor import BaseEvictor, DummyEvictor, LRUEvictor, PutStatus, make_evictor
from lmtier.evictor.base_evictor import BaseEvictor as BaseFromModule
from lmtier.evictor.lru_evictor import LRUEvictor as LRUFromModule
from lmtier.metadata import DiskCacheMetadata


def test_seed_import_paths_name_the_same_classes() -> None:
    assert BaseFromModule is BaseEvictor
    assert LRUFromModule is LRUEvictor
    assert {PutStatus.LEGAL.name, PutStatus.ILLEGAL.name} == {"LEGAL", "ILLEGAL"}


def test_seed_usage_example_runs_unchanged() -> None:
    # ../shared/seeds/002: "Usage Examples", with only the import changed.
    from lmtier.evictor.base_evictor import DummyEvictor, PutStatus

    cache_dict: OrderedDict[str, bytes] = OrderedDict(key1=b"abc")
    new_key, new_value, new_entry_size = "key2", b"defg", 4
    evictor = DummyEvictor()
    evictor.update_on_get("key1", cache_dict)
    evict_keys, status = evictor.update_on_put(cache_dict, new_entry_size)
    if status == PutStatus.LEGAL:
        for key in evict_keys:
            del cache_dict[key]
        cache_dict[new_key] = new_value
    assert list(cache_dict) == ["key1", "key2"]


@pytest.mark.parametrize(
    ("obj", "size"),
    [
        (torch.zeros(3, 5, dtype=torch.bfloat16), 30),
        (torch.zeros(7, dtype=torch.float32)[::2], 16),
        (b"12345", 5),
        (bytearray(9), 9),
        (memoryview(bytearray(12)).cast("I"), 12),
        (DiskCacheMetadata(path="/does/not/exist", size=4096), 4096),
    ],
)
def test_get_size_counts_bytes(obj: object, size: int) -> None:
    assert LRUEvictor().get_size(obj) == size


def test_get_size_rejects_other_types_by_name() -> None:
    with pytest.raises(TypeError, match="list"):
        LRUEvictor().get_size([1, 2, 3])


def test_lru_budget_is_in_gib_as_lmcache() -> None:
    assert LRUEvictor().MAX_CACHE_SIZE == 10 * 1024**3
    assert LRUEvictor(0.5).capacity_bytes == 512 * 1024**2
    assert LRUEvictor(max_cache_bytes=100).MAX_CACHE_SIZE == 100


@pytest.mark.parametrize("bad", [0, -1.0, 1e-12])
def test_budget_must_be_positive(bad: float) -> None:
    with pytest.raises(ConfigError):
        LRUEvictor(bad)


def test_unknown_evictor_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="lru"):
        make_evictor("belady", 100)


def test_lru_victims_are_least_recent_first_and_skip_pins() -> None:
    ev = LRUEvictor(max_cache_bytes=30)
    cache: OrderedDict[str, bytes] = OrderedDict()
    for key in "abc":
        victims, status = ev.update_on_put(cache, 10)
        assert (victims, status) == ([], PutStatus.LEGAL)
        cache[key] = bytes(10)
    ev.update_on_get("a", cache)  # order now b, c, a
    ev.pin("b")
    victims, status = ev.update_on_put(cache, 15)
    assert (victims, status) == (["c", "a"], PutStatus.LEGAL)
    assert ev.current_cache_size == 25


def test_everything_pinned_is_illegal_without_state_change() -> None:
    # LMCache raises StopIteration here; lmtier answers ILLEGAL and changes nothing.
    ev = LRUEvictor(max_cache_bytes=20)
    cache: OrderedDict[str, bytes] = OrderedDict()
    for key in "ab":
        ev.update_on_put(cache, 10)
        cache[key] = bytes(10)
        ev.pin(key)
    assert ev.update_on_put(cache, 5) == ([], PutStatus.ILLEGAL)
    assert ev.charged_bytes == 20
    ev.unpin("a")
    assert ev.update_on_put(cache, 5) == (["a"], PutStatus.LEGAL)


def test_removal_discharges_so_the_counter_never_drifts() -> None:
    # LMCache's counter only grows on explicit removes until every put is refused.
    ev = LRUEvictor(max_cache_bytes=100)
    cache: OrderedDict[str, bytes] = OrderedDict()
    for i in range(1000):
        key = f"k{i}"
        victims, status = ev.update_on_put(cache, 60)
        assert status is PutStatus.LEGAL and victims == []
        cache[key] = bytes(60)
        ev.update_on_remove(key, len(cache.pop(key)))
    assert ev.charged_bytes == 0


def test_unpin_of_unpinned_key_is_an_error() -> None:
    with pytest.raises(ValueError, match="not pinned"):
        LRUEvictor().unpin("nope")


def test_dummy_never_evicts() -> None:
    ev = DummyEvictor()
    cache: OrderedDict[str, bytes] = OrderedDict(a=bytes(10**6))
    assert ev.update_on_put(cache, 10**15) == ([], PutStatus.LEGAL)
    assert ev.capacity_bytes is None
