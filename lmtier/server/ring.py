"""The completion ring: a small shared-memory page where the server records each reply it sent.

Layout (native-endian 64-bit words): word 0 counts the replies recorded; words 1..N hold the
ids of the last N, the k-th (from 0) in word ``1 + k % N``.  The server writes a reply's id,
then the count, and only after the reply's frame is in the socket, which it sends only after
the job's bytes are in the client's region.  So the count never runs ahead of the bytes: a
client whose count has not moved knows, with one memory read and no system call, that no
reply waits; once it has moved, the replies are on the socket and the client reads them there.
The ring is a doorbell, never the answer: what a job found is in its reply frame.  A server
killed mid-job never counts that job, and the client learns of its end from the socket.
"""

from __future__ import annotations

from lmtier.errors import InvalidValueError

__all__ = ["RING_BYTES", "CompletionRing"]

RING_BYTES = 4096
_WORD = 8


class CompletionRing:
    """A view of a ring in ``memory`` (a writable buffer of a multiple of 8 bytes, ≥ 16)."""

    def __init__(self, memory: memoryview) -> None:
        if memory.nbytes < 2 * _WORD or memory.nbytes % _WORD:
            raise InvalidValueError(
                f"a completion ring needs a multiple of {_WORD} bytes, at least {2 * _WORD}; "
                f"the region has {memory.nbytes}"
            )
        self._words = memory.cast("B").cast("Q")
        self.slots = len(self._words) - 1

    @property
    def count(self) -> int:
        """Replies recorded so far."""
        return int(self._words[0])

    def record(self, reply_id: int) -> None:
        """Count one more reply, ``reply_id`` (after its frame went out)."""
        count = self._words[0]
        self._words[1 + count % self.slots] = reply_id & 0xFFFF_FFFF_FFFF_FFFF
        self._words[0] = count + 1

    def recent(self, since: int) -> list[int]:
        """The ids recorded after the first ``since`` replies (the last ``slots`` at most)."""
        count = self.count
        start = max(since, count - self.slots)
        return [int(self._words[1 + k % self.slots]) for k in range(start, count)]
