"""Per-key state of the work in flight: put tickets, moves, held drops, copies written ahead,
and every removal of a key's older bytes, which the key's next put or delete waits for."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from lmtier.keys import KeyLike
from lmtier.tiers.base import Tier

__all__ = ["MAX_DISCARDS_BEHIND", "KeyLedger"]

log = logging.getLogger("lmtier.store")

#: Evicted entries whose storage is being released in the background at most (beyond it an
#: eviction waits for its own release): what a folder may hold over its budget meanwhile.
MAX_DISCARDS_BEHIND = 32

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class KeyLedger:
    """What is in flight for each key, and the removals of its older bytes.

    ``spawn`` starts background work (a release of evicted storage); ``is_held`` says whether
    a tier holds a key (a drop held back for a put is reported only if the key is gone);
    ``on_drop`` hears of each key that left the store for good.
    """

    def __init__(
        self,
        spawn: Spawn,
        is_held: Callable[[KeyLike], bool],
        on_drop: Callable[[KeyLike], None] | None = None,
    ) -> None:
        self._spawn = spawn
        self._is_held = is_held
        self.on_drop = on_drop
        self.positions: dict[KeyLike, int] = {}  # chunk index in its prefix, for evictors
        # Keys with a put in flight, and those of them whose older value was dropped meanwhile:
        # the drop is reported only if the put fails, since otherwise the key was never gone.
        self.putting: Counter[KeyLike] = Counter()
        self.drops_held: set[KeyLike] = set()
        # Puts are numbered as they are called; while puts of a key are in flight, the number
        # of the newest one that committed: an older put (e.g. one whose caller was cancelled
        # and which finished in the background) never replaces a newer value.
        self.tickets = 0
        self.newest_put: dict[KeyLike, int] = {}
        # Keys with a demotion or promotion in flight: a shared tier's value of such a key may
        # be a move's write that a delete or put has made stale, so it is never adopted.
        self.moving: Counter[KeyLike] = Counter()
        # Keys being copied down ahead of their eviction (``write_ahead``): what their
        # demotion waits for, so that it hands over to the copy instead of writing again.
        self.writing_ahead: dict[KeyLike, asyncio.Future[None]] = {}
        # Removals of each key's stored bytes still running (see ``_remove``), and moves of it
        # whose write into a shared tier may be on the server before they commit (see
        # ``move``): a put or delete of the key waits for them, so no older value outlives
        # its return.
        self.discarding: dict[KeyLike, set[asyncio.Future[None]]] = {}
        self.behind = 0  # of those, evictions' removals that no caller awaits
        self.deletes = 0  # deletes so far: a fetch that overlapped one adopts nothing

    # ------------------------------------------------------------------ puts
    def begin_put(self, key: KeyLike) -> int:
        """Count a put of ``key`` in flight; its ticket (puts are numbered as called)."""
        self.putting[key] += 1
        self.tickets += 1
        return self.tickets

    def superseded(self, key: KeyLike, ticket: int) -> bool:
        """Whether a put called after the one with ``ticket`` has committed already."""
        return self.newest_put.get(key, 0) > ticket

    def committed(self, key: KeyLike, ticket: int) -> None:
        self.newest_put[key] = ticket

    def end_put(self, key: KeyLike) -> None:
        self.putting[key] -= 1
        if not self.putting[key]:
            del self.putting[key]
            self.newest_put.pop(key, None)
            if key in self.drops_held:
                self.drops_held.discard(key)
                if not self._is_held(key):
                    self.notify_drop(key)

    def notify_drop(self, key: KeyLike) -> None:
        """``key`` left the store, unless a put of it is landing (then: held until it ends)."""
        if key in self.putting:  # a new value is landing: the key may not be gone at all
            self.drops_held.add(key)
            return
        self.positions.pop(key, None)
        if self.on_drop is not None:
            try:
                self.on_drop(key)
            except Exception:
                log.exception("on_drop callback failed for %r", key)

    def begin_delete(self) -> None:
        self.deletes += 1

    # ------------------------------------------------------------------ moves
    @contextmanager
    def move(self, key: KeyLike, into: Sequence[Tier] = ()) -> Iterator[None]:
        """Mark ``key`` as moving for the duration (a move into one of the tiers ``into``).

        A shared tier's write is on the server before the move commits, and a put or delete
        that makes the move stale meanwhile would otherwise return with the move's bytes
        still there (a restart or another store would find them).  So a move into a shared
        tier counts as a pending removal of the key from the start: the key's next put or
        delete waits until the move has committed, or gone stale and registered the removal
        of what it wrote.  The move itself never waits for a put or delete of its key.
        """
        self.moving[key] += 1
        landing: asyncio.Future[None] | None = None
        if any(tier.shared for tier in into):
            landing = asyncio.get_running_loop().create_future()
            self._register(key, landing)
        try:
            yield
        finally:
            self.moving[key] -= 1
            if not self.moving[key]:
                del self.moving[key]
            if landing is not None:  # after a stale write's removal was registered
                landing.set_result(None)

    def start_copy(self, key: KeyLike) -> asyncio.Future[None]:
        """Register a copy of ``key`` written ahead of its eviction; resolved by ``end_copy``."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writing_ahead[key] = done
        return done

    def end_copy(self, key: KeyLike) -> None:
        self.writing_ahead.pop(key).set_result(None)

    # ------------------------------------------------------------------ removals
    # Every removal of a key's stored bytes starts here, as a task registered under the key
    # (``discarding``) that the key's next put or delete waits for, however the removal came
    # about: a replaced or deleted value, a move's source, an abandoned write, an eviction.
    # As a task, a removal also runs to its end when whoever awaits it is cancelled.
    #
    # A removal that needs no await (a memory tier's) ends on the spot, with no task: the caller
    # then does not yield to the loop, so no reader sees the gap between an overwrite's removal
    # of the old value and its commit of the new one where no await separates them.
    def _remove(self, tier: Tier, key: KeyLike, obj: Any) -> asyncio.Task[None] | None:
        removal = tier.discard(obj)
        try:
            first = removal.send(None)
        except StopIteration:
            return None
        except Exception:
            log.exception("tier %r: removing the storage of %r failed", tier.name, key)
            return None
        task = self._spawn(_resumed(removal, first))
        self._register(key, task)
        return task

    def _register(self, key: KeyLike, pending: asyncio.Future[None]) -> None:
        """Have the key's next put or delete wait for ``pending``."""
        self.discarding.setdefault(key, set()).add(pending)
        pending.add_done_callback(functools.partial(self._forget_discard, key))

    async def discard(self, tier: Tier, key: KeyLike, obj: Any) -> None:
        """Remove ``key``'s entry ``obj`` from ``tier`` (replaced, deleted, moved, or a write
        abandoned) before returning; the key's next put or delete waits for it too."""
        task = self._remove(tier, key, obj)
        if task is not None:
            await asyncio.wait([task])

    async def release(self, tier: Tier, key: KeyLike, obj: Any) -> None:
        """Release an evicted entry's storage: in the background where the tier allows
        (``Tier.discards_behind``) and fewer than ``MAX_DISCARDS_BEHIND`` are, else before
        returning; either way the key's next put or delete waits for it."""
        if not tier.discards_behind or self.behind >= MAX_DISCARDS_BEHIND:
            await self.discard(tier, key, obj)
            return
        self.discard_behind(tier, key, obj)

    def discard_behind(self, tier: Tier, key: KeyLike, obj: Any) -> None:
        """Remove an entry's storage in the background; the key's next put or delete waits."""
        task = self._remove(tier, key, obj)
        if task is not None:
            self.behind += 1
            task.add_done_callback(self._behind_done)

    def _behind_done(self, _task: asyncio.Task[None]) -> None:
        self.behind -= 1

    def _forget_discard(self, key: KeyLike, task: asyncio.Future[None]) -> None:
        pending = self.discarding[key]
        pending.discard(task)
        if not pending:
            del self.discarding[key]

    async def discarded(self, key: KeyLike) -> None:
        """Wait until no removal of ``key``'s stored bytes is still running, and no move of it
        into a shared tier."""
        while key in self.discarding:
            await asyncio.wait(self.discarding[key])


class _Rest:
    """The rest of a coroutine that already ran up to its first suspension (``first``)."""

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self._coro, self._first = coro, first

    def __await__(self) -> Generator[Any, Any, None]:
        coro, value = self._coro, self._first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # a cancellation included: the coroutine decides
                try:
                    value = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = coro.send(sent)
                except StopIteration:
                    return


async def _resumed(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _Rest(coro, first)
