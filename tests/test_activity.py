"""The engine integrations' "is it working?" line, driven by a clock the test sets."""

from __future__ import annotations

import logging

import pytest
import torch

from lmtier.config import StoreConfig, TierConfig
from lmtier.integrations.activity import (
    Activity,
    ActivityReporter,
    activity_line,
    human_bytes,
)
from lmtier.integrations.blocking import BlockingStore
from lmtier.store import TierInfo

LOGGER = "lmtier.integrations.activity"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tier(name: str, resident: int, budget: int) -> TierInfo:
    return TierInfo(
        name=name,
        kind="DiskTier",
        budget=budget,
        resident_bytes=resident,
        shared=False,
        admission="all",
        available=True,
        counters={},
    )


def test_sizes_read_as_people_write_them() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(100 * 2**30) == "100.0 GiB"
    assert human_bytes(5 * 2**40) == "5.0 TiB"


def test_the_line_names_lookups_hits_blocks_and_bytes_per_tier() -> None:
    activity = Activity(lookups=32, hits=16, stored=16, loaded=14, load_failed=2)
    tiers = [tier("disk", 2**20, 256 * 2**20), tier("redis", 0, 2**30)]
    line = activity_line("lmtier vLLM tier 'x'", activity, tiers)
    assert line == (
        "lmtier vLLM tier 'x': 32 lookups, 16 hits (50.0%); 16 blocks stored, "
        "14 loaded (2 failed); disk 1.0 MiB of 256.0 MiB, redis 0 B of 1.0 GiB"
    )
    assert "no hits" in activity_line("l", Activity(), tiers)


def test_one_line_per_interval_and_only_after_activity(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    activity = Activity()
    reporter = ActivityReporter("lmtier test", lambda: activity, 60.0, clock)
    tiers = [tier("disk", 4096, 2**20)]
    caplog.set_level(logging.INFO, LOGGER)

    activity.lookups, activity.hits, activity.loaded = 4, 2, 2
    clock.now += 59.9
    assert reporter.tick(tiers) is None  # the interval has not ended
    assert reporter.seconds_left() == pytest.approx(0.1)
    clock.now += 0.1
    line = reporter.tick(tiers)
    assert line is not None and "4 lookups, 2 hits (50.0%)" in line and "2 loaded" in line
    assert [r.getMessage() for r in caplog.records] == [line]
    assert caplog.records[0].levelno == logging.INFO

    clock.now += 1
    activity.stored = 3
    assert reporter.tick(tiers) is None  # at most one line per interval
    clock.now += 60
    second = reporter.tick(tiers)
    assert second is not None and "3 blocks stored" in second
    clock.now += 600
    assert reporter.tick(tiers) is None  # nothing happened: an idle engine stays quiet
    assert len(caplog.records) == 2


def test_an_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        ActivityReporter("x", Activity, 0)


def test_closing_the_store_writes_the_last_line(caplog: pytest.LogCaptureFixture) -> None:
    config = StoreConfig(tiers=(TierConfig("cpu", "memory", 2**20),))
    activity = Activity()
    reporter = ActivityReporter("lmtier test", lambda: activity, 3600.0)
    caplog.set_level(logging.INFO, LOGGER)
    with BlockingStore(config) as store:
        reporter.start(store)
        store.put("k", torch.zeros(256, dtype=torch.uint8))
        activity.stored = 1
    # The close cancelled the reporter (it would otherwise wait an hour) with the store open.
    (record,) = caplog.records
    assert "1 blocks stored" in record.getMessage()
    assert "cpu 256 B of 1.0 MiB" in record.getMessage()
    assert store.closed
