"""``lmtier plan``: its output for published model configs, its warnings and its errors."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmtier.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "tests" / "data" / "models"
LLAMA = str(MODELS / "Meta-Llama-3-8B.json")


def _plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_llama_3_8b_per_token_per_chunk_and_tiers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _plan(capsys, "--model", LLAMA, "--gpu-kv", "40", "--cpu", "16",
                           "--disk", "100")  # fmt: skip
    assert code == 0 and err == ""
    # 32 layers x 2 x 8 KV heads x 128 x 2 bytes = 131,072 bytes per token; x 16 per chunk.
    assert "KV per token: 128 KiB (131,072 bytes) = 32 layers x 2 (K, V) x 8 KV heads" in out
    assert "KV per chunk of 16 tokens: 2 MiB (2,097,152 bytes)" in out
    rows = {line.split()[0]: line.split()[-2:] for line in out.splitlines()[3:7]}
    # 40 GiB / 2 MiB = 20,480 chunks of 16 tokens; 16 GiB: 8,192; 100 GiB: 51,200.
    assert rows["gpu"] == ["327,680", "20,480"]
    assert rows["engine"] == ["131,072", "8,192"]
    assert rows["disk"] == ["819,200", "51,200"]
    assert '"cpu_bytes_to_use": 17179869184' in out  # 16 x 1024^3
    assert "LMTIER_DISK__MAX_SIZE_GB=100 with configs/vllm.yaml" in out


def test_a_model_folder_and_another_chunk_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text((MODELS / "Qwen2.5-7B.json").read_text())
    code, out, _ = _plan(capsys, "--model", str(tmp_path), "--tokens-per-chunk", "256")
    assert code == 0
    # 28 layers x 2 x 4 KV heads x 128 x 2 bytes = 57,344; x 256 = 14,680,064 = 14 MiB.
    assert "KV per token: 56 KiB (57,344 bytes)" in out
    assert "KV per chunk of 256 tokens: 14 MiB (14,680,064 bytes)" in out
    assert "tier" not in out and "config lines" not in out  # no sizes given, no table


def test_mla_and_sliding_window_models_say_what_they_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = _plan(capsys, "--model", str(MODELS / "DeepSeek-V2-Lite.json"))
    # 27 layers x (512 + 64) x 2 bytes = 31,104 bytes per token.
    assert "KV per token: 30.38 KiB (31,104 bytes) = 27 layers x (kv_lora_rank 512" in out
    _, out, _ = _plan(capsys, "--model", str(MODELS / "gemma-2-9b-it.json"))
    assert "KV per token: 336 KiB (344,064 bytes)" in out  # 42 x 2 x 8 x 256 x 2
    assert "21 of 42 layers use sliding-window attention (window 4,096 tokens): counted as " \
        "full attention" in out  # fmt: skip


def test_the_dtype_override(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _plan(capsys, "--model", LLAMA, "--dtype", "fp8")
    assert "KV cache in fp8" in out and "KV per token: 64 KiB (65,536 bytes)" in out


def test_a_cpu_tier_smaller_than_the_longest_request_is_warned_of(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 64-chunk CPU tier (128 MiB of 2 MiB chunks) and a request of 129 blocks: never stored
    down to lmtier."""
    code, out, err = _plan(capsys, "--model", LLAMA, "--cpu", "0.125", "--disk", "10",
                           "--max-request-tokens", str(129 * 16))  # fmt: skip
    assert code == 0
    assert "the longest request, 2,064 tokens, is 129 chunks (258 MiB)" in out
    assert "warning: the engine's CPU tier holds 64 chunks, fewer than a request of 2,064 " \
        "tokens (129 chunks)" in err  # fmt: skip
    assert "never reaches lmtier; give the CPU tier at least 258 MiB" in err
    _, _, err = _plan(capsys, "--model", LLAMA, "--cpu", "0.125", "--disk", "10",
                      "--max-request-tokens", str(64 * 16))  # fmt: skip
    assert err == "", "a request the CPU tier holds is no warning"


def test_a_disk_no_larger_than_the_cpu_tier_is_warned_of(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, _, err = _plan(capsys, "--model", LLAMA, "--cpu", "16", "--disk", "16")
    assert "the disk tier (16 GiB) is no larger than the engine's CPU tier (16 GiB)" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "/no/such/config.json"], "/no/such/config.json: no such file"),
        (["--model", LLAMA, "--dtype", "int4"], "invalid choice: 'int4'"),
        (["--model", LLAMA, "--cpu", "0"], "must be a number of GiB > 0"),
        (["--model", LLAMA, "--disk", "lots"], "not a number of GiB: 'lots'"),
        (["--model", LLAMA, "--tokens-per-chunk", "0"], "must be > 0"),
        ([], "the following arguments are required: --model"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["plan", *argv])
    except SystemExit as exit_:  # argparse's own errors
        code = int(exit_.code or 0)
    assert code == 2
    assert message in capsys.readouterr().err


def test_an_unsupported_model_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "mamba", "num_hidden_layers": 64}')
    code, out, err = _plan(capsys, "--model", str(config))
    assert code == 2 and out == ""
    assert err == (
        f"lmtier: error: {config}: model_type 'mamba' has state-space (Mamba) layers: "
        "sizing it is not supported yet\n"
    )


def test_every_option_explains_itself() -> None:
    parser = build_parser()
    plan = next(
        action.choices["plan"]
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    for action in plan._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_the_module_runs_as_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lmtier.cli", "plan", "--model", LLAMA],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "KV per token: 128 KiB" in done.stdout


def test_the_worked_example_in_docs_sizing_is_the_commands_output(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (REPO / "docs" / "sizing.md").read_text(encoding="utf-8")
    block = re.search(r"```text\n\$ lmtier (.*?)\n(.*?)```", text, re.S)
    assert block is not None, "docs/sizing.md shows a run of lmtier plan"
    monkeypatch.chdir(REPO)
    assert main(block[1].split()) == 0
    assert capsys.readouterr().out == block[2]
