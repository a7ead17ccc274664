"""Build vLLM's real TieringOffloadingManager with an lmtier secondary tier, without a GPU.

As vLLM's own tiering tests do: the scheduler-side objects (spec, primary CPU tier over a
shared-memory region, secondary tiers) are real; what a GPU worker would copy into the primary
tier's rows, the test writes itself.  Field names differ across vLLM releases (``chunk_ids``
became ``block_ids``), so objects are built from the fields the installed release has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

REQUIRE_ENV = "REQUIRE_ENGINE_TESTS"


def need_engine(module: str) -> Any:
    """Import ``module`` of an engine; skip without it (fail with REQUIRE_ENGINE_TESTS=1)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = f"needs {module} ({exc}); install with scripts/install_engines.sh"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why}, and {REQUIRE_ENV}=1", pytrace=False)
        pytest.skip(f"{why}; set {REQUIRE_ENV}=1 to fail instead", allow_module_level=True)


def need_distribution(name: str) -> str:
    """The installed version of the package ``name``; skip or fail (as need_engine) without it."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        why = f"needs the {name} package; install with scripts/install_engines.sh"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why}, and {REQUIRE_ENV}=1", pytrace=False)
        pytest.skip(f"{why}; set {REQUIRE_ENV}=1 to fail instead", allow_module_level=True)


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of the dataclass ``cls`` from the ``values`` it has fields for."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def offloading_config(
    extra_config: Mapping[str, Any],
    *,
    model: str = "tiny-llama",
    dtype: str = "torch.bfloat16",
    layers: Sequence[str] = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"),
    tokens_per_block: int = 16,
    worker_kv_bytes_per_block: int = 4096,
    tp_size: int = 1,
) -> Any:
    """vLLM's OffloadingConfig, as the connector derives it from the engine's configs."""
    from vllm.v1.kv_offload import config as c

    group = _build(
        c.OffloadingGroupConfig,
        {"tokens_per_block": tokens_per_block, "layer_names": tuple(layers), "group_id": 0},
    )
    parallel = _build(
        c.OffloadingParallelConfig,
        {
            "rank": 0,
            "world_size": tp_size,
            "tp_size": tp_size,
            "pp_size": 1,
            "pcp_size": 1,
            "dcp_size": 1,
            "data_parallel_index": 0,
            "data_parallel_size": 1,
            "data_parallel_rank_local": None,
            "is_parallelism_agnostic": False,
        },
    )
    return _build(
        c.OffloadingConfig,
        {
            "groups": (group,),
            "worker_kv_bytes_per_block": worker_kv_bytes_per_block,
            "enable_kv_cache_events": False,
            "extra_config": dict(extra_config),
            "engine_id": f"lmtier-test-{uuid.uuid4().hex[:12]}",
            "model": _build(c.OffloadingModelConfig, {"name": model, "dtype": dtype}),
            "cache": _build(
                c.OffloadingCacheConfig,
                {"tokens_per_hash": tokens_per_block, "blocks_per_chunk": 1},
            ),
            "parallel": parallel,
        },
    )


def secondary_extra(entry: Mapping[str, Any], cpu_rows: int, row: int) -> dict:
    """``kv_connector_extra_config`` with one lmtier secondary tier of ``entry``'s fields."""
    tier = {"type": "LmtierSecondaryTier", "module_path": "lmtier.integrations.vllm", **entry}
    return {
        "spec_name": "TieringOffloadingSpec",
        "cpu_bytes_to_use": cpu_rows * row,
        "secondary_tiers": [tier],
    }


def kv_transfer_extra(lmtier_config: Mapping[str, Any] | str, cpu_rows: int, row: int) -> dict:
    """``kv_connector_extra_config`` naming the lmtier tier: a config mapping or a file path."""
    if isinstance(lmtier_config, str):
        return secondary_extra({"config_path": lmtier_config}, cpu_rows, row)
    return secondary_extra({"config": dict(lmtier_config)}, cpu_rows, row)


def engine_factory(extra_for: Callable[[Any, int], dict]) -> Iterator[Callable[..., Engine]]:
    """A fixture's body: ``make(tier, cpu_rows=4, extra=None, **config)`` builds an ``Engine``
    over ``extra`` or ``extra_for(tier, cpu_rows)``; every one is closed after the test."""
    made: list[Engine] = []

    def make(tier: Any, cpu_rows: int = 4, **config: Any) -> Engine:
        extra = config.pop("extra", None) or extra_for(tier, cpu_rows)
        engine = Engine(extra, **config)
        made.append(engine)
        return engine

    yield make
    for engine in reversed(made):
        engine.close()


