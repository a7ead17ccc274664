"""The Tier base class: a tier's entries, evictor, byte accounting and pins."""

from __future__ import annotations

import abc
import asyncio
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmtier.admission import Admission, AdmitAll
from lmtier.evictor import BaseEvictor, PutStatus
from lmtier.keys import KeyLike
from lmtier.metrics import TierCounters
from lmtier.tiers.copies import copy_into
from lmtier.tiers.counters import Arrival, TierEvents
from lmtier.tiers.placing import Slot

__all__ = ["Arrival", "Tier", "cascade_stats"]


class Tier(TierEvents, abc.ABC):
    """One level of the cascade: entries under keys, an evictor, and a byte budget.

    ``cache_dict`` maps each committed key to the object the tier stores for it (a tensor in
    memory, a ``DiskCacheMetadata`` on disk); the evictor orders it and sizes its objects.
    A tier knows no other tier: the store moves data between tiers through ``place``, whose
    slot drives these steps, each bookkeeping step synchronous so that no other task sees it
    half done::

        if admits(key, size):                # the admission policy, asked once per offer
            async with place(key, size, arrival) as slot:  # admit: the evictor picks victims,
                # which stay readable, "leaving", until the caller removes them
                await slot.reserve(timeout)  # wait until the leaving bytes are gone
                await slot.write(tensor)     # the backend copies or writes; staged, not visible
                slot.publish(); slot.commit()  # visible; on exit without it: undone
        old = remove(key); await discard(old)

    Accounting, true at every await point:

    * ``committed`` = sum of ``get_size`` over ``cache_dict`` (leaving entries included);
    * ``evictor.charged_bytes`` = ``committed`` - leaving + ``pending`` (admitted puts);
    * ``committed + reserved <= budget``: bytes the tier holds or is writing never exceed it.

    The store reports what happened to the entries through the ``record_*`` methods
    (``TierEvents``): only the tier writes its counters.  Backends implement ``_write``,
    ``load``, ``discard`` and may override ``open``/``close``, ``load_into``, ``load_now_into``.

    A *shared* tier's storage is written by other stores too (a remote server).  Its index
    holds only what this store charged, so a key it does not index may still be in storage:
    ``fetch`` looks there, ``try_adopt`` indexes what it found, and ``forget`` deletes a key it
    does not index.
    """

    #: Whether ``load`` returns a tensor nobody else holds (the caller may keep it as is).
    loads_are_private: bool = False
    #: Whether other stores share this tier's storage (see the class docstring).
    shared: bool = False
    #: Whether an evicted entry's storage may be released after its eviction returns: its
    #: name is its own (a late removal never touches a newer value), and what a crash leaves
    #: of it is an older value that the key's next put or delete waits to see removed.
    discards_behind: bool = False

    def __init__(self, name: str, evictor: BaseEvictor) -> None:
        if evictor.capacity_bytes is None:
            raise ValueError(f"tier {name!r} needs an evictor with a byte budget")
        self.name = name
        self.evictor = evictor
        self.budget: int = evictor.capacity_bytes
        self.cache_dict: OrderedDict[KeyLike, Any] = OrderedDict()
        self.counters = TierCounters()
        #: Whether the tier takes a chunk at all (the factory sets the configured policy).
        self.admission: Admission = AdmitAll()
        self._committed = 0
        self._reserved = 0
        self._pending = 0
        self._leaving: set[KeyLike] = set()
        self._leaving_bytes = 0
        self._room_waiters: list[asyncio.Future[None]] = []
        self._pins: Counter[KeyLike] = Counter()  # pins of readers and engines, not of moves
        #: Releases of bytes, charge or pins so far: a task that looked for room compares it
        #: with what it saw, so that a change while it was busy elsewhere is not missed.
        self.changes = 0

    # ------------------------------------------------------------------ backend primitives
    @property
    @abc.abstractmethod
    def home_device(self) -> torch.device:
        """Where tensors loaded from this tier live."""

    @abc.abstractmethod
    async def _write(self, key: KeyLike, tensor: torch.Tensor) -> Any:
        """Store a copy of ``tensor`` the tier owns and return the object for ``cache_dict``.

        Must leave nothing behind if it raises; the entry is not visible until ``commit``.
        """

    @abc.abstractmethod
    async def load(self, obj: Any) -> torch.Tensor | None:
        """The tensor behind a stored object, ``None`` if it vanished.

        Raises ``CorruptEntryError`` when its bytes fail a check. Unless
        ``loads_are_private``, the result is the tier's own tensor: copy before handing it out.
        """

    def resident_tensor(self, obj: Any) -> torch.Tensor | None:
        """The tensor a stored object is, where it lives in memory (to copy from, never to hand
        out), or None where reading it takes I/O; the default."""
        return None

    async def load_into(self, obj: Any, out: torch.Tensor) -> torch.Tensor | None:
        """Fill ``out`` (the entry's shape and dtype, any device) with a stored object; ``out``,
        or None if it vanished.  Backends that can read straight into ``out`` override this."""
        data = await self.load(obj)
        return None if data is None else await copy_into(out, data)

    def load_now_into(self, obj: Any, out: torch.Tensor) -> torch.Tensor | None:
        """``out`` filled and verified at once (unpinned), or None where ``load_into`` must."""
        return None

    async def stage(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Copy a batch into this tier's memory ahead of its placements, as one batch where the
        backend can (a CPU memory tier: one gather and one copy from a GPU).

        Each result is a tensor holding one input's bytes, or None where nothing was staged.
        A staged tensor that a later ``write`` of this tier receives is adopted as is, without
        a copy; one that lands elsewhere is just the data, and ``release_staged`` frees it.
        The default stages nothing.
        """
        return [None] * len(tensors)

    def release_staged(self, tensor: torch.Tensor) -> None:
        """Free a tensor ``stage`` returned unless a ``write`` adopted it (then: nothing)."""

    @abc.abstractmethod
    async def discard(self, obj: Any) -> None:
        """Release the storage behind an object that ``remove`` took out of the tier."""

    async def open(self) -> None:
        """Prepare the backing storage; called once before the first operation."""

    async def close(self) -> None:
        """Release resources; committed entries of a persistent tier stay where they are."""

    # ------------------------------------------------------------------ the write path
    def admits(self, key: KeyLike, size: int) -> bool:
        """Ask the admission policy about one offer of ``key``; a refusal is counted and final."""
        if self.admission.admits(key, size):
            return True
        self.counters.admission_rejects += 1
        return False

    def admit(
        self, key: KeyLike, size: int, position: int | None = None
    ) -> list[tuple[KeyLike, Any]] | None:
        """Ask the evictor for room; ``None`` if refused, else the victims, now leaving.

        ``position`` is the chunk's index in its prefix chain, for position-aware evictors.
        """
        victims, status = self.evictor.update_on_put(self.cache_dict, size, key, position=position)
        if status is not PutStatus.LEGAL:
            return None
        self._pending += size
        chosen = []
        for victim in victims:
            obj = self.cache_dict[victim]
            self._leaving.add(victim)
            self._leaving_bytes += self.evictor.get_size(obj)
            self.evictor.pin(victim)  # so no later put picks it again while it moves
            chosen.append((victim, obj))
        self.counters.evictions += len(chosen)
        return chosen

    def place(
        self, key: KeyLike, size: int, arrival: Arrival = Arrival.PUT, position: int | None = None
    ) -> Slot:
        """Room for ``key`` (``size`` bytes, arriving by ``arrival``; ``position`` as for
        ``admit``), to enter with ``async with``: see ``Slot``."""
        return Slot(self, key, size, arrival, position)

    def make_way(self, key: KeyLike, size: int) -> Any:
        """Before a put of ``key`` here: take its older value out if the tier cannot hold both,
        so that the replaced value, not another entry, makes room; its object, or None.

        The older value is unreadable from then on; a value being moved (leaving) is left to
        its move, which goes stale once the put commits.
        """
        if key not in self.cache_dict or key in self._leaving:
            return None
        if self.evictor.charged_bytes + size <= self.budget and self._fits(size):
            return None
        return self.remove(key)

    async def reserve(self, size: int, timeout: float) -> None:
        """Wait until ``size`` more bytes fit beside what the tier holds and writes, then hold them.

        Raises ``TimeoutError`` after ``timeout`` seconds; the caller then calls ``cancel``.
        """
        if self.try_reserve(size):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.try_reserve(size):
            await asyncio.wait_for(self.changed(), deadline - loop.time())

    def try_reserve(self, size: int) -> bool:
        """Hold ``size`` more bytes if they fit now beside what the tier holds and writes;
        whether it did."""
        if not self._fits(size):
            return False
        self._reserved += size
        return True

    def cancel(self, key: KeyLike, size: int) -> None:
        """Undo an ``admit`` that never reserved."""
        self._pending -= size
        self.evictor.update_on_remove(key, size)
        self._notify()

    def unreserve(self, key: KeyLike, size: int) -> None:
        """Undo an ``admit`` + ``reserve`` whose write failed or was abandoned."""
        self._reserved -= size
        self.cancel(key, size)

    async def write(
        self, key: KeyLike, tensor: torch.Tensor, current: Callable[[], bool] | None = None
    ) -> Any:
        """Stage a copy of ``tensor`` under ``key`` (``_write``); the object for ``commit``.

        ``current``, where given, says whether the write is still wanted: false once a newer
        put or a delete of the key has made it stale (it will then never commit, and its
        object is discarded).  A tier whose storage others share asks it right before the
        bytes land where they can replace a newer value under the same name, and sends
        nothing once it is false; a tier whose writes are private until published may ignore
        it, as the default does.
        """
        return await self._write(key, tensor)

    def publish(self, obj: Any) -> None:
        """Make a written object durable-visible (what a restart would find), synchronously,
        right before ``commit``.  Until then a write is staged: ``discard`` removes it and a
        crash leaves nothing a restart would index.  The default does nothing."""

    async def make_durable(self, obj: Any) -> None:
        """Wait until a published object (or a discard's removal) survives a power loss, where
        the tier promises that; the default does nothing."""

    def commit(self, key: KeyLike, obj: Any, size: int) -> None:
        """Make a written entry visible; the key must not be present."""
        if key in self.cache_dict:
            raise RuntimeError(f"{key!r} committed twice to tier {self.name!r}")
        self._pending -= size
        self._reserved -= size
        self._committed += size
        self.cache_dict[key] = obj
        self.counters.bytes_in += size
        # The entry can now be chosen as a victim: a put refused for lack of evictable
        # entries may succeed.
        self._notify()

    def adopt(self, key: KeyLike, obj: Any, size: int) -> None:
        """Index an entry that already exists in storage (found when the tier opens)."""
        if key in self.cache_dict or not self._fits(size):
            raise ValueError(f"tier {self.name!r} cannot adopt {key!r} ({size} bytes)")
        victims, status = self.evictor.update_on_put(self.cache_dict, size, key)
        assert status is PutStatus.LEGAL and not victims, "an entry that fits needs no victims"
        self._committed += size
        self.cache_dict[key] = obj

    def try_adopt(self, key: KeyLike, obj: Any) -> bool:
        """``adopt`` an entry found in storage if it fits without evicting; whether it did.

        Only while no put is admitted or moving out: then the evictor's charge equals the
        committed bytes, so an entry that fits the budget needs no victim.
        """
        size = self.evictor.get_size(obj)
        if key in self.cache_dict or self._pending or self._leaving or not self._fits(size):
            return False
        self.adopt(key, obj, size)
        return True

    # ------------------------------------------------------------------ shared storage
    async def fetch(self, key: KeyLike) -> tuple[Any, torch.Tensor] | None:
        """Look for ``key`` in storage beyond the index: the object and a private tensor, or
        None.  Only shared tiers find anything; the entry is not indexed (see ``try_adopt``)."""
        return None

    async def forget(self, key: KeyLike) -> bool:
        """Delete ``key`` from shared storage although the index does not hold it; whether
        storage held it.  Called by a delete, so that no other store finds the entry again."""
        return False

    async def clear_prefix(self) -> int:
        """Delete every value under this tier's names in shared storage, whoever wrote it; how
        many.  Only shared tiers hold values beyond their index."""
        return 0

    # ------------------------------------------------------------------ reads and removal
    def lookup(self, key: KeyLike) -> Any:
        return self.cache_dict.get(key)

    def keys(self) -> list[KeyLike]:
        """The keys the tier indexes, leaving ones included, in the index's order."""
        return list(self.cache_dict)

    def size_of(self, obj: Any) -> int:
        """The bytes a stored object is charged for."""
        return self.evictor.get_size(obj)

    def entry_sizes(self) -> list[tuple[KeyLike, int]]:
        """Each indexed key with its charged bytes."""
        size = self.evictor.get_size
        return [(key, size(obj)) for key, obj in self.cache_dict.items()]

    def next_victims(self, nbytes: int) -> list[KeyLike]:
        """The keys that puts of ``nbytes`` more bytes would evict next, where the evictor can
        name them (``BaseEvictor.next_victims``)."""
        return list(self.evictor.next_victims(self.cache_dict, nbytes))

    def pin(self, key: KeyLike) -> None:
        """Keep ``key`` from being chosen as a victim (a read, or an engine's lookup)."""
        self.evictor.pin(key)
        self._pins[key] += 1

    def unpin(self, key: KeyLike) -> None:
        self.evictor.unpin(key)
        self._pins[key] -= 1
        if not self._pins[key]:
            del self._pins[key]
        if not self.evictor.is_pinned(key):
            self._notify()

    def pinned_usage(self) -> tuple[int, int]:
        """Entries held here that a reader or an engine pinned, and their bytes."""
        sizes = [
            self.evictor.get_size(self.cache_dict[k]) for k in self._pins if k in self.cache_dict
        ]
        return len(sizes), sum(sizes)

    def is_leaving(self, key: KeyLike) -> bool:
        return key in self._leaving

    def remove(self, key: KeyLike) -> Any:
        """Take ``key`` out of the tier (as victim gone, deleted, replaced or moved); its object."""
        obj = self.cache_dict.pop(key, None)
        if obj is None:
            return None
        size = self.evictor.get_size(obj)
        self._committed -= size
        if key in self._leaving:  # a victim: its evictor discharged it when it chose it
            self._leaving.discard(key)
            self._leaving_bytes -= size
            self.evictor.unpin(key)
        else:
            self.evictor.update_on_remove(key, size)
        self._notify()
        return obj

    # ------------------------------------------------------------------ observation
    @property
    def resident_bytes(self) -> int:
        """Bytes held or being written: committed entries plus reservations."""
        return self._committed + self._reserved

    @property
    def available(self) -> bool:
        """Whether the tier's storage answers (False while a server is known to be down)."""
        return True

    @property
    def reachable(self) -> bool:
        """Whether operations may be tried now; a tier whose storage is known to be down (and
        not yet due for a retry) is skipped by the store instead of failing every put."""
        return True

    def stats(self) -> dict[str, Any]:
        pinned_entries, pinned_bytes = self.pinned_usage()
        return {
            "entries": len(self.cache_dict),
            "resident_bytes": self.resident_bytes,
            "budget_bytes": self.budget,
            "pinned_entries": pinned_entries,
            "pinned_bytes": pinned_bytes,
            "moving_out": len(self._leaving),
            **self.counters.as_dict(),
        }

    def describe_room(self) -> str:
        """What holds this tier's bytes, for a put that waited for room in vain."""
        pinned_entries, pinned_bytes = self.pinned_usage()
        return (
            f"tier {self.name!r} holds {self._committed} of {self.budget} bytes "
            f"({pinned_entries} entries, {pinned_bytes} bytes pinned; "
            f"{len(self._leaving)} entries, {self._leaving_bytes} bytes moving out; "
            f"{self._pending} bytes admitted for puts in flight)"
        )

    def audit(self, quiescent: bool = False) -> list[str]:
        """Broken accounting invariants, as messages (empty when all hold)."""
        problems = []
        counted = sum(self.evictor.get_size(obj) for obj in self.cache_dict.values())
        if counted != self._committed:
            problems.append(f"{self.name}: committed {self._committed} != sum of sizes {counted}")
        expected_charge = self._committed - self._leaving_bytes + self._pending
        if self.evictor.charged_bytes != expected_charge:
            problems.append(
                f"{self.name}: evictor charged {self.evictor.charged_bytes} != {expected_charge}"
            )
        if self.resident_bytes > self.budget:
            problems.append(f"{self.name}: resident {self.resident_bytes} > budget {self.budget}")
        if quiescent and (self._pending or self._reserved or self._leaving):
            problems.append(
                f"{self.name}: idle yet pending={self._pending} reserved={self._reserved} "
                f"leaving={len(self._leaving)}"
            )
        return problems

    # ------------------------------------------------------------------ internals
    def _fits(self, size: int) -> bool:
        return self._committed + self._reserved + size <= self.budget

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the tier's next release of bytes, charge or pins."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._room_waiters.append(waiter)
        return waiter

    def _notify(self) -> None:
        """Wake every task waiting for a change; each re-checks its own condition."""
        self.changes += 1
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def cascade_stats(tiers: Sequence[Tier]) -> dict[str, dict[str, Any]]:
    """Each tier's ``stats()`` by name, with ``clean_copies``: its entries whose key a tier
    above also holds (a promotion's source, left in place)."""
    stats = {}
    above: set[KeyLike] = set()
    for index, tier in enumerate(tiers):
        keys = tier.cache_dict.keys()
        stats[tier.name] = tier.stats()
        stats[tier.name]["clean_copies"] = len(keys & above) if above else 0
        if index + 1 < len(tiers):
            above.update(keys)
    return stats
