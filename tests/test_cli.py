"""The ``lmtier stress`` command: it passes on a sound store and fails on a broken one."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier.cli import main
from lmtier.tiers.memory import MemoryTier

SMALL = ["stress", "--tasks", "8", "--ops", "800", "--keys-per-task", "40", "--no-progress"]


def test_stress_on_the_embedded_default_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    assert "OK: no wrong or lost entry" in out
    assert "disk" in out and "verified bit-exact" in out


def test_stress_with_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "tiers:\n"
        "  - {name: cpu, kind: memory, device: cpu, max_size_mb: 2}\n"
        f"  - {{name: disk, kind: disk, path: {tmp_path / 'd'}, max_size_mb: 4}}\n"
    )
    assert main([*SMALL, "--config", str(config)]) == 0
    assert "cpu (2 MiB) -> disk (4 MiB)" in capsys.readouterr().out


def test_stress_fails_when_the_store_returns_wrong_bytes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    original = MemoryTier.load

    async def flipped(self: MemoryTier, obj: Any) -> torch.Tensor:
        tensor = (await original(self, obj)).clone()
        tensor.view(torch.int16)[0, 0, 0] ^= 1
        return tensor

    monkeypatch.setattr(MemoryTier, "load", flipped)
    assert main(SMALL) == 1
    assert "wrong bytes" in capsys.readouterr().out


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["stress", "--tasks", "0"])
    assert "--tasks: must be > 0" in capsys.readouterr().err
    assert main(["stress", "--get-fraction", "0.9", "--delete-fraction", "0.2"]) == 2
    assert "sum to at most 1" in capsys.readouterr().err


def test_stress_with_a_duration_and_lognormal_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    # Two seconds may not fill the cpu tier on a loaded machine: the disk tier need not be reached.
    args = [*SMALL, "--ops", "1000000", "--duration", "2", "--size-dist", "lognormal",
            "--get-fraction", "0.6", "--delete-fraction", "0.1", "--allow-unreached"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "OK: no wrong or lost entry" in out
    ops = int(out.split(" ops in ")[0].rsplit("\n", 1)[-1])
    assert 0 < ops < 1_000_000


def test_a_bad_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("tiers: [{name: x, kind: tape, max_size_gb: 1}]\n")
    assert main(["stress", "--config", str(config)]) == 2
    assert "kind" in capsys.readouterr().err


async def _two_entries(root: Path) -> Path:
    from lmtier import StoreConfig, TierConfig, TieredStore

    tiers = (TierConfig("disk", "disk", 1 << 20, path=str(root)),)
    async with TieredStore(StoreConfig(tiers, namespace="m|bf16")) as store:
        await store.put("a", torch.ones(64))
        await store.put("b", torch.zeros(64))
        return Path(store.tiers[0].lookup("a").path)  # type: ignore[attr-defined]


async def test_inspect_finds_corrupt_files_and_repairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = await _two_entries(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "2 entries, 512 B (namespace 'm|bf16'); 0 corrupt" in capsys.readouterr().out
    with open(a_file, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    (a_file.parent / ".tmp-left-over").write_bytes(b"x")
    assert main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "checksum mismatch" in out and ".tmp-left-over" in out
    assert main(["inspect", str(tmp_path), "--repair"]) == 0
    assert "removed 2 file(s)" in capsys.readouterr().out
    assert not a_file.exists()
    assert main(["inspect", str(tmp_path)]) == 0


async def test_inspect_counts_another_namespaces_files_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = await _two_entries(tmp_path)  # namespace "m|bf16"
    from lmtier import StoreConfig, TierConfig, TieredStore

    tiers = (TierConfig("disk", "disk", 1 << 20, path=str(tmp_path)),)
    async with TieredStore(StoreConfig(tiers, namespace="other")) as store:
        await store.put("c", torch.ones(64))
        other = Path(store.tiers[0].lookup("c").path)  # type: ignore[attr-defined]
    stray = other.parent.parent / a_file.parent.name / a_file.name
    stray.parent.mkdir(exist_ok=True)
    shutil.copyfile(a_file, stray)  # an intact entry of m|bf16 in other's folder
    assert main(["inspect", str(other.parent.parent), "--repair"]) == 1
    out = capsys.readouterr().out
    assert "1 entries, 256 B (namespace 'other')" in out
    assert "1 of another namespace" in out and f"foreign  {stray}" in out
    assert stray.exists(), "another namespace's entry is not removed"


async def test_repair_of_a_read_only_folder_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = await _two_entries(tmp_path)
    with open(a_file, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    real_open = os.open

    def read_only_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    assert main(["inspect", str(tmp_path), "--repair"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and str(a_file.parent.parent) in err
    monkeypatch.undo()

    def cannot_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "unlink", cannot_unlink)
    assert main(["inspect", str(tmp_path), "--repair"]) == 1
    out = capsys.readouterr().out
    assert f"could not remove {a_file}: Permission denied" in out
    monkeypatch.undo()
    assert a_file.exists()


def test_inspect_of_a_missing_path_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_inspect_of_a_folder_that_is_no_tiers_says_so_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not a cache")
    (tmp_path / "sub").mkdir()
    assert main(["inspect", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert f"{tmp_path} is not a disk tier's folder" in captured.err
    assert captured.out == ""


async def test_repair_refuses_while_a_store_uses_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmtier import StoreConfig, TierConfig, TieredStore

    tiers = (TierConfig("disk", "disk", 1 << 20, path=str(tmp_path)),)
    async with TieredStore(StoreConfig(tiers)) as store:
        await store.put("a", torch.ones(4))
        assert main(["inspect", str(tmp_path), "--repair"]) == 2
        assert "in use by a running store" in capsys.readouterr().err
        assert main(["inspect", str(tmp_path)]) == 0  # a read-only look is fine


def test_argument_types_reject_bad_values_clearly() -> None:
    import argparse

    from lmtier.cli.argtypes import float_list, non_negative_float_list, positive_int

    assert float_list("0.01, 0.5") == (0.01, 0.5)
    assert non_negative_float_list("0") == () and non_negative_float_list("0,0.1") == (0.1,)
    for parse, text in ((float_list, "0.1,x"), (float_list, "0"), (positive_int, "0"),
                        (non_negative_float_list, "-1")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


async def test_inspect_finds_a_header_rewritten_to_another_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmtier import serde

    a_file = await _two_entries(tmp_path)
    data = a_file.read_bytes()
    header = serde.decode_header(data)
    crafted = serde.encode_header(
        header.key, torch.int32, (8, 8), header.nbytes, header.checksum, header.namespace
    )
    a_file.write_bytes(crafted + data[header.payload_offset :])
    assert main(["inspect", str(tmp_path)]) == 1
    assert "1 entries" in capsys.readouterr().out


@pytest.mark.parametrize("shared", [False, True])
def test_stress_runs_exactly_the_ops_asked_for(
    shared: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1001 = 7 x 143 and 8 x 125 + 1: neither tasks nor tasks x rounds divide it.
    argv = ["stress", "--ops", "1001", "--tasks", "8", "--keys-per-task", "40", "--no-progress"]
    if shared:
        argv = [*argv, "--shared-keys", "--rounds", "3", "--tasks", "7"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "\n1001 ops in " in out, out


def test_split_evenly_keeps_every_op() -> None:
    from lmtier.cli.stress.run import split_evenly

    for total, parts in ((1001, 8), (7, 3), (2, 5), (64, 64)):
        shares = split_evenly(total, parts)
        assert sum(shares) == total and len(shares) == parts
        assert max(shares) - min(shares) <= 1


async def test_the_verification_phase_shows_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmtier.cli.stress.run import StressOptions, default_stress_config, run_stress
    from lmtier.store import TieredStore

    options = StressOptions(tasks=4, ops=200, keys_per_task=20, progress=True)
    async with TieredStore(default_stress_config(tmp_path)) as store:
        report = await run_stress(store, options)
    err = capsys.readouterr().err
    assert report.ok and "| 200/200 [" in err
    assert "verify: 100%" in err and "| 80/80 [" in err, err  # each task's 20 keys read back
    async with TieredStore(default_stress_config(tmp_path)) as store:
        await run_stress(store, dataclasses.replace(options, progress=False))
    assert "verify" not in capsys.readouterr().err


async def test_inspect_names_each_file_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = await _two_entries(tmp_path)
    with open(a_file, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    b_file = a_file.with_name("0" * 32 + "-x.safetensors")
    b_file.write_bytes(b"not an entry")  # a header error, whose message names no file
    assert main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count(str(a_file)) == 1 and out.count(str(b_file)) == 1, out
    assert f"corrupt  {a_file}: checksum mismatch" in out
