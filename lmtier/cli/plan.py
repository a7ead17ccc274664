"""``lmtier plan``: KV bytes per token and chunk for a model, what each tier holds, the config
lines to use, and a warning when the engine's CPU tier cannot hold the longest request."""

from __future__ import annotations

import argparse
import sys

from lmtier.cli.argtypes import positive_int, user_path
from lmtier.sizing import (
    DTYPE_BYTES,
    GIB,
    KVGeometry,
    TierCapacity,
    chunks_for_tokens,
    kv_geometry,
    read_model_config,
    tier_capacity,
)

__all__ = ["DEFAULT_TOKENS_PER_CHUNK", "add_plan_parser", "run_plan"]

#: vLLM's default block size; SGLang's unit is its --page-size.
DEFAULT_TOKENS_PER_CHUNK = 16

_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def add_plan_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="KV-cache bytes per token and chunk of a model, and what each tier holds",
        description="Reads a Hugging Face config.json (layers, KV heads, head dim, dtype; MLA "
        "and sliding-window models too) and prints the KV bytes per token and per chunk, how "
        "many tokens and chunks each given tier holds, and the config lines to use. "
        "Explained by hand in docs/sizing.md.",
    )
    plan.add_argument(
        "--model", required=True, type=user_path, metavar="PATH_OR_CONFIG_JSON",
        help="a model folder holding config.json, or the config.json file itself",
    )  # fmt: skip
    plan.add_argument(
        "--tokens-per-chunk", type=positive_int, default=DEFAULT_TOKENS_PER_CHUNK, metavar="N",
        help="tokens per stored chunk: vLLM's block size, SGLang's page size "
        "(default: %(default)s)",
    )  # fmt: skip
    plan.add_argument(
        "--dtype", choices=sorted(DTYPE_BYTES), metavar="DTYPE",
        help="the KV cache's dtype, e.g. fp8 for an engine run with --kv-cache-dtype fp8 "
        "(default: the config's torch_dtype or dtype)",
    )  # fmt: skip
    plan.add_argument("--gpu-kv", type=_gib, metavar="GiB", help="the engine's GPU KV cache")
    plan.add_argument(
        "--cpu", type=_gib, metavar="GiB",
        help="the engine's CPU tier (vLLM's cpu_bytes_to_use, SGLang's host pool)",
    )  # fmt: skip
    plan.add_argument("--disk", type=_gib, metavar="GiB", help="lmtier's disk tier")
    plan.add_argument(
        "--max-request-tokens", type=positive_int, metavar="N",
        help="the longest request (prompt and output); warns when the engine's CPU tier "
        "cannot hold it",
    )  # fmt: skip
    plan.set_defaults(run=run_plan, no_progress=True)


def run_plan(args: argparse.Namespace) -> int:
    source = str(args.model)
    geometry = kv_geometry(read_model_config(args.model), args.dtype, source=source)
    per_chunk = args.tokens_per_chunk
    print(f"{source}: {geometry.model}, KV cache in {geometry.dtype}")
    print(f"KV per token: {_size(geometry.bytes_per_token)} = {geometry.describe()}")
    print(f"KV per chunk of {per_chunk} tokens: {_size(geometry.bytes_per_chunk(per_chunk))}")
    for note in geometry.notes():
        print(f"note: {note}")
    tiers = [
        tier_capacity(name, int(gib * GIB), geometry, per_chunk)
        for name, gib in (("gpu KV", args.gpu_kv), ("engine CPU", args.cpu), ("disk", args.disk))
        if gib is not None
    ]
    if tiers:
        print(_table(tiers))
    _config_lines(args)
    if args.max_request_tokens is not None:
        tokens = args.max_request_tokens
        chunks = chunks_for_tokens(tokens, per_chunk)
        print(
            f"the longest request, {tokens:,} tokens, is {chunks:,} chunks "
            f"({_short(chunks * geometry.bytes_per_chunk(per_chunk))}): the engine's CPU tier "
            "must hold at least that for vLLM to store it down to lmtier"
        )
    for warning in _warnings(args, geometry, {tier.name: tier for tier in tiers}):
        print(f"lmtier: warning: {warning}", file=sys.stderr)
    return 0


def _config_lines(args: argparse.Namespace) -> None:
    lines = []
    if args.cpu is not None:
        cpu_bytes = int(args.cpu * GIB)
        lines.append(f'vLLM:   "cpu_bytes_to_use": {cpu_bytes} in kv_connector_extra_config')
        lines.append(f"SGLang: --hicache-size {_number(args.cpu * GIB / 1e9)} (GB of 10^9 bytes)")
    if args.disk is not None:
        gib = _number(args.disk)
        lines.append(
            f"lmtier: LMTIER_DISK__MAX_SIZE_GB={gib} with configs/vllm.yaml or "
            f"configs/sglang.yaml (in the file: max_size_gb: {gib})"
        )
    if lines:
        print("config lines:")
        for line in lines:
            print(f"  {line}")


def _warnings(
    args: argparse.Namespace, geometry: KVGeometry, tiers: dict[str, TierCapacity]
) -> list[str]:
    warnings = []
    cpu, disk = tiers.get("engine CPU"), tiers.get("disk")
    if args.max_request_tokens is not None:
        tokens = args.max_request_tokens
        chunks = chunks_for_tokens(tokens, args.tokens_per_chunk)
        needed = _short(chunks * geometry.bytes_per_chunk(args.tokens_per_chunk))
        if cpu is not None and cpu.chunks < chunks:
            warnings.append(
                f"the engine's CPU tier holds {cpu.chunks:,} chunks, fewer than a request of "
                f"{tokens:,} tokens ({chunks:,} chunks): vLLM stores a request down to lmtier "
                f"only through its CPU tier, so such a request never reaches lmtier; give the "
                f"CPU tier at least {needed}"
            )
        if disk is not None and disk.chunks < chunks:
            warnings.append(
                f"the disk tier holds {disk.chunks:,} chunks, fewer than a request of "
                f"{tokens:,} tokens ({chunks:,} chunks)"
            )
    if cpu is not None and disk is not None and disk.size_bytes <= cpu.size_bytes:
        warnings.append(
            f"the disk tier ({_short(disk.size_bytes)}) is no larger than the engine's CPU tier "
            f"({_short(cpu.size_bytes)}): it holds what that tier evicts, so it adds little; "
            "give it several times more"
        )
    return warnings


def _table(tiers: list[TierCapacity]) -> str:
    rows = [("tier", "size", "tokens", "chunks")]
    rows += [(t.name, _short(t.size_bytes), f"{t.tokens:,}", f"{t.chunks:,}") for t in tiers]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    )  # fmt: skip


def _size(count: int) -> str:
    """``count`` bytes in the largest binary unit it fills, with the exact count beside it."""
    short = _short(count)
    return short if short.endswith(" bytes") else f"{short} ({count:,} bytes)"


def _short(count: int) -> str:
    """``count`` bytes in the largest binary unit it fills."""
    for unit, size in _UNITS:
        if count >= size:
            return f"{_number(count / size)} {unit}"
    return f"{count:,} bytes"


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of GiB: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of GiB > 0, got {text!r}")
    return value
