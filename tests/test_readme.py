"""The README's snippets run as written, and its links lead somewhere: it cannot drift."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmtier.config import config_from_mapping

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_the_readme_stays_a_newcomers_five_minutes() -> None:
    assert len(README.encode()) <= 12 * 1024


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_each_python_snippet_runs_as_written(index: int, tmp_path: Path) -> None:
    env = {**os.environ, "LMTIER_DISK__PATH": str(tmp_path / "disk")}
    done = subprocess.run(
        [sys.executable, "-c", blocks("python")[index]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("index", range(len(blocks("yaml"))))
def test_each_yaml_snippet_is_a_valid_config(index: int) -> None:
    config = config_from_mapping(yaml.safe_load(blocks("yaml")[index]), "README", environ={})
    assert config.tiers


def test_the_set_up_commands_are_those_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line for block in blocks("bash") for line in block.splitlines()]
    assert "pip install -c constraints-cpu.txt -e . && lmtier stress" in commands
    test_command = 'pip install -c constraints-cpu.txt -e ".[test]" && python -m pytest -q'
    assert test_command in commands and test_command in ci


def test_every_linked_file_exists() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links, "the README links to its docs"
    missing = [link for link in links if not (REPO / link).exists()]
    assert missing == []
