"""Stress on one shared key space: overwrites, deletes and cancelled calls, checked soundly.

For each key the model keeps the calls whose value may be the key's current one: every call in
flight, cancelled or failed (a put whose caller gave up may still land), and every call that
returned, unless another call that returned began after it ended.  A read must return a value
of one of those calls or of a put that began while the read ran; a miss must be allowed by a
delete among them, a put of the key in flight (the store reports a drop only once no put of the
key is in flight) or a drop since the oldest of them.  Between rounds the store goes quiet,
every key is read, and the model resettles on what was read.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from lmtier.cli.stress.run import (
    StressOptions,
    StressReport,
    pattern_tensor,
    progress_bar,
    same_bytes,
    split_evenly,
)
from lmtier.errors import LmtierError
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike
from lmtier.store import TieredStore

__all__ = ["KeyModel", "SharedStress", "run_shared_stress"]

# Distinct audit messages kept for the report, and wrong reads or raw exceptions described.
MAX_LISTED = 20


async def run_shared_stress(
    store: TieredStore, options: StressOptions, report: StressReport | None = None
) -> StressReport:
    """Tasks on one shared key space, checked against the model (see the module's docstring).

    Audits run every ``audit_every`` ops and at each quiet point.  ``report``, when given, is
    the one filled, as with ``run_stress``.
    """
    return await SharedStress(store, options, report).run()


@dataclass
class _Call:
    """A put (``version``) or delete (``version`` None) of one key, as the model sees it."""

    version: int | None
    start: int
    end: int | None = None  # None while in flight, and for good once cancelled or failed


class KeyModel:
    """Which values each key may hold, from the calls made on it, on a logical clock."""

    def __init__(self, keys: list[str]) -> None:
        self.clock = 0
        self.versions = 0  # the last put's version: each put writes a value of its own
        self.dropped_at: dict[KeyLike, int] = {}  # when the store last dropped each key
        # Per key: the calls whose value may be its current one (the module's docstring).
        self.calls: dict[str, list[_Call]] = {key: [_Call(None, 0, 0)] for key in keys}
        # Per key and version: the put's tokens and when it began.
        self.started_puts: dict[str, dict[int, tuple[int, int]]] = {key: {} for key in keys}

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def on_drop(self, key: KeyLike) -> None:
        self.dropped_at[key] = self.clock

    def dropped_since(self, key: str, when: int) -> bool:
        return self.dropped_at.get(key, -1) >= when

    def begin_delete(self, key: str) -> _Call:
        record = _Call(None, self.tick())
        self.calls[key].append(record)
        return record

    def next_version(self) -> int:
        self.versions += 1
        return self.versions

    def begin_put(self, key: str, version: int, tokens: int) -> _Call:
        record = _Call(version, self.tick())
        self.started_puts[key][version] = (tokens, record.start)
        self.calls[key].append(record)
        return record

    def returned(self, key: str, call: _Call) -> None:
        """A call that took effect returned: calls that ended before it began are overwritten."""
        call.end = self.tick()
        self.calls[key] = [c for c in self.calls[key] if c.end is None or c.end >= call.start]

    def refused(self, key: str, call: _Call) -> None:
        """A put that returned without taking effect: it never wrote the key."""
        self.calls[key].remove(call)

    def resettle(self, key: str, version: int | None, now: int) -> None:
        """After a quiet read: the key holds ``version`` (None: nothing) and nothing else."""
        self.calls[key] = [_Call(version, now, now)]

    def matches(self, key: str, got: torch.Tensor, version: int) -> bool:
        tokens = self.started_puts[key][version][0]
        return same_bytes(got, pattern_tensor(key, version, tokens))


class SharedStress:
    """One shared-keys run: its tasks, its quiet points and its audits, checked by a model."""

    def __init__(
        self, store: TieredStore, options: StressOptions, report: StressReport | None = None
    ) -> None:
        self.store = store
        self.options = options
        self.report = StressReport() if report is None else report
        self.report.shared = True
        self.keys = [f"shared/{i}" for i in range(options.keys_per_task)]
        self.model = KeyModel(self.keys)
        self.audit_messages: set[str] = set()
        self.deadline = (
            None if options.duration_s is None else time.perf_counter() + options.duration_s
        )
        store.on_drop = self.model.on_drop

    async def run(self) -> StressReport:
        options, report = self.options, self.report
        started = time.perf_counter()
        try:
            with progress_bar(options, options.ops, "stress", "op") as bar:
                for round_, round_ops in enumerate(split_evenly(options.ops, options.rounds)):
                    shares = split_evenly(round_ops, options.tasks)
                    tasks = range(options.tasks)
                    await asyncio.gather(*(self.worker(t, round_, shares[t], bar) for t in tasks))
                    await self.settle()
        finally:
            report.seconds = time.perf_counter() - started
            if report.audit_failures:
                report.problems.append(f"{report.audit_failures} of {report.audits} audits failed:")
                report.problems.extend(f"audit: {m}" for m in sorted(self.audit_messages))
            report.stats = self.store.stats()
        return report

    def storage_failures(self) -> int:
        store = self.store
        return sum(t.counters["unavailable"] + t.counters["errors"] for t in store.tier_infos())

    def audit(self) -> None:
        self.report.audits += 1
        problems = self.store.audit()
        if problems:
            self.report.audit_failures += 1
            for problem in problems:
                if len(self.audit_messages) < MAX_LISTED and problem not in self.audit_messages:
                    self.audit_messages.add(problem)

    def check(
        self,
        key: str,
        got: torch.Tensor | None,
        since: int,
        allowed: list[_Call],
        quiet: bool = False,
    ) -> bool:
        """Whether a read that began at ``since`` may return ``got``."""
        store, report, model = self.store, self.report, self.model
        if got is None:
            if any(c.version is None for c in allowed):
                return True
            if not quiet and any(c.end is None or c.end >= since for c in allowed):
                # A put in flight at any moment of the read explains a miss: an overwrite in a
                # full tier takes the older value out before the new one lands, and the store
                # holds back a drop of a key while a put of it is in flight.
                return True
            oldest = min((c.start for c in allowed), default=0)
            if model.dropped_since(key, oldest):
                report.dropped += 1
                return True
            holder = store.holder(key)
            if holder in {t.name for t in store.tier_infos() if not t.available}:
                report.unavailable_misses += 1  # held by a tier whose server is down
                return True
            where = "no tier" if holder is None else f"tier {holder}"
            report.problems.append(
                f"{key}: lost (no delete or drop explains a miss; {where} holds it"
                f"{', quiet' if quiet else ''})"
            )
            return False
        got = got.cpu()
        started_puts = model.started_puts[key]
        candidates = {c.version for c in allowed if c.version is not None}
        candidates.update(v for v, (_, start) in started_puts.items() if start > since)
        if any(model.matches(key, got, version) for version in candidates):
            report.verified += 1
            return True
        report.wrong_reads += 1
        if report.wrong_reads <= MAX_LISTED:
            written = [v for v in started_puts if model.matches(key, got, v)]
            legal = sorted(candidates)
            report.problems.append(
                f"{key}: read a value that no legal call wrote (it is version {written}; "
                f"the legal ones: {legal})"
            )
        return False

    async def worker(self, task: int, round_: int, count: int, bar: tqdm[Any]) -> None:
        store, options, report = self.store, self.options, self.report
        rng = random.Random((options.seed * 1_000_003 + task) * 101 + round_)
        for _ in range(count):
            if self.deadline is not None and time.perf_counter() > self.deadline:
                break
            key = rng.choice(self.keys)
            roll = rng.random()
            cancel = rng.random() < options.cancel_fraction
            try:
                await self.one_call(key, roll, cancel, rng)
            except TimeoutError:
                report.cancelled += 1
            except LmtierError:
                report.lmtier_errors += 1  # a clean refusal (e.g. storage trouble): counted
            except Exception as exc:
                report.raw_exceptions += 1
                if report.raw_exceptions <= MAX_LISTED:
                    report.problems.append(f"{key}: raw {type(exc).__name__}: {exc}")
            for tier in store.tier_infos():
                if tier.resident_bytes > tier.budget:
                    report.budget_breaches += 1
                    report.problems.append(
                        f"tier {tier.name}: {tier.resident_bytes} bytes over budget {tier.budget}"
                    )
            report.ops += 1
            if report.ops % options.audit_every == 0:
                self.audit()
            bar.update()

    async def one_call(self, key: str, roll: float, cancel: bool, rng: random.Random) -> None:
        """A delete, get or put of ``key`` as ``roll`` picks, given up on when ``cancel``."""
        store, options, report, model = self.store, self.options, self.report, self.model
        began = time.perf_counter()
        if roll < options.delete_fraction:
            record = model.begin_delete(key)
            await _call(store.delete(key), cancel, rng)
            model.returned(key, record)
        elif roll < options.delete_fraction + options.get_fraction:
            since = model.tick()
            allowed = list(model.calls[key])
            failures = self.storage_failures()
            got = await _call(store.get(key), cancel, rng)
            failing = self.storage_failures() != failures
            report.get_latencies.append(time.perf_counter() - began)
            allowed += [c for c in model.calls[key] if c not in allowed]
            if got is None and cancel:
                # A get given a timeout that answered a miss rather than TimeoutError: counted
                # apart (see StressReport), the quiet reads check the key.
                report.timed_misses += 1
            elif got is None and failing:
                report.unavailable_misses += 1  # a tier's storage failed meanwhile
            else:
                self.check(key, got, since, allowed)
        else:
            version = model.next_version()
            tokens = options.draw_tokens(rng)
            record = model.begin_put(key, version, tokens)
            status = await _call(store.put(key, pattern_tensor(key, version, tokens)), cancel, rng)
            report.put_latencies.append(time.perf_counter() - began)
            if status is PutStatus.LEGAL:
                model.returned(key, record)
            else:
                report.illegal_puts += 1
                model.refused(key, record)

    async def settle(self) -> None:
        """Wait for the store to go quiet, read every key, resettle the model on the reads."""
        store, model = self.store, self.model
        await store.settle()
        self.audit()
        for key in self.keys:
            since = model.tick()
            got = await store.get(key)
            allowed = list(model.calls[key])
            now = model.tick()
            if not self.check(key, got, since, allowed, quiet=True):
                model.resettle(key, None, now)
                continue
            version = None
            # A read may return a value whose entry is dropped meanwhile (its promotion's room
            # was made by evicting it below): the key is gone from then on.
            if got is not None and not model.dropped_since(key, since):
                cpu = got.cpu()
                candidates = [c.version for c in allowed if c.version is not None]
                version = next(v for v in candidates if model.matches(key, cpu, v))
            model.resettle(key, version, now)
        self.audit()


async def _call(coro: Any, cancel: bool, rng: random.Random) -> Any:
    """``coro``'s result; raises TimeoutError when the caller gives up on it (``cancel``)."""
    if not cancel:
        return await coro
    return await asyncio.wait_for(coro, timeout=rng.uniform(0.0, 0.002))
