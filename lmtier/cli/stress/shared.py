"""Stress on one shared key space: overwrites, deletes and cancelled calls, checked soundly."""

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

__all__ = ["run_shared_stress"]


@dataclass
class _Call:
    """A put (``version``) or delete (``version`` None) of one key, as the model sees it."""

    version: int | None
    start: int
    end: int | None = None  # None while in flight, and for good once cancelled or failed


async def run_shared_stress(
    store: TieredStore, options: StressOptions, report: StressReport | None = None
) -> StressReport:
    """Tasks on one shared key space: overwrites, deletes and cancelled calls, checked soundly.

    For each key the model keeps the calls whose value may be the key's current one: every
    call in flight, cancelled or failed (a put whose caller gave up may still land), and every
    call that returned, unless another call that returned began after it ended.  A read must
    return a value of one of those calls or of a put that began while the read ran; a miss
    must be allowed by a delete among them, a put of the key in flight (the store reports a
    drop only once no put of the key is in flight) or a drop since the oldest of them.
    Between rounds the store goes quiet, every key is read, and the model resettles on what
    was read.  Audits run every ``audit_every`` ops and at each quiet point.  ``report``, when
    given, is the one filled, as with ``run_stress``.
    """
    report = StressReport() if report is None else report
    report.shared = True
    clock = 0
    versions = 0
    dropped_at: dict[KeyLike, int] = {}
    keys = [f"shared/{i}" for i in range(options.keys_per_task)]
    calls: dict[str, list[_Call]] = {key: [_Call(None, 0, 0)] for key in keys}
    started_puts: dict[str, dict[int, tuple[int, int]]] = {key: {} for key in keys}
    audit_messages: set[str] = set()
    store._on_drop = lambda key: dropped_at.__setitem__(key, clock)
    deadline = None if options.duration_s is None else time.perf_counter() + options.duration_s

    def storage_failures() -> int:
        return sum(t.counters.unavailable + t.counters.errors for t in store.tiers)

    def tick() -> int:
        nonlocal clock
        clock += 1
        return clock

    def audit() -> None:
        report.audits += 1
        problems = store.audit()
        if problems:
            report.audit_failures += 1
            for problem in problems:
                if len(audit_messages) < 20 and problem not in audit_messages:
                    audit_messages.add(problem)

    def returned(key: str, call: _Call) -> None:
        """A call that took effect returned: calls that ended before it began are overwritten."""
        call.end = tick()
        calls[key] = [c for c in calls[key] if c.end is None or c.end >= call.start]

    def matches(key: str, got: torch.Tensor, version: int) -> bool:
        tokens = started_puts[key][version][0]
        return same_bytes(got, pattern_tensor(key, version, tokens))

    def check(
        key: str, got: torch.Tensor | None, since: int, allowed: list[_Call], quiet: bool = False
    ) -> bool:
        """Whether a read that began at ``since`` may return ``got``."""
        if got is None:
            if any(c.version is None for c in allowed):
                return True
            if not quiet and any(c.end is None or c.end >= since for c in allowed):
                # A put in flight at any moment of the read explains a miss: an overwrite in a
                # full tier takes the older value out before the new one lands, and the store
                # holds back a drop of a key while a put of it is in flight.
                return True
            oldest = min((c.start for c in allowed), default=0)
            if dropped_at.get(key, -1) >= oldest:
                report.dropped += 1
                return True
            holder = next((t for t in store.tiers if t.lookup(key) is not None), None)
            if holder is not None and not holder.stats().get("available", True):
                report.unavailable_misses += 1  # held by a tier whose server is down
                return True
            where = "no tier" if holder is None else f"tier {holder.name}"
            report.problems.append(
                f"{key}: lost (no delete or drop explains a miss; {where} holds it"
                f"{', quiet' if quiet else ''})"
            )
            return False
        got = got.cpu()
        candidates = {c.version for c in allowed if c.version is not None}
        candidates.update(v for v, (_, start) in started_puts[key].items() if start > since)
        if any(matches(key, got, version) for version in candidates):
            report.verified += 1
            return True
        report.wrong_reads += 1
        if report.wrong_reads <= 20:
            written = [v for v in started_puts[key] if matches(key, got, v)]
            legal = sorted(candidates)
            report.problems.append(
                f"{key}: read a value that no legal call wrote (it is version {written}; "
                f"the legal ones: {legal})"
            )
        return False

    async def call(coro: Any, cancel: bool, rng: random.Random) -> Any:
        """``coro``'s result; raises TimeoutError when this call gives up on it."""
        if not cancel:
            return await coro
        return await asyncio.wait_for(coro, timeout=rng.uniform(0.0, 0.002))

    async def worker(task: int, round_: int, count: int, bar: tqdm[Any]) -> None:
        nonlocal versions
        rng = random.Random((options.seed * 1_000_003 + task) * 101 + round_)
        for _ in range(count):
            if deadline is not None and time.perf_counter() > deadline:
                break
            key = rng.choice(keys)
            roll = rng.random()
            cancel = rng.random() < options.cancel_fraction
            began = time.perf_counter()
            try:
                if roll < options.delete_fraction:
                    record = _Call(None, tick())
                    calls[key].append(record)
                    await call(store.delete(key), cancel, rng)
                    returned(key, record)
                elif roll < options.delete_fraction + options.get_fraction:
                    since = tick()
                    allowed = list(calls[key])
                    failures = storage_failures()
                    got = await call(store.get(key), cancel, rng)
                    failing = storage_failures() != failures
                    report.get_latencies.append(time.perf_counter() - began)
                    allowed += [c for c in calls[key] if c not in allowed]
                    if got is None and cancel:
                        # A get given a timeout that answered a miss rather than TimeoutError:
                        # counted apart (see StressReport), the quiet reads check the key.
                        report.timed_misses += 1
                    elif got is None and failing:
                        report.unavailable_misses += 1  # a tier's storage failed meanwhile
                    else:
                        check(key, got, since, allowed)
                else:
                    versions += 1
                    version = versions
                    tokens = options.draw_tokens(rng)
                    record = _Call(version, tick())
                    started_puts[key][version] = (tokens, record.start)
                    calls[key].append(record)
                    status = await call(
                        store.put(key, pattern_tensor(key, version, tokens)), cancel, rng
                    )
                    report.put_latencies.append(time.perf_counter() - began)
                    if status is PutStatus.LEGAL:
                        returned(key, record)
                    else:
                        report.illegal_puts += 1
                        calls[key].remove(record)
            except TimeoutError:
                report.cancelled += 1
            except LmtierError:
                report.lmtier_errors += 1  # a clean refusal (e.g. storage trouble): counted
            except Exception as exc:
                report.raw_exceptions += 1
                if report.raw_exceptions <= 20:
                    report.problems.append(f"{key}: raw {type(exc).__name__}: {exc}")
            for tier in store.tiers:
                if tier.resident_bytes > tier.budget:
                    report.budget_breaches += 1
                    report.problems.append(
                        f"tier {tier.name}: {tier.resident_bytes} bytes over budget {tier.budget}"
                    )
            report.ops += 1
            if report.ops % options.audit_every == 0:
                audit()
            bar.update()

    async def settle() -> None:
        """Wait for the store to go quiet, read every key, resettle the model on the reads."""
        while store._tasks or store._active:
            if store._tasks:
                await asyncio.gather(*list(store._tasks), return_exceptions=True)
            else:
                await asyncio.sleep(0.001)
        audit()
        for key in keys:
            since = tick()
            got = await store.get(key)
            allowed = list(calls[key])
            now = tick()
            if not check(key, got, since, allowed, quiet=True):
                calls[key] = [_Call(None, now, now)]
                continue
            version = None
            # A read may return a value whose entry is dropped meanwhile (its promotion's room
            # was made by evicting it below): the key is gone from then on.
            if got is not None and dropped_at.get(key, -1) < since:
                cpu = got.cpu()
                candidates = [c.version for c in allowed if c.version is not None]
                version = next(v for v in candidates if matches(key, cpu, v))
            calls[key] = [_Call(version, now, now)]
        audit()

    started = time.perf_counter()
    try:
        with progress_bar(options, options.ops, "stress", "op") as bar:
            for round_, round_ops in enumerate(split_evenly(options.ops, options.rounds)):
                shares = split_evenly(round_ops, options.tasks)
                await asyncio.gather(
                    *(worker(task, round_, shares[task], bar) for task in range(options.tasks))
                )
                await settle()
    finally:
        report.seconds = time.perf_counter() - started
        if report.audit_failures:
            report.problems.append(f"{report.audit_failures} of {report.audits} audits failed:")
            report.problems.extend(f"audit: {m}" for m in sorted(audit_messages))
        report.stats = store.stats()
    return report
