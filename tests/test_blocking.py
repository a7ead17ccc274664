"""BlockingStore: the thread-safe facade over a store running on its own loop thread."""

from __future__ import annotations

import asyncio
import gc
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import (
    ConfigError,
    InvalidKeyError,
    InvalidValueError,
    LmtierTypeError,
    PutStatus,
    StoreClosedError,
    TieredStore,
)
from lmtier.integrations.blocking import BlockingStore

from conftest import tensor_for
from store_helpers import KIB, cascade_config

THREADS = 16
KEYS = [f"key-{i}" for i in range(24)]


def _seed(key: str, version: int) -> int:
    return int(tensor_for(key, version)[0])


def _lmtier_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name or t.name.startswith(f"{name}-io")]


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with BlockingStore(cascade_config(tmp_path), thread_name="lmtier-test") as blocking:
        yield blocking
    assert not _lmtier_threads("lmtier-test")


def test_many_threads_share_keys_and_read_only_written_versions(tmp_path: Path) -> None:
    # Tiers of 4 + 8 + 32 KiB for 24 keys of 1 KiB: entries spill to disk and move up and down.
    config = cascade_config(tmp_path, top=4 * KIB, middle=8 * KIB, disk=32 * KIB)
    written: dict[str, dict[int, int]] = defaultdict(dict)  # key -> seed -> version
    lock = threading.Lock()
    reads: list[tuple[str, torch.Tensor]] = []
    errors: list[BaseException] = []

    def worker(index: int, blocking: BlockingStore) -> None:
        rng = random.Random(index)
        try:
            for step in range(120):
                key = rng.choice(KEYS)
                action = rng.random()
                if action < 0.45:
                    version = index * 1000 + step
                    with lock:
                        written[key][_seed(key, version)] = version
                    assert blocking.put(key, tensor_for(key, version)) is PutStatus.LEGAL
                elif action < 0.85:
                    value = blocking.get(key)
                    if value is not None:
                        reads.append((key, value))
                elif action < 0.95:
                    blocking.delete(key)
                else:
                    batch = rng.sample(KEYS, 4)
                    for each, value in zip(batch, blocking.get_many(batch), strict=True):
                        if value is not None:
                            reads.append((each, value))
        except BaseException as exc:
            errors.append(exc)

    with BlockingStore(config, thread_name="lmtier-share") as blocking:
        threads = [threading.Thread(target=worker, args=(i, blocking)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors[:3]
        for key in KEYS:  # what is left is also one of the versions written
            value = blocking.get(key)
            if value is not None:
                reads.append((key, value))
        assert blocking.audit() == []
        stats = blocking.stats()
        assert stats["tiers"]["disk"]["entries"] + stats["drops"] > 0  # the cascade was used
    assert reads
    for key, value in reads:
        version = written[key].get(int(value[0]))
        assert version is not None, f"{key}: a value that was never written"
        assert torch.equal(value, tensor_for(key, version))
    assert not _lmtier_threads("lmtier-share")


def test_store_errors_are_raised_in_the_caller_with_their_type(store: BlockingStore) -> None:
    with pytest.raises(LmtierTypeError):
        store.put(42, tensor_for("a"))  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        store.get("")
    with pytest.raises(LmtierTypeError):
        store.put("a", [1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        store.get("a", "meta")
    with pytest.raises(KeyError):
        store.call(lambda s: _raise(KeyError("mine")))
    # the store stays usable
    assert store.put("a", tensor_for("a")) is PutStatus.LEGAL
    assert torch.equal(store.get("a"), tensor_for("a"))


async def _raise(exc: BaseException) -> None:
    raise exc


def test_every_method_works_and_sync_ones_run_on_the_loop_thread(store: BlockingStore) -> None:
    seen: list[str] = []
    inner = store.store

    def recording(name: str) -> Any:
        method = getattr(inner, name)

        def wrapper(*args: Any) -> Any:
            seen.append(threading.current_thread().name)
            return method(*args)

        return wrapper

    for name in ("pin", "unpin", "stats", "audit"):
        setattr(inner, name, recording(name))
    statuses = store.put_many(((k, tensor_for(k)) for k in ("a", "b")), positions={"a": 0})
    assert statuses == [PutStatus.LEGAL, PutStatus.LEGAL]
    assert store.contains("a") == "gpu"
    assert store.pin("a") == "gpu"
    assert store.stats()["pinned_entries"] == 1
    store.unpin("a")
    assert store.audit() == []
    out = torch.empty_like(tensor_for("b"))
    assert store.get("b", out=out) is out
    assert torch.equal(out, tensor_for("b"))
    assert store.get("b", "cpu").device.type == "cpu"
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.contains("a") is None
    assert store.pin("a") is None
    assert seen and set(seen) == {"lmtier-test"}


def test_submit_returns_at_once_and_call_waits(store: BlockingStore) -> None:
    started = threading.Event()

    async def slow_put(s: TieredStore) -> str | None:
        started.set()
        await asyncio.sleep(0.2)
        await s.put("slow", tensor_for("slow"))
        return await s.contains("slow")

    future = store.submit(slow_put)
    assert not future.done()
    assert future.result(60) == "gpu"
    assert started.is_set()
    assert store.call(lambda s: s.contains("slow")) == "gpu"


def test_a_blocking_call_from_the_loop_thread_raises(store: BlockingStore) -> None:
    async def reenter(s: TieredStore) -> None:
        store.get("a")

    with pytest.raises(RuntimeError, match="loop thread"):
        store.call(reenter)

    async def close_inside(s: TieredStore) -> None:
        store.close()

    with pytest.raises(RuntimeError, match="loop thread"):
        store.call(close_inside)
    assert store.put("a", tensor_for("a")) is PutStatus.LEGAL  # still open and serving


def test_a_caller_timeout_cancels_its_call_only(store: BlockingStore) -> None:
    async def stuck(s: TieredStore) -> None:
        await asyncio.sleep(30)

    with pytest.raises(TimeoutError):
        store.call(stuck, timeout=0.05)
    assert store.put("a", tensor_for("a")) is PutStatus.LEGAL
    assert torch.equal(store.get("a"), tensor_for("a"))
    assert not store._runner.calls or all(t.cancelled() or t.done() for t in store._runner.calls)


def test_a_keyboard_interrupt_in_the_caller_leaves_the_loop_running(
    store: BlockingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concurrent.futures

    def interrupted(self: Any, timeout: float | None = None) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(concurrent.futures.Future, "result", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.put("a", tensor_for("a"))
    assert store.put("b", tensor_for("b")) is PutStatus.LEGAL
    assert torch.equal(store.get("b"), tensor_for("b"))


def test_close_finishes_calls_in_flight_and_leaves_no_thread(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    blocking = BlockingStore(cascade_config(tmp_path), thread_name="lmtier-close")
    outcomes: list[object] = []
    go = threading.Event()

    def writer(index: int) -> None:
        go.wait()
        for step in range(10_000):
            key = f"w{index}-{step % 8}"
            try:
                outcomes.append(blocking.put(key, tensor_for(key, step)))
            except StoreClosedError:
                outcomes.append("closed")
                return
            except BaseException as exc:
                outcomes.append(exc)
                return

    async def slow(s: TieredStore) -> str | None:
        await asyncio.sleep(0.3)
        await s.put("late", tensor_for("late"))
        return await s.contains("late")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    go.set()
    time.sleep(0.1)
    pending = blocking.submit(slow)
    blocking.close()
    assert pending.result(0) == "gpu"  # submitted before close: it finished
    for thread in threads:
        thread.join(60)
    assert outcomes.count("closed") == 8
    assert all(o is PutStatus.LEGAL or o == "closed" for o in outcomes), [
        o for o in outcomes if not isinstance(o, PutStatus | str)
    ][:3]
    with pytest.raises(StoreClosedError):
        blocking.get("late")
    with pytest.raises(StoreClosedError):
        blocking.submit(slow)
    with pytest.raises(StoreClosedError):
        blocking.stats()
    blocking.close()  # again: nothing happens
    assert blocking.closed
    assert set(threading.enumerate()) <= before
    assert not blocking.loop.is_running() and blocking.loop.is_closed()


def test_close_with_a_timeout_cancels_what_still_runs(tmp_path: Path) -> None:
    blocking = BlockingStore(cascade_config(tmp_path), thread_name="lmtier-stuck")

    async def stuck(s: TieredStore) -> None:
        await asyncio.sleep(60)

    future = blocking.submit(stuck)
    began = time.monotonic()
    blocking.close(timeout=0.3)
    assert time.monotonic() - began < 50  # the call sleeps 60 s: it was not waited for
    assert future.cancelled()
    assert not _lmtier_threads("lmtier-stuck")


def test_a_collected_store_stops_its_thread(tmp_path: Path) -> None:
    blocking = BlockingStore(cascade_config(tmp_path), thread_name="lmtier-gc")
    blocking.put("a", tensor_for("a"))
    thread = blocking._runner.thread
    del blocking
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_a_store_left_open_at_exit_does_not_hang(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import torch
        from lmtier.integrations.blocking import BlockingStore
        config = {{"tiers": [
            {{"name": "cpu", "kind": "memory", "device": "cpu", "max_size_mb": 1}},
            {{"name": "disk", "kind": "disk", "path": {str(tmp_path / "disk")!r},
              "max_size_mb": 4, "durability": "none"}},
        ]}}
        store = BlockingStore(config)
        for i in range(64):
            store.put(f"k{{i}}", torch.full((8192,), i, dtype=torch.int32))
        keep = [store]  # still referenced at exit
        print("done", flush=True)
        """
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert done.returncode == 0, done.stderr
    assert "done" in done.stdout
    assert list((tmp_path / "disk").rglob("*"))  # the disk tier was used and left readable


def test_a_mapping_config_is_validated_as_a_file_is(tmp_path: Path) -> None:
    config = {
        "promote_on_hit": False,
        "tiers": [
            {"name": "cpu", "kind": "memory", "device": "cpu", "max_size_mb": 1},
            {"name": "disk", "kind": "disk", "path": str(tmp_path / "d"), "max_size_mb": 2},
        ],
    }
    with BlockingStore(config, thread_name="lmtier-map") as blocking:
        assert blocking.store.config.promote_on_hit is False
        blocking.put("a", tensor_for("a"))
        assert torch.equal(blocking.get("a"), tensor_for("a"))
    before = set(threading.enumerate())
    bad = {"tiers": [{"name": "cpu", "kind": "memory", "device": "cpu", "max_size_mb": -1}]}
    with pytest.raises(ConfigError, match="max_size_mb"):
        BlockingStore(bad)
    with pytest.raises(ConfigError, match="colour"):
        BlockingStore({**config, "colour": "blue"})
    with pytest.raises(LmtierTypeError):
        BlockingStore(42)  # type: ignore[arg-type]
    assert set(threading.enumerate()) <= before


def test_a_mapping_takes_env_overrides_as_a_file_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMTIER_PROMOTE_ON_HIT", "false")
    config = {"tiers": [{"name": "cpu", "kind": "memory", "device": "cpu", "max_size_mb": 1}]}
    with BlockingStore(config) as blocking:
        assert blocking.store.config.promote_on_hit is False


def test_a_yaml_path_config(tmp_path: Path) -> None:
    path = tmp_path / "store.yaml"
    path.write_text(
        f"tiers:\n  - {{name: disk, kind: disk, path: {tmp_path / 'd'}, max_size_mb: 1}}\n"
    )
    with BlockingStore(str(path)) as blocking:
        blocking.put("a", tensor_for("a"))
        assert blocking.contains("a") == "disk"
    with pytest.raises(ConfigError, match="not found"):
        BlockingStore(tmp_path / "missing.yaml")


def test_a_failed_open_is_raised_in_the_caller_and_stops_the_thread(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = {"tiers": [{"name": "disk", "kind": "disk", "path": str(blocker), "max_size_mb": 1}]}
    before = set(threading.enumerate())
    with pytest.raises(Exception) as caught:
        BlockingStore(config, thread_name="lmtier-fail")
    assert not isinstance(caught.value, RuntimeError | TimeoutError)
    assert set(threading.enumerate()) <= before
