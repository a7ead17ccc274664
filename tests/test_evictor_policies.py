"""Each policy's own behaviour, beyond the contract every evictor keeps."""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from lmtier.config import StoreConfig, TierConfig
from lmtier.evictor import BaseEvictor, PutStatus, make_evictor
from lmtier.evictor.arc_evictor import ARCEvictor
from lmtier.evictor.prefix_evictor import PrefixEvictor
from lmtier.evictor.s3fifo_evictor import S3FIFOEvictor
from lmtier.store import TieredStore


class Cache:
    """A caller of the protocol, as a tier is: victims out, then the new key at the end."""

    def __init__(self, evictor: BaseEvictor, seed_style: bool = False) -> None:
        self.evictor = evictor
        self.seed_style = seed_style
        self.data: OrderedDict[str, bytes] = OrderedDict()
        self.evicted: list[str] = []

    def put(self, key: str, size: int = 1, position: int | None = None) -> list[str]:
        if self.seed_style:
            victims, status = self.evictor.update_on_put(self.data, size)
        else:
            victims, status = self.evictor.update_on_put(self.data, size, key, position=position)
        assert status is PutStatus.LEGAL
        for victim in victims:
            del self.data[victim]
        self.data[key] = bytes(size)
        self.evicted += victims
        return victims

    def get(self, key: str) -> bool:
        self.evictor.update_on_get(key, self.data)
        return key in self.data

    def access(self, key: str, position: int | None = None) -> bool:
        """A read that puts on a miss, as the replay does."""
        if self.get(key):
            return True
        self.put(key, 1, position)
        return False


def test_fifo_ignores_gets() -> None:
    cache = Cache(make_evictor("fifo", 3))
    for key in "abc":
        cache.put(key)
    cache.get("a")
    assert cache.put("d") == ["a"]
    assert list(cache.data) == ["b", "c", "d"]


def test_lfu_evicts_the_least_used_then_the_least_recent() -> None:
    cache = Cache(make_evictor("lfu", 3))
    for key in "abc":
        cache.put(key)
    cache.get("a")
    cache.get("b")
    assert cache.put("d") == ["c"]  # counts a=2 b=2 d=1 now
    cache.get("d")  # all at 2: a used longest ago
    assert cache.put("e") == ["a"]
    cache.get("b")
    cache.get("e")
    assert cache.put("f") == ["d"]  # e=2 ties d=2; d used before e


@pytest.mark.parametrize("seed_style", [False, True])
def test_s3fifo_scan_of_once_used_keys_does_not_flush_hot_ones(seed_style: bool) -> None:
    cache = Cache(S3FIFOEvictor(100), seed_style)
    hot = [f"hot{i}" for i in range(60)]
    for key in hot:
        cache.put(key)
        cache.get(key)
    for i in range(1000):  # each hot key is read now and then, as a working set is
        cache.access(f"scan{i}")
        cache.get(hot[i % len(hot)])
    assert all(key in cache.data for key in hot)


def test_s3fifo_ghost_hit_enters_main() -> None:
    evictor = S3FIFOEvictor(10)
    cache = Cache(evictor)
    for i in range(11):
        cache.put(f"k{i}")
    assert cache.evicted == ["k0"]
    cache.put("k0")
    assert "k0" in evictor._main and "k0" not in evictor._small


def test_s3fifo_finds_a_victim_behind_pinned_entries_met_twice() -> None:
    """A main-queue walk that passes a pinned entry on each of several passes (while it
    decrements a hot entry's uses) still reaches the entry whose uses ran out."""
    evictor = S3FIFOEvictor(16)
    cache: OrderedDict[str, bytes] = OrderedDict(hot=bytes(8), moving=bytes(8))
    for key in cache:
        assert evictor.update_on_put(OrderedDict(), 8, key) == ([], PutStatus.LEGAL)
    for queue in (evictor._small, evictor._main):
        queue.clear()
    evictor._main.update(hot=None, moving=None)  # both in main, as after a ghost hit
    evictor._small_bytes = 0
    evictor._freq.update(hot=2, moving=0)
    evictor.pin("moving")  # a victim still on its way out
    victims, status = evictor.update_on_put(cache, 1, "new")
    assert (victims, status) == (["hot"], PutStatus.LEGAL)


def test_arc_target_moves_toward_the_list_whose_ghost_hits() -> None:
    evictor = ARCEvictor(4)
    cache = Cache(evictor)
    for key in "abcd":
        cache.put(key)
    cache.get("c")
    cache.get("d")  # T1 = a b, T2 = c d
    assert cache.put("e") == ["a"]  # T1 above its target 0: a goes to B1
    assert evictor.target == 0
    assert cache.put("a") == ["b"]  # a B1 hit: T1 was too small, p rises
    raised = evictor.target
    assert raised > 0
    assert cache.put("f") == ["c"]  # T1 (e) within p: T2's LRU goes to B2
    cache.put("c")  # a B2 hit: T2 was too small, p falls
    assert evictor.target < raised


