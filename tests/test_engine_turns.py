"""The turns two engine processes of ``lmtier bench --engine`` take (``engine_run.Turns``):
the first runs its first request without waiting, each waits for the other's byte, and a
partner that died ends the wait with an error instead of a hang."""

from __future__ import annotations

import os
import threading

import pytest

from lmtier.cli.bench.engine_run import Turns


def pipes() -> tuple[Turns, Turns, list[int]]:
    to_second, to_first = os.pipe(), os.pipe()
    first = Turns(to_first[0], to_second[1], first=True)
    second = Turns(to_second[0], to_first[1], first=False)
    return first, second, [*to_second, *to_first]


def test_two_processes_alternate_and_the_first_starts_at_once() -> None:
    first, second, fds = pipes()
    order: list[str] = []
    try:

        def run(turns: Turns, name: str, requests: int) -> None:
            for number in range(requests):
                turns.wait()
                order.append(f"{name}{number}")
                turns.signal()

        threads = [threading.Thread(target=run, args=(second, "b", 3)),
                   threading.Thread(target=run, args=(first, "a", 3))]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert order == ["a0", "b0", "a1", "b1", "a2", "b2"]
    finally:
        for fd in fds:
            os.close(fd)


def test_a_partner_that_died_ends_the_wait_and_its_signal_is_dropped() -> None:
    first, _, fds = pipes()
    to_second_read, to_second_write, to_first_read, to_first_write = fds
    first.wait()  # its first turn: no wait
    os.close(to_first_write)  # the second process is gone: its end of the pipe closed
    with pytest.raises(RuntimeError, match="ended before its turn"):
        first.wait()
    os.close(to_second_read)  # nobody reads the first's signals any more
    first.signal()  # dropped, not BrokenPipeError
    for fd in (to_second_write, to_first_read):
        os.close(fd)
