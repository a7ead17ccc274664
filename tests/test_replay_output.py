"""What a replay prints: one unit per table and CSV column, and progress bars that say which
capacity and policy they replay, shown only where the progress rule allows."""

from __future__ import annotations

import csv
import errno
import os
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

from lmtier.cli import main
from lmtier.cli.replay.report import CSV_COLUMNS, byte_unit, format_table, write_csv
from lmtier.cli.replay.sweep import ReplayOptions, SweepResult, progress_label, run_sweep
from lmtier.cli.replay.traces import Trace, read_trace

ROOT = Path(__file__).parents[1]
TRACE = ROOT / "tests" / "data" / "conversation_trace.jsonl"
GiB, MiB = 1024**3, 1024**2
NUMBER = re.compile(r"^-?[0-9][0-9,]*(\.[0-9]+)?$")


@cache
def head(requests: int = 300) -> Trace:
    return read_trace(TRACE, limit=requests)


def sweep(bytes_per_token: int, shares: tuple[float, ...] = (1.0, 3.0)) -> SweepResult:
    options = ReplayOptions(
        capacities=(0.05, 0.2), policies=("lru", "fifo"), shares=shares,
        bytes_per_token=bytes_per_token, admission=("second_hit",),
    )  # fmt: skip
    return run_sweep(head(), options)


def parse_table(text: str) -> list[dict[str, str]]:
    """The table's rows by header; columns are apart by two spaces or more, names by one."""
    header, *rows = (re.split(r"\s{2,}", line.strip()) for line in text.splitlines())
    assert all(len(row) == len(header) for row in rows), text
    return [dict(zip(header, row, strict=True)) for row in rows]


# ---------------------------------------------------------------------- the table
def test_every_column_has_its_unit_in_the_header_and_plain_numbers_in_its_cells() -> None:
    result = sweep(128 * 1024)
    rows = parse_table(format_table(result.results, result.optimum))
    assert list(rows[0]) == [
        "policy", "capacity %", "block hit", "prefix hit", "OPT", "ceiling", "cpu hit",
        "disk hit", "misses", "demotions", "drops", "cpu read GiB", "disk read GiB",
        "cpu written GiB", "disk written GiB", "admission rejects",
    ]  # fmt: skip
    for row in rows:
        for name, cell in list(row.items())[1:]:
            assert NUMBER.match(cell), (name, cell)  # no "%", "=", unit or tier name in a cell
    assert [(r["policy"], r["capacity %"]) for r in rows] == [
        ("lru+disk=second_hit", "5"), ("fifo+disk=second_hit", "5"),
        ("lru+disk=second_hit", "20"), ("fifo+disk=second_hit", "20"),
    ]  # fmt: skip


def test_cells_hold_the_results_in_the_header_units() -> None:
    result = sweep(128 * 1024)
    rows = parse_table(format_table(result.results, result.optimum))
    for row, r in zip(rows, result.results, strict=True):
        assert float(row["block hit"]) == round(r.block_hit_ratio, 4)
        assert float(row["ceiling"]) == round(result.optimum[r.fraction][1], 4)
        for tier, hits in zip(r.tier_names, r.block_hits, strict=True):
            assert float(row[f"{tier} hit"]) == round(hits / r.references, 4)
            read = float(row[f"{tier} read GiB"].replace(",", ""))
            assert read == round(hits * r.block_bytes / GiB, 1)
            written = float(row[f"{tier} written GiB"].replace(",", ""))
            assert written == round(r.counters[tier]["bytes_in"] / GiB, 1)
        assert int(row["misses"].replace(",", "")) == r.references - sum(r.block_hits)
        rejects = sum(c["admission_rejects"] for c in r.counters.values())
        assert int(row["admission rejects"].replace(",", "")) == rejects > 0


@pytest.mark.parametrize(
    ("largest", "unit"),
    [(0, "B"), (99, "B"), (100 * 1024 - 1, "B"), (100 * 1024, "KiB"), (100 * MiB, "MiB"),
     (99 * GiB, "MiB"), (100 * GiB, "GiB"), (16 * 1024 * GiB, "GiB"),
     (100 * 1024 * GiB, "TiB"), (10**18, "TiB")],
)  # fmt: skip
def test_the_byte_unit_shows_the_largest_value_in_three_to_six_digits(
    largest: int, unit: str
) -> None:
    assert byte_unit(largest)[0] == unit