class Engine:
    """A TieringOffloadingManager built through vLLM's spec factory, driven as the scheduler."""

    def __init__(self, extra_config: Mapping[str, Any], **config: Any) -> None:
        from vllm.v1.kv_offload.factory import OffloadingSpecFactory

        self.spec = OffloadingSpecFactory.create_spec(offloading_config(extra_config, **config))
        self.manager = self.spec.get_manager()
        self.tier = self.manager.secondary_tiers[0]
        self.rows = np.asarray(self.manager.primary_tier.get_kv_memoryview())
        self.row_bytes = self.rows.shape[1]
        self._closed = False

    def ctx(self, req_id: str) -> Any:
        from vllm.v1.kv_offload.base import ReqContext

        context = ReqContext(req_id=req_id)
        self.manager.on_new_request(context)
        return context

    def store(self, keys: Sequence[bytes], payloads: Sequence[np.ndarray], req: Any) -> list:
        """GPU -> primary: allocate rows, fill them as a worker would, complete the store."""
        out = self.manager.prepare_store(keys, req)
        assert out is not None, "the primary tier could not take the blocks"
        ids = slot_ids(out.store_spec)
        stored = list(out.keys_to_store)
        by_key = dict(zip(keys, payloads, strict=True))
        for key, slot in zip(stored, ids, strict=True):
            self.rows[slot][:] = by_key[key]
        self.manager.complete_store(keys, req, True)
        return stored

    def step(self) -> None:
        from vllm.v1.kv_offload.base import ScheduleEndContext

        self.manager.on_schedule_end(ScheduleEndContext(new_req_ids=(), preempted_req_ids=()))

    def settle(self, timeout: float = 30.0) -> None:
        """Step until no job is in flight (as the engine keeps stepping while work is pending)."""
        deadline = time.monotonic() + timeout
        self.step()
        while self.manager.has_pending_work():
            assert time.monotonic() < deadline, "jobs still in flight"
            time.sleep(0.005)
            self.step()

    def lookup(self, key: bytes, req: Any) -> Any:
        # 0.33 has the scheduler hold the manager's lock around each call; 0.32 has no lock.
        with getattr(self.manager, "lock", None) or contextlib.nullcontext():
            return self.manager.lookup(key, req)

    def lookup_until_settled(self, key: bytes, req: Any, timeout: float = 30.0) -> Any:
        """Look up until the answer is neither RETRY nor HIT_PENDING; returns the answers seen."""
        from vllm.v1.kv_offload.base import LookupResult

        seen = []
        deadline = time.monotonic() + timeout
        while True:
            result = self.lookup(key, req)
            seen.append(result)
            if result not in (LookupResult.RETRY, LookupResult.HIT_PENDING):
                return seen
            assert time.monotonic() < deadline, f"lookup stuck at {result}"
            self.step()
            time.sleep(0.005)

    def read(self, keys: Sequence[bytes], req: Any) -> list[np.ndarray]:
        """Primary -> GPU: the bytes a worker would copy out of the primary rows."""
        spec = self.manager.prepare_load(keys, req)
        data = [self.rows[slot].copy() for slot in slot_ids(spec)]
        self.manager.complete_load(keys, req)
        return data

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.rows = None  # type: ignore[assignment]  # our export of the primary's buffer
            self.manager.shutdown()


def slot_ids(spec: Any) -> list[int]:
    ids = getattr(spec, "block_ids", None)
    if ids is None:
        ids = spec.chunk_ids
    return [int(i) for i in np.asarray(ids).reshape(-1)]


def transfer_job(
    job_id: int, keys: Sequence[bytes], slots: Iterable[int], *, promotion: bool, req: Any
) -> Any:
    """vLLM's TransferJob, with ``block_ids`` or ``chunk_ids`` as the release names it."""
    from vllm.v1.kv_offload.tiering.base import TransferJob

    names = {f.name for f in dataclasses.fields(TransferJob)}
    field = "block_ids" if "block_ids" in names else "chunk_ids"
    return TransferJob(
        job_id=job_id,
        keys=list(keys),
        is_promotion=promotion,
        req_context=req,
        **{field: np.asarray(list(slots), dtype=np.int32)},
    )


def keys(prefix: str, count: int, group: int = 0) -> list[bytes]:
    from vllm.v1.kv_offload.base import make_offload_key

    return [make_offload_key(f"{prefix}-{i}".encode().ljust(32, b"."), group) for i in range(count)]


def payload(key: bytes, row_bytes: int) -> np.ndarray:
    """Bytes derived from the key, so a wrong or stale block is always visible."""
    seed = int.from_bytes(key[:8], "little") ^ len(key)
    return np.random.default_rng(seed).integers(0, 256, row_bytes, dtype=np.uint8).view(np.int8)


def as_bytes(row: np.ndarray) -> bytes:
    return np.ascontiguousarray(row).view(np.uint8).tobytes()


def fill(engine: Engine, prefix: str, count: int, req: Any) -> list[bytes]:
    """Store ``count`` blocks named from ``prefix`` and let every job finish; their keys."""
    blocks = keys(prefix, count)
    engine.store(blocks, [payload(k, engine.row_bytes) for k in blocks], req)
    engine.settle()
    return blocks


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)
