"""The contract every evictor passes: random put/get/remove/pin/unpin sequences against a model.

A policy of this package is registered (``register_evictor``) and ``tests/test_evictor_contract``
runs it through both machines below.  A policy of another package subclasses
``EvictorContract`` in its own tests; ``run_contract(factory, capacity)`` and
``run_shared_key_contract(factory, capacity)`` run one machine directly.  Needs hypothesis.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from lmtier.evictor import BaseEvictor, PutStatus
from lmtier.keys import KeyLike

KEYS = st.sampled_from([f"k{i}" for i in range(12)])
VictimModel = Callable[
    ["OrderedDict[KeyLike, bytes]", set[KeyLike], int, int, int], list[KeyLike] | None
]


def lru_victims(
    cache: OrderedDict[KeyLike, bytes],
    pinned: set[KeyLike],
    charged: int,
    capacity: int,
    size: int,
) -> list[KeyLike] | None:
    """LRU's exact answer: unpinned keys from the least-recent end until ``size`` fits."""
    if size > capacity:
        return None
    need = charged + size - capacity
    victims: list[KeyLike] = []
    for key, value in cache.items():
        if need <= 0:
            break
        if key in pinned:
            continue
        victims.append(key)
        need -= len(value)
    return victims if need <= 0 else None


def run_contract(
    factory: Callable[[int], BaseEvictor],
    capacity: int,
    victim_model: VictimModel | None = None,
    max_examples: int = 150,
) -> None:
    """Drive ``factory(capacity)`` through random sequences, checking the contract each step."""

    class EvictorMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.evictor = factory(capacity)
            self.bounded = self.evictor.capacity_bytes is not None
            self.cache: OrderedDict[KeyLike, bytes] = OrderedDict()
            self.pins: dict[str, int] = {}

        def _put(self, key: str, size: int) -> tuple[list[KeyLike], PutStatus]:
            before = list(self.cache.items())
            charged_before = self.evictor.charged_bytes
            expected = (
                victim_model(self.cache, set(self.pins), charged_before, capacity, size)
                if victim_model
                else None
            )
            victims, status = self.evictor.update_on_put(self.cache, size)
            assert list(self.cache.items()) == before, "update_on_put mutated cache_dict"
            if status is PutStatus.ILLEGAL:
                assert victims == []
                assert self.evictor.charged_bytes == charged_before
                if self.bounded:
                    unpinned = sum(len(v) for k, v in self.cache.items() if k not in self.pins)
                    free = capacity - charged_before
                    assert size > capacity or size > free + unpinned, "refused a put that fits"
            else:
                assert status is PutStatus.LEGAL
                assert len(set(victims)) == len(victims), "a victim named twice"
                for victim in victims:
                    assert victim in self.cache, f"victim {victim} is not cached"
                    assert victim not in self.pins, f"pinned {victim} chosen as victim"
            if victim_model is not None:
                assert (victims if status is PutStatus.LEGAL else None) == expected
            return victims, status

        @rule(key=KEYS, size=st.integers(0, capacity + capacity // 2))
        def put(self, key: str, size: int) -> None:
            if key in self.cache:  # an overwrite: the old entry leaves first
                self.evictor.update_on_remove(key, len(self.cache.pop(key)))
            victims, status = self._put(key, size)
            if status is PutStatus.LEGAL:
                for victim in victims:
                    del self.cache[victim]
                self.cache[key] = bytes(size)

        @rule(key=KEYS, size=st.integers(0, capacity))
        def abandoned_put(self, key: str, size: int) -> None:
            if key in self.cache:
                return
            victims, status = self._put(key, size)
            if status is PutStatus.LEGAL:
                for victim in victims:
                    del self.cache[victim]
                self.evictor.update_on_remove(key, size)

        @rule(key=KEYS)
        def get(self, key: str) -> None:
            keys_before = set(self.cache)
            self.evictor.update_on_get(key, self.cache)
            assert set(self.cache) == keys_before
            if victim_model is lru_victims and key in self.cache:
                assert next(reversed(self.cache)) == key

        @rule(key=KEYS)
        def remove(self, key: str) -> None:
            if key in self.cache:
                self.evictor.update_on_remove(key, len(self.cache.pop(key)))

        @rule(key=KEYS)
        def pin(self, key: str) -> None:
            self.evictor.pin(key)
            self.pins[key] = self.pins.get(key, 0) + 1
            assert self.evictor.is_pinned(key)

        @rule(key=KEYS)
        def unpin(self, key: str) -> None:
            if key not in self.pins:
                return
            self.evictor.unpin(key)
            self.pins[key] -= 1
            if not self.pins[key]:
                del self.pins[key]
            assert self.evictor.is_pinned(key) == (key in self.pins)

        @invariant()
        def counter_is_exact(self) -> None:
            total = sum(self.evictor.get_size(v) for v in self.cache.values())
            assert self.evictor.charged_bytes == total
            if self.bounded:
                assert self.evictor.charged_bytes <= capacity

    run_state_machine_as_test(  # type: ignore[no-untyped-call]  # hypothesis leaves it bare
        EvictorMachine,
        settings=settings(max_examples=max_examples, stateful_step_count=40, deadline=None),
    )


SHARED_KEYS = st.sampled_from(["a", "b", "c", "d"])


def run_shared_key_contract(
    factory: Callable[[int], BaseEvictor],
    capacity: int,
    victim_model: VictimModel | None = None,
    max_examples: int = 150,
) -> None:
    """Drive ``factory(capacity)`` as a tier does, with a few keys shared by overlapping puts.

    Each put names its key, is admitted, and later commits (replacing the key's committed
    entry, which is removed with its own size) or is abandoned (removed with the put's size),
    in any order; several puts of one key, of different sizes, are in flight at once.
    Victims stay in ``cache_dict``, pinned, until they have moved out, as the store keeps
    them.  After every step the evictor's charge must equal the model's: for each key, the
    sizes of its admitted puts not yet committed or abandoned, plus its committed entry unless
    that entry is a victim on its way out.
    """

    class SharedKeyMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.evictor = factory(capacity)
            self.bounded = self.evictor.capacity_bytes is not None
            self.cache: OrderedDict[KeyLike, bytes] = OrderedDict()
            self.in_flight: list[tuple[str, int]] = []  # admitted puts, in admission order
            self.leaving: set[KeyLike] = set()  # victims still in cache_dict while they move
            self.pins: dict[str, int] = {}

        def _model_charge(self) -> int:
            committed = sum(len(v) for k, v in self.cache.items() if k not in self.leaving)
            return committed + sum(size for _, size in self.in_flight)

        def _leave(self, key: str) -> None:
            """A victim finished moving out: it leaves cache_dict without a removal."""
            del self.cache[key]
            self.leaving.discard(key)
            self.evictor.unpin(key)

        @rule(key=SHARED_KEYS, size=st.integers(0, capacity // 2), position=st.integers(0, 9))
        def admit(self, key: str, size: int, position: int) -> None:
            charged_before = self.evictor.charged_bytes
            pinned = set(self.pins) | self.leaving
            expected = (
                victim_model(self.cache, pinned, charged_before, capacity, size)
                if victim_model
                else None
            )
            before = list(self.cache.items())
            victims, status = self.evictor.update_on_put(self.cache, size, key, position=position)
            assert list(self.cache.items()) == before, "update_on_put mutated cache_dict"
            if victim_model is not None:
                assert (victims if status is PutStatus.LEGAL else None) == expected
            if status is PutStatus.ILLEGAL:
                assert victims == []
                assert self.evictor.charged_bytes == charged_before
                if self.bounded:
                    evictable = sum(len(v) for k, v in self.cache.items() if k not in pinned)
                    free = capacity - charged_before
                    assert size > free + evictable, "refused a put that fits"
                return
            assert len(set(victims)) == len(victims), "a victim named twice"
            for victim in victims:
                assert victim in self.cache, f"victim {victim} is not in cache_dict"
                assert victim not in self.pins, f"pinned {victim} chosen as victim"
                assert victim not in self.leaving, f"{victim} named again while it moves"
                self.leaving.add(victim)
                self.evictor.pin(victim)
            self.in_flight.append((key, size))

        @rule(data=st.data())
        def commit(self, data: st.DataObject) -> None:
            if not self.in_flight:
                return
            index = data.draw(st.integers(0, len(self.in_flight) - 1))
            key, size = self.in_flight.pop(index)
            if key in self.leaving:  # the store takes the moving victim out first
                self._leave(key)
            elif key in self.cache:  # the replaced entry is removed with its own size
                self.evictor.update_on_remove(key, len(self.cache.pop(key)))
            self.cache[key] = bytes(size)

        @rule(data=st.data())
        def abandon(self, data: st.DataObject) -> None:
            if not self.in_flight:
                return
            index = data.draw(st.integers(0, len(self.in_flight) - 1))
            key, size = self.in_flight.pop(index)
            self.evictor.update_on_remove(key, size)

        @rule(key=SHARED_KEYS)
        def moved_out(self, key: str) -> None:
            if key in self.leaving:
                self._leave(key)

        @rule(key=SHARED_KEYS)
        def remove(self, key: str) -> None:
            if key in self.cache and key not in self.leaving:
                self.evictor.update_on_remove(key, len(self.cache.pop(key)))

        @rule(key=SHARED_KEYS)
        def get(self, key: str) -> None:
            keys_before = set(self.cache)
            self.evictor.update_on_get(key, self.cache)
            assert set(self.cache) == keys_before

        @rule(key=SHARED_KEYS)
        def pin(self, key: str) -> None:
            self.evictor.pin(key)
            self.pins[key] = self.pins.get(key, 0) + 1

        @rule(key=SHARED_KEYS)
        def unpin(self, key: str) -> None:
            if key not in self.pins:
                return
            self.evictor.unpin(key)
            self.pins[key] -= 1
            if not self.pins[key]:
                del self.pins[key]

        @invariant()
        def charge_matches_the_model(self) -> None:
            assert self.evictor.charged_bytes == self._model_charge()
            if self.bounded:
                assert self.evictor.charged_bytes <= capacity

    run_state_machine_as_test(  # type: ignore[no-untyped-call]  # hypothesis leaves it bare
        SharedKeyMachine,
        settings=settings(max_examples=max_examples, stateful_step_count=50, deadline=None),
    )


class EvictorContract:
    """The evictor contract as a pytest class: subclass it in a test module.

    Override ``make_evictor(capacity)``: a fresh evictor whose budget is ``capacity`` bytes
    (a policy without a budget, like ``DummyEvictor``, ignores it).  Optionally override
    ``victim_model()`` to return a function giving the exact victims the policy must choose
    (``lru_victims`` for an LRU), and set ``capacities`` or ``max_examples``.

    Two tests are inherited: random put / get / remove / pin / unpin sequences checked against
    a model after every step (the charge equals the sum of ``get_size``, the budget holds, no
    pinned entry is a victim, ``update_on_put`` never mutates ``cache_dict``, a refusal only
    when nothing unpinned can make room), and overlapping puts of a few shared keys that commit
    or are abandoned in any order, as a tier drives its evictor.
    """

    capacities: tuple[int, ...] = (64, 1000)
    max_examples: int = 150

    def make_evictor(self, capacity: int) -> BaseEvictor:
        """A new evictor with a budget of ``capacity`` bytes."""
        raise NotImplementedError(f"{type(self).__name__} must define make_evictor(capacity)")

    def victim_model(self) -> VictimModel | None:
        """The exact victims the policy picks, if it promises an order; None checks no order."""
        return None

    def test_random_sequences_keep_the_contract(self) -> None:
        for capacity in self.capacities:
            run_contract(self.make_evictor, capacity, self.victim_model(), self.max_examples)

    def test_overlapping_puts_of_shared_keys_keep_the_charge_exact(self) -> None:
        for capacity in self.capacities:
            run_shared_key_contract(
                self.make_evictor, capacity, self.victim_model(), self.max_examples
            )
