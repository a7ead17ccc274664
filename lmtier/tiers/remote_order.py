"""The remote tier's commands on one key, in the order they were issued.

A mixin of ``RemoteTier`` (beside ``RemoteConnection``, which sends the commands): batches go
out on several connections at once, so two commands on one key name could otherwise land in
either order.  Here each command on a key waits for the one before it to land; what it leaves
behind is noted for ``fetch``: the checksum of the value this store last wrote under each
key, and the keys whose value on the server may be stale after a command that failed.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from lmtier.keys import KeyLike

__all__ = ["MAX_REMEMBERED_KEYS", "OrderedCommands"]

# How many keys' last-written checksums are remembered (see ``fetch``); ~100 bytes each.
MAX_REMEMBERED_KEYS = 1 << 20


class OrderedCommands:
    """Per-key command order and what it leaves behind; ``_command`` sends one command."""

    def _init_order(self) -> None:
        # The checksum of the last value this store wrote under each key (bounded, oldest
        # first): ``fetch`` serves what other stores wrote, never this store's own leftovers.
        self._wrote: OrderedDict[KeyLike, str] = OrderedDict()
        # Keys whose value on the server may be stale (see ``_suspect_value``), oldest first.
        self._suspect: OrderedDict[KeyLike, None] = OrderedDict()
        # The last command issued on each key's value, resolved when it lands (``_in_order``).
        self._last_command: dict[KeyLike, asyncio.Future[None]] = {}

    async def _command(self, name: str, *args: Any) -> Any:
        raise NotImplementedError  # RemoteConnection's

    def _remember(self, key: KeyLike, checksum: str) -> None:
        """Note the checksum of the value this store's SET of ``key`` just landed."""
        self._wrote[key] = checksum
        self._wrote.move_to_end(key)
        if len(self._wrote) > MAX_REMEMBERED_KEYS:
            self._wrote.popitem(last=False)

    async def _in_order(
        self,
        key: KeyLike,
        name: str,
        *args: Any,
        unless: Callable[[], bool] | None = None,
        landed: Callable[[], None] | None = None,
    ) -> Any:
        """Run a command on ``key``'s value once every earlier one on it has landed (none if
        ``unless()`` holds then); ``landed()`` runs once it succeeded, before any later command
        on the key is let through, so what it notes follows the server's order.

        Batches go out on several connections at once, so two commands on one name could
        otherwise land in either order: a stale move's DEL after a newer SET (the new value
        vanishes), or its SET after a delete's DEL (the deleted value comes back).
        """
        earlier = self._last_command.get(key)
        done = asyncio.get_running_loop().create_future()
        self._last_command[key] = done
        try:
            if earlier is not None:
                await asyncio.wait([earlier])
            if unless is not None and unless():
                return None
            try:
                result = await self._command(name, *args)
            except BaseException:
                self._suspect_value(key)
                raise
            self._suspect.pop(key, None)  # the server holds this store's latest word on it
            if landed is not None:
                landed()
            return result
        finally:
            done.set_result(None)
            if self._last_command.get(key) is done:
                del self._last_command[key]

    def _suspect_value(self, key: KeyLike) -> None:
        """A SET or DEL of ``key`` failed or timed out: the server may hold an older value of
        it (a DEL that never ran) or a value this store gave up on (a SET that landed after
        its timeout).  Until a later SET or DEL of it succeeds, ``fetch`` does not serve it."""
        self._suspect[key] = None
        self._suspect.move_to_end(key)
        if len(self._suspect) > MAX_REMEMBERED_KEYS:
            self._suspect.popitem(last=False)
