"""Sizes as people read them, in every message that prints one."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtier.cli.main import main
from lmtier.sizes import human_bytes


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1536, "1.5 KiB"),
        (2 * 2**20, "2 MiB"),
        (int(1.25 * 2**30), "1.25 GiB"),
        (107374182400, "100 GiB"),  # not "107374182400 bytes"
        (int(5.12e6 * 2**20), "4.88 TiB"),  # not "5.12e+06 MiB"
        (1023 * 2**30, "1023 GiB"),
        (3 * 2**50, "3 PiB"),
    ],
)
def test_human_bytes_reads_as_a_person_writes_it(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_the_stress_header_gives_budgets_in_binary_units(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "tiers:\n"
        "  - {name: cpu, kind: memory, max_size_mb: 1.5}\n"
        "  - {name: big, kind: memory, max_size_mb: 5120000}\n"
    )
    args = ["stress", "--config", str(config), "--ops", "40", "--keys-per-task", "4"]
    assert main([*args, "--tasks", "2", "--no-progress", "--allow-unreached"]) == 0
    out = capsys.readouterr().out
    assert "stress: cpu (1.5 MiB) -> big (4.88 TiB)" in out
    assert "e+" not in out.split("\n", 1)[0]
