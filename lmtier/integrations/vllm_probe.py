"""Background probes of shared storage for keys the vLLM secondary tier has not indexed.

Kept apart from the tier (``lmtier.integrations.vllm``) because it is a small state machine of
its own: a key another instance may have written (on a shared redis tier, or to the lmtier
server both use) is looked up once in the background while the scheduler's lookups answer
RETRY; the answer is kept while a request waits on it and forgotten when none does, so a later
request probes afresh.  Who looks is the caller's: ``answer`` starts a look, ``settle`` ends it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from lmtier.integrations.vllm_keys import KeyIndex
from lmtier.integrations.vllm_metrics import Counters
from lmtier.store import TieredStore

__all__ = ["SharedProbes"]

# The integration's logger: its lines keep the name users filter on.
log = logging.getLogger("lmtier.integrations.vllm")

#: Starts looking for a key; whoever looks calls ``SharedProbes.settle`` with the answer.
Start = Callable[[str], object]


@dataclass
class _Probe:
    """A background look for a key on the shared tier, and the requests waiting on it."""

    found: bool | None = None  # None while in flight
    requests: set[str] = field(default_factory=set)


class SharedProbes:
    """The probes in flight or answered, by key, and the keys each request waits on."""

    def __init__(self, index: KeyIndex, counters: Counters) -> None:
        self._index = index
        self._counters = counters
        self._probes: dict[str, _Probe] = {}
        self._request_probes: dict[str, set[str]] = {}
        self._in_flight = 0
        self._lock = threading.Lock()  # the count is changed from both threads

    @property
    def in_flight(self) -> int:
        """Probes submitted whose answer has not come yet."""
        return self._in_flight

    def answer(self, text: str, req_id: str, start: Start) -> bool | None:
        """Whether shared storage holds ``text`` (None while the probe, started here with
        ``start`` if need be, is in flight); the request waits on the answer until it ends."""
        probe = self._probes.get(text)
        if probe is None:
            probe = self._probes[text] = _Probe()
            with self._lock:
                self._in_flight += 1
            start(text)
        if req_id not in probe.requests:
            probe.requests.add(req_id)
            self._request_probes.setdefault(req_id, set()).add(text)
        return probe.found

    def request_finished(self, req_id: str) -> None:
        """Forget the answers no request waits for any more."""
        for text in self._request_probes.pop(req_id, ()):
            probe = self._probes.get(text)
            if probe is None:
                continue
            probe.requests.discard(req_id)
            if not probe.requests:
                # An answer no request waits for is forgotten: the next request probes afresh.
                del self._probes[text]

    def settle(self, text: str, found: bool) -> None:
        """A probe of ``text`` ended (on any thread): a key found is indexed, and answers the
        requests waiting on it (a probe forgotten meanwhile answers the next one's)."""
        if found:
            self._index.add_all([text])
            self._counters.shared_hits += 1
        probe = self._probes.get(text)
        if probe is not None:
            probe.found = found
        with self._lock:
            self._in_flight -= 1

    async def probe_store(self, store: TieredStore, text: str) -> None:
        """Look for ``text`` in ``store`` (on its thread): a get that finds it on a shared
        tier indexes it there."""
        try:
            found = await store.get(text) is not None
        except Exception:
            log.warning("lmtier shared-tier probe of %s failed", text, exc_info=True)
            found = False
        self.settle(text, found)