def test_small_blocks_are_shown_in_a_smaller_unit_for_every_byte_column() -> None:
    result = sweep(32)  # 16 KiB blocks: hundreds of MiB in all
    header = format_table(result.results, result.optimum).splitlines()[0]
    assert re.findall(r"\b(?:cpu|disk) (?:read|written) (\w+)", header) == ["MiB"] * 4


def test_one_tier_has_no_per_tier_hit_column() -> None:
    result = sweep(128 * 1024, shares=(1.0,))
    rows = parse_table(format_table(result.results, result.optimum))
    assert "cpu hit" not in rows[0] and [c for c in rows[0] if c.startswith("cpu ")] == [
        "cpu read MiB",
        "cpu written MiB",  # 23 GiB at most: under 100 GiB
    ]


def test_the_csv_names_its_units_and_holds_plain_numbers(tmp_path: Path) -> None:
    result = sweep(128 * 1024)
    path = tmp_path / "r.csv"
    write_csv(path, result.results, result.optimum)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == CSV_COLUMNS and "ceiling_block_hit_ratio" in CSV_COLUMNS
    assert len(rows) == 4 * 3  # per replay: cpu, disk and "*"
    for row in rows:
        for name in CSV_COLUMNS[2:]:
            if name != "tier":
                float(row[name])  # every cell of a measured column parses as a number
    total = next(r for r in rows if r["tier"] == "*")
    first = result.results[0]
    assert float(total["capacity_fraction"]) == 0.05
    assert int(total["capacity_bytes"]) == sum(first.capacities)
    assert int(total["bytes_read"]) == sum(first.block_hits) * first.block_bytes


def test_the_example_in_the_docs_is_what_the_command_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    block = re.search(r"```text\n  \$ (lmtier replay .*?)\n(.*?)\n  ```", text, re.DOTALL)
    assert block is not None
    command, shown = block.groups()
    monkeypatch.chdir(ROOT)  # the doc shows the trace's path from the repository root
    assert main([*shlex.split(command)[1:], "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [line.removeprefix("  ") for line in shown.splitlines()]


# ---------------------------------------------------------------------- progress
def test_a_progress_label_says_which_capacity_and_policy() -> None:
    assert progress_label((2, 5), 0.1, (1, 1), "lru") == "capacity 2/5 (10%), lru"
    assert progress_label((1, 4), 0.005, (3, 3), "arc") == "capacity 1/4 (0.5%), policy 3/3 arc"
    assert progress_label((4, 4), 0.07, (1, 2), "lru") == "capacity 4/4 (7%), policy 1/2 lru"


REPLAY = ["replay", str(TRACE), "--limit", "40", "--capacities", "0.05,0.2",
          "--policies", "lru,fifo"]  # fmt: skip
TITLES = ["capacity 1/2 (5%), policy 1/2 lru", "capacity 1/2 (5%), policy 2/2 fifo",
          "capacity 2/2 (20%), policy 1/2 lru", "capacity 2/2 (20%), policy 2/2 fifo"]  # fmt: skip


@pytest.mark.parametrize("real", [False, True])
def test_bars_on_a_terminal_name_capacity_and_policy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, real: bool
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(REPLAY + (["--real"] if real else [])) == 0
    err = capsys.readouterr().err
    shown = [title for title in TITLES if f"{title}: 100%" in err]
    assert shown == TITLES
    assert err.index(TITLES[1]) < err.index(TITLES[2])  # in the order replayed


@pytest.mark.parametrize(("tty", "flag"), [(False, []), (True, ["--no-progress"])])
def test_no_bar_off_a_terminal_or_with_no_progress(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tty: bool, flag: list[str]
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert main(REPLAY + flag) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert len(captured.out.splitlines()) == 2 + 4  # the header line, the table's header, rows


# ---------------------------------------------------------------------- output paths
@pytest.mark.parametrize("option", ["--csv", "--plot"])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    absent = tmp_path / "absent"
    for path, says in ((absent / "r.out", f"the folder {absent} does not exist"),
                       (tmp_path, "it is a folder")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main([*REPLAY, option, str(path), "--no-progress"])
        assert exit_.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing replayed
        assert f"argument {option}: cannot write {path}: {says}" in captured.err


def test_a_failed_write_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(path: Path, *args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("lmtier.cli.replay.command.write_csv", disk_full)
    path = tmp_path / "r.csv"
    assert main([*REPLAY, "--csv", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"lmtier: error: cannot write {path}: {os.strerror(errno.ENOSPC)}\n"
