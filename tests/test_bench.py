"""`lmtier bench` produces its table (figures are not asserted: machines are noisy)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lmtier.bench import Row, cpu_put_get, disk_rows, format_rows

from redis_helpers import RedisProcess

MiB = 1024**2


def test_bench_rows_measure_and_format(tmp_path: Path) -> None:
    rows = asyncio.run(cpu_put_get(MiB, 2)) + disk_rows(MiB, 2, tmp_path, fsync=False)
    assert [r.name for r in rows] == [
        "cpu put+get(out=) 1 MiB", "cpu put+get new tensor 1 MiB",
        "disk write 1 MiB", "disk read 1 MiB (checksum)",
    ]  # fmt: skip
    assert all(r.ratio is not None and r.ratio > 0 for r in rows)
    table = format_rows([*rows, Row("restart", "1 entries/s", "", None)])
    assert table.splitlines()[0].startswith("measure") and "GB/s" in table
    assert not list(tmp_path.rglob("*.safetensors")), "benchmark files were left behind"


@pytest.mark.redis
def test_redis_rows_measure_against_redis_py(redis_server: RedisProcess) -> None:
    from lmtier.bench_remote import remote_rows

    rows = asyncio.run(remote_rows(redis_server.url, MiB, 2))
    assert [r.name for r in rows] == [
        "redis put 1 MiB", "redis get(out=) 1 MiB", "redis put_many 16 x 1 MiB",
    ]  # fmt: skip
    assert all(r.ratio is not None and r.ratio > 0 for r in rows)