def test_prefix_policy_evicts_a_chain_from_its_tail() -> None:
    cache = Cache(PrefixEvictor(40, adapt=False))
    chain = [f"c{i}" for i in range(10)]
    for position, key in enumerate(chain):
        cache.put(key, position=position)
    for key in chain:  # a later turn reads the chain, head first: all protected
        cache.get(key)
    for i in range(36):  # other chains' heads, read after it
        cache.put(f"other{i}", position=0)
        cache.get(f"other{i}")
    assert cache.evicted == ["c8", "c9", "c4", "c5", "c6", "c7"]  # deepest class first
    assert all(key in cache.data for key in chain[:4])


def test_prefix_policy_filters_chunks_used_once() -> None:
    cache = Cache(PrefixEvictor(100, adapt=False))
    kept = [f"turn{i}" for i in range(50)]
    for position, key in enumerate(kept):
        cache.put(key, position=position)
        cache.get(key)
    for i in range(2000):  # chunks of requests never seen again, at every position
        cache.access(f"once{i}", position=i % 64)
    assert all(key in cache.data for key in kept)


def test_prefix_policy_without_positions_is_recency_over_reused_chunks() -> None:
    cache = Cache(PrefixEvictor(4, adapt=False, use_bonus=0.0), seed_style=True)
    for key in "abcd":
        cache.put(key)
        cache.get(key)
    cache.get("a")
    cache.put("e")
    assert cache.evicted == ["b"]


def test_prefix_policy_oldest_protected_head_matches_a_scan_of_every_list() -> None:
    # The heap of list heads is kept through hits, removals and evictions; a scan of the
    # lists is the reference it must agree with after every step.
    rng = random.Random(7)
    evictor = PrefixEvictor(60, probation=0.02)
    cache = Cache(evictor)
    for step in range(3000):
        key = f"k{rng.randrange(200)}"
        if rng.random() < 0.1 and key in cache.data:
            evictor.update_on_remove(key, 1)
            del cache.data[key]
        else:
            cache.access(key, position=rng.randrange(80))
        scores = [
            (stamp + evictor._bonus[index], index, head)
            for index, stamped in enumerate(evictor._lists)
            if stamped
            for head, stamp in list(stamped.items())[:1]
        ]
        expected = min(scores)[2] if scores else None
        assert evictor._oldest_protected() == expected, step
    assert len(evictor._heads) <= 4 * len(evictor._lists) + 1


async def test_store_put_position_reaches_the_evictor(tmp_path: Path) -> None:
    config = StoreConfig((TierConfig("cpu", "memory", 1 << 16, evictor="prefix"),))
    async with TieredStore(config) as store:
        await store.put("deep", torch.zeros(4), position=40)
        await store.put_many([("head", torch.zeros(4))], positions={"head": 0})
        evictor = store.tiers[0].evictor
        assert isinstance(evictor, PrefixEvictor)
        assert evictor._class["deep"] == PrefixEvictor.position_class(40) > 0
        assert evictor._class["head"] == 0


@pytest.mark.parametrize("policy", ["lfu", "s3fifo", "arc", "prefix"])
def test_a_key_admitted_again_before_its_old_entry_leaves(policy: str) -> None:
    # The store admits an overwrite, writes it, then removes the old entry and commits.
    evictor = make_evictor(policy, 3)
    data: OrderedDict[str, bytes] = OrderedDict()
    for key in "ab":
        evictor.update_on_put(data, 1, key)
        data[key] = bytes(1)
    assert evictor.update_on_put(data, 1, "a") == ([], PutStatus.LEGAL)
    evictor.update_on_remove("a", len(data.pop("a")))
    data["a"] = bytes(1)
    assert evictor.charged_bytes == 2
    victims, status = evictor.update_on_put(data, 2, "c")
    assert status is PutStatus.LEGAL and len(victims) == 1 and victims[0] in ("a", "b")
    for victim in victims:
        del data[victim]
    data["c"] = bytes(2)
    assert evictor.charged_bytes == sum(len(v) for v in data.values()) == 3
    evictor.pin("c")
    rest = [key for key in data if key != "c"]
    assert evictor.update_on_put(data, 1, "d") == (rest, PutStatus.LEGAL)


def test_a_victim_kept_in_cache_dict_while_it_moves_is_not_named_again() -> None:
    # A tier keeps victims readable (and pinned) until they have moved down.
    evictor = make_evictor("prefix", 2)
    data: OrderedDict[str, bytes] = OrderedDict()
    for key in "ab":
        evictor.update_on_put(data, 1, key, position=0)
        data[key] = bytes(1)
    first, _ = evictor.update_on_put(data, 1, "c", position=0)
    evictor.update_on_get(first[0], data)  # a read of the leaving entry changes nothing
    second, _ = evictor.update_on_put(data, 1, "d", position=0)
    assert first and second and first[0] not in second
