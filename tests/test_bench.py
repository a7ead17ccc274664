"""`lmtier bench` produces its table (figures are not asserted: machines are noisy)."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from lmtier.cli import main
from lmtier.cli.bench import Row, format_rows
from lmtier.cli.bench.core import Goal, Scale, Side
from lmtier.cli.bench.cpu import cpu_put_get
from lmtier.cli.bench.disk import disk_rows

from redis_helpers import RedisProcess

MiB = 1024**2
RATIO = r"\d+\.\d\d"
SPREAD = r"[\d.,]+-[\d.,]+"


def test_bench_rows_measure_and_format(tmp_path: Path) -> None:
    rows = asyncio.run(cpu_put_get(MiB, 2)) + disk_rows(MiB, 2, tmp_path, fsync=False)
    assert [r.name for r in rows] == [
        "cpu put+get(out=) 1 MiB", "cpu put+get new tensor 1 MiB",
        "disk write 1 MiB (private path)", "disk read 1 MiB (checksum, private path)",
    ]  # fmt: skip
    assert all(r.ratio is not None and r.ratio > 0 for r in rows)
    assert all(r.lmtier is not None and len(r.lmtier.seconds) == 2 for r in rows)
    table = format_rows(rows)
    assert table.splitlines()[0].split() == [
        "measure", "lmtier", "spread", "baseline", "(same", "run)", "spread", "ratio", "goal",
        "result",
    ]  # fmt: skip
    assert "GB/s" in table
    assert not list(tmp_path.rglob("*.safetensors")), "benchmark files were left behind"


def test_goals_judge_the_ratio_or_lmtiers_figure() -> None:
    gbs = Scale.throughput(MiB)
    fast, slow = Side((0.001, 0.002, 0.003), gbs), Side((0.002, 0.004, 0.006), gbs)
    assert Row("r", fast, slow, Goal.ratio(0.8)).verdict() == "PASS"  # ratio 2.0
    assert Row("r", slow, fast, Goal.ratio(0.8)).verdict() == "FAIL"  # ratio 0.5
    assert Row("r", slow, fast, Goal.ratio(0.8)).verdict(ratio=0.9) == "PASS"
    per_get = Scale.latency(100)  # 1 ms for 100 gets: 10 us each
    assert Row("r", Side((0.001,), per_get), goal=Goal.figure_at_most(15, "")).verdict() == "PASS"
    assert Row("r", Side((0.002,), per_get), goal=Goal.figure_at_most(15, "")).verdict() == "FAIL"
    assert Row("r", None, None, Goal.ratio(1.0), "not installed").verdict() == ""
    assert Row("r", fast, slow).verdict() == ""
    assert fast.spread() == "0.35-1.05" and fast.text() == "0.52 GB/s"
    assert slow.middle_spread == pytest.approx(0.5)  # quartiles 0.003 and 0.005, median 0.004


def _bench(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main(["bench", "--quick", "--no-progress", *args]) == 0
    return capsys.readouterr().out.splitlines()


def _table(lines: list[str]) -> tuple[str, list[str]]:
    head = next(i for i, line in enumerate(lines) if line.startswith("measure"))
    body = [line for line in lines[head + 1 :] if not line.startswith("warning:")]
    return lines[head], body


def test_quick_runs_end_to_end_with_spread_and_verdicts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    head, body = _table(_bench(capsys, "--folder", str(tmp_path)))
    assert head.split()[-3:] == ["ratio", "goal", "result"] and head.count("spread") == 2
    names = [re.split(r"\s{2,}", line)[0] for line in body]
    assert names[0] == "cpu put+get(out=) 2 MiB" and "restart: index 2,000 entries" in names
    for line in body:
        if re.search(r"\d GB/s", line):  # a side with repetitions: its min-max beside it
            assert re.search(rf"GB/s[^\n]*?\s{{2}}{SPREAD}\s", line), line
    judged = [line for line in body if line.endswith(("PASS", "FAIL"))]
    assert len(judged) >= 8, body  # every row with a goal and a figure is judged
    assert not list(tmp_path.iterdir()), "benchmark files were left behind"


def test_repeat_reports_each_rows_ratio_range(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    head, body = _table(_bench(capsys, "--repeat", "2", "--folder", str(tmp_path)))
    assert "ratio (median of 2)" in head and "ratio range" in head
    with_ratio = [line for line in body if not line.startswith("restart")]
    assert with_ratio
    for line in with_ratio:  # the median of the two runs, then their min-max
        assert re.search(rf"\s{RATIO}\s+{RATIO}-{RATIO}(\s|$)", line), line


def test_high_load_is_a_warning(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import lmtier.cli.bench.table

    row = Row("one", Side((1.0, 1.1), Scale.throughput(MiB)), Side((1.0,), Scale.throughput(MiB)))
    monkeypatch.setattr(lmtier.cli.bench.table, "run_table", lambda options, on_row: [row])
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 0.5, 0.0, 0.0))
    lines = _bench(capsys, "--folder", str(tmp_path))
    warning = [line for line in lines if line.startswith("warning: load average")]
    assert len(warning) == 1 and f"above the {cores} cores" in warning[0]
    assert "at the start" in warning[0] and "at the end" in warning[0]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert not any("load average" in line for line in _bench(capsys, "--folder", str(tmp_path)))


def test_wide_spread_is_a_warning() -> None:
    from lmtier.cli.bench.machine import spread_warning

    gbs = Scale.throughput(MiB)
    # One slow sample in nine (the median ignores it) is no warning; a wide middle half is.
    steady = Row("steady", Side((1.0,) * 8 + (5.0,), gbs), Side((1.0, 1.1, 1.2), gbs))
    noisy = Row("noisy", Side((1.0, 1.1, 1.2), gbs), Side((1.0, 1.0, 3.0, 3.0), gbs))
    assert spread_warning([steady]) is None
    warning = spread_warning([steady, noisy])
    assert warning is not None and "in 1 of 2 rows" in warning and "noisy" in warning
    assert "steady" not in warning


def test_tmpfs_folder_is_a_warning(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import lmtier.cli.bench.machine
    import lmtier.cli.bench.table

    monkeypatch.setattr(lmtier.cli.bench.table, "run_table", lambda options, on_row: [])
    monkeypatch.setattr(lmtier.cli.bench.machine, "filesystem_type", lambda path: "tmpfs")
    lines = _bench(capsys, "--folder", str(tmp_path))
    warnings = [line for line in lines if "is on tmpfs" in line]
    assert len(warnings) == 2 and str(tmp_path) in warnings[0]  # before the table and after
    monkeypatch.setattr(lmtier.cli.bench.machine, "filesystem_type", lambda path: "ext4")
    assert not any("tmpfs" in line for line in _bench(capsys, "--folder", str(tmp_path)))


def test_filesystem_type_reads_the_deepest_mount(tmp_path: Path) -> None:
    from lmtier.cli.bench.machine import filesystem_type

    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n/dev/vdb /tmp/disk xfs rw 0 0\n"
    )
    assert filesystem_type(Path("/tmp/x/y"), mounts) == "tmpfs"
    assert filesystem_type(Path("/tmp/disk/x"), mounts) == "xfs"
    assert filesystem_type(Path("/var/tmp"), mounts) == "ext4"
    assert filesystem_type(Path("/var/tmp"), tmp_path / "missing") is None


@pytest.mark.redis
def test_redis_rows_measure_against_redis_py(redis_server: RedisProcess) -> None:
    from lmtier.cli.bench.redis import remote_rows

    rows = asyncio.run(remote_rows(redis_server.url, MiB, 2))
    assert [r.name for r in rows] == [
        "redis put 1 MiB", "redis get(out=) 1 MiB", "redis put_many 16 x 1 MiB",
    ]  # fmt: skip
    assert all(r.ratio is not None and r.ratio > 0 for r in rows)
