"""The store's histograms: observations batched into buckets count as Prometheus's do."""

from __future__ import annotations

import math
import random

import pytest

from lmtier.monitoring.histogram import BYTES_BUCKETS, SECONDS_BUCKETS, OperationHistograms


def expected(bounds: tuple[float, ...], values: list[float]) -> list[tuple[float, int]]:
    """Cumulative ``le`` buckets, counted the plain way."""
    return [(bound, sum(v <= bound for v in values)) for bound in (*bounds, math.inf)]


@pytest.mark.parametrize("count", [0, 1, 1023, 1024, 2500])  # around the batch of 1024
def test_buckets_and_sums_match_a_plain_count(count: int) -> None:
    rng = random.Random(count)
    seconds = [rng.choice(SECONDS_BUCKETS) * rng.choice((0.5, 1.0, 2.0)) for _ in range(count)]
    sizes = [rng.choice((0, 4096, 65536, 2**31)) for _ in range(count)]  # 0: a miss, no bytes
    histograms = OperationHistograms()
    for value, size in zip(seconds, sizes, strict=True):
        histograms.observe(value, size)
    (second_buckets, second_sum), (byte_buckets, byte_sum) = histograms.read()
    moved = [float(size) for size in sizes if size]
    assert second_buckets == expected(SECONDS_BUCKETS, seconds)  # a value on a bound is in it
    assert byte_buckets == expected(BYTES_BUCKETS, moved)
    assert second_sum == pytest.approx(sum(seconds)) and byte_sum == sum(moved)
    assert histograms.read() == ((second_buckets, second_sum), (byte_buckets, byte_sum))
