"""The ``lmtier`` command line itself: help, version, -v, path arguments, output files."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lmtier
from lmtier.cli import argtypes
from lmtier.cli.main import build_parser, main, package_version
from lmtier.cli.replay import command as replay_command

REPO = Path(__file__).resolve().parent.parent
# Subcommands whose every option must explain itself in --help. bench is left out: its
# --restart-entries and --no-progress have no help text yet.
DOCUMENTED = ("stress", "replay", "inspect", "bench", "plan", "serve")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_no_arguments_prints_the_help_to_stdout_as_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: lmtier")
    for command in ("stress", "replay", "inspect", "bench"):
        assert command in captured.out
    assert captured.err == ""


def test_version_comes_from_the_package_metadata(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.8.7")
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == "lmtier 9.8.7"


def test_version_falls_back_to_the_packages_own(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(lmtier, "__version__", "1.2.3")
    assert package_version() == "1.2.3"
    monkeypatch.delattr(lmtier, "__version__")
    assert package_version() == "unknown"


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["stress"], False),
        (["-v", "stress"], True),
        (["stress", "-v"], True),
        (["--verbose", "replay", "t.jsonl"], True),
        (["replay", "t.jsonl", "--verbose"], True),
        (["inspect", ".", "-v"], True),
        (["bench", "-v"], True),
    ],
)
def test_verbose_is_accepted_before_or_after_the_command(argv: list[str], verbose: bool) -> None:
    assert build_parser().parse_args(argv).verbose is verbose


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_after_the_command_logs_at_info_level(where: str, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("tiers:\n  - {name: cpu, kind: memory, max_size_mb: 1}\n")
    stress = ["stress", "--config", str(config), "--ops", "40", "--tasks", "2", "--no-progress"]
    args = ["-v", *stress] if where == "before" else [*stress, "-v"]
    done = subprocess.run(
        [sys.executable, "-m", "lmtier.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "INFO lmtier" in done.stderr  # a line only the INFO level shows


@pytest.mark.parametrize("command", DOCUMENTED)
def test_every_option_has_help(command: str) -> None:
    parser = _subparsers(build_parser())[command]
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []


@pytest.mark.parametrize("command", DOCUMENTED)
def test_every_path_argument_expands_the_home_folder(command: str) -> None:
    parser = _subparsers(build_parser())[command]
    raw = [a.dest for a in parser._actions if a.type in (Path, str, os.fspath)]
    assert raw == []  # paths go through argtypes.user_path or argtypes.output_path
    paths = {
        a.dest for a in parser._actions if a.type in (argtypes.user_path, argtypes.output_path)
    }
    expected = {
        "stress": {"config"},
        "replay": {"trace", "config", "csv", "plot"},
        "bench": {"folder", "trace"},
        "plan": {"model"},
        "serve": {"config", "socket"},
    }
    assert paths == expected.get(command, {"path"})


def test_a_tilde_path_reaches_the_command_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("tiers:\n  - {name: cpu, kind: memory, max_size_mb: 1}\n")
    assert main(["stress", "--config", "~/c.yaml", "--ops", "40", "--tasks", "2"]) == 0
    assert "OK:" in capsys.readouterr().out
    assert main(["inspect", "~/nope"]) == 2
    assert f"{tmp_path / 'nope'} is not a folder" in capsys.readouterr().err
    assert argtypes.output_path("~/out.csv") == tmp_path / "out.csv"


@pytest.mark.parametrize("option", ["--csv", "--plot"])
def test_an_output_file_in_a_missing_folder_is_refused_before_the_run(
    option: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_replay(*args: object, **kwargs: object) -> None:
        raise AssertionError("the replay ran")

    monkeypatch.setattr(replay_command, "load_trace", no_replay)
    target = tmp_path / "missing" / "out.file"
    with pytest.raises(SystemExit) as exit_:
        main(["replay", "synthetic:zipf", option, str(target)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot write {target}: the folder {target.parent} does not exist" in err


def test_output_paths_that_cannot_be_written_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = {
        str(a_file / "out.csv"): "is not a folder",
        str(tmp_path): "it is a folder, not a file",
    }
    for text, why in cases.items():
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            argtypes.output_path(text)
    real_access = os.access

    def read_only(path: object, mode: int, **kwargs: object) -> bool:
        return mode != os.W_OK and real_access(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", read_only)
    with pytest.raises(argparse.ArgumentTypeError, match=f"{tmp_path} is not writable"):
        argtypes.output_path(str(tmp_path / "new.csv"))
    with pytest.raises(argparse.ArgumentTypeError, match=f"{a_file} is not writable"):
        argtypes.output_path(str(a_file))


def test_byte_sizes_take_binary_units() -> None:
    assert argtypes.byte_size("512") == 512
    assert argtypes.byte_size("4K") == argtypes.byte_size("4KiB") == 4096
    assert argtypes.byte_size("1.5g") == 3 * 2**29
    assert argtypes.byte_size("2 MB") == 2 * 2**20
    for bad in ("", "x", "-1G", "0", "1Q"):
        with pytest.raises(argparse.ArgumentTypeError):
            argtypes.byte_size(bad)


# reStructuredText a terminal would show verbatim: ``literal``, :role:`target`, `link`_.
RST_MARKUP = re.compile(r"``|:[a-z]+:`|`_")


@pytest.mark.parametrize("command", [None, *DOCUMENTED])
def test_help_texts_show_no_restructuredtext_markup(
    command: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"] if command is None else [command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: lmtier")
    assert RST_MARKUP.findall(text) == [], text


def test_every_subcommand_is_walked_for_markup() -> None:
    assert set(_subparsers(build_parser())) == set(DOCUMENTED)


def test_python_dash_m_lmtier_runs_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lmtier", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("lmtier "), done.stdout
    assert subprocess.run(
        [sys.executable, "-m", "lmtier"], cwd=REPO, capture_output=True, timeout=120
    ).stdout.startswith(b"usage: lmtier")
