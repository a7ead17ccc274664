"""Background probes of the shared tier for keys the vLLM secondary tier has not indexed.

Kept apart from the tier (``lmtier.integrations.vllm``) because it is a small state machine of
its own: a key another instance may have written on a shared (redis) tier is looked up once in
the background while the scheduler's lookups answer RETRY; the answer is kept while a request
waits on it and forgotten when none does, so a later request probes afresh.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from lmtier.integrations.vllm_keys import KeyIndex
from lmtier.integrations.vllm_metrics import Counters
from lmtier.store import TieredStore

__all__ = ["SharedProbes"]

# The integration's logger: its lines keep the name users filter on.
log = logging.getLogger("lmtier.integrations.vllm")

#: Runs a coroutine function on the store's thread (``BlockingStore.submit``).
Submit = Callable[[Callable[[TieredStore], Coroutine[Any, Any, None]]], object]


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

    def answer(self, text: str, req_id: str, submit: Submit) -> bool | None:
        """Whether the shared tier holds ``text`` (None while the probe, started here if need
        be, is in flight); the request waits on the answer until it finishes."""
        probe = self._probes.get(text)
        if probe is None:
            probe = self._probes[text] = _Probe()
            with self._lock:
                self._in_flight += 1
            submit(lambda store: self._probe(store, text, probe))
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

    async def _probe(self, store: TieredStore, text: str, probe: _Probe) -> None:
        try:
            found = await store.get(text) is not None
        except Exception:
            log.warning("lmtier shared-tier probe of %s failed", text, exc_info=True)
            found = False
        if found:
            self._index.add_all([text])
            self._counters.shared_hits += 1
        probe.found = found
        with self._lock:
            self._in_flight -= 1
