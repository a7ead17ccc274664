"""The store against a reference model of the cascade, over random operation sequences."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmtier import PutStatus

from conftest import tensor_for
from store_helpers import KIB, make_store

KEYS = st.sampled_from([f"k{i}" for i in range(24)])
NUMELS = st.sampled_from([64, 256, 512, 1024, 2048, 5000])  # 256 B .. ~20 KiB
TOP_BUDGET = 4 * KIB


class StoreModel(RuleBasedStateMachine):
    """``expected`` holds what a get must return; a drop reported by ``on_drop`` removes it."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = tempfile.TemporaryDirectory()
        self.store, self.drops = make_store(Path(self.folder.name))
        self.expected: dict[str, torch.Tensor] = {}
        self.version = 0

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def forget_dropped(self) -> None:
        for key in self.drops.keys:
            self.expected.pop(key, None)  # type: ignore[call-overload]
        self.drops.keys.clear()

    @rule(key=KEYS, numel=NUMELS)
    def put(self, key: str, numel: int) -> None:
        self.version += 1
        tensor = tensor_for(key, self.version, numel)
        status = self.run(self.store.put(key, tensor))
        self.forget_dropped()
        nbytes = numel * 4
        assert status is (PutStatus.LEGAL if nbytes <= 16 * KIB else PutStatus.ILLEGAL)
        if status is PutStatus.LEGAL:
            self.expected[key] = tensor
            where = self.run(self.store.contains(key))
            assert where == (
                "gpu" if nbytes <= TOP_BUDGET else "cpu" if nbytes <= 8 * KIB else "disk"
            )

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        got = self.run(self.store.get(key))
        self.forget_dropped()
        if key not in self.expected:
            assert got is None
            return
        assert got is not None, f"{key} was lost"
        assert torch.equal(got, self.expected[key])
        if got.numel() * 4 <= TOP_BUDGET:
            assert self.run(self.store.contains(key)) == "gpu"

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        assert self.run(self.store.delete(key)) == (key in self.expected)
        self.expected.pop(key, None)

    @precondition(lambda self: bool(self.expected))
    @rule(data=st.data())
    def contains(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.expected)))
        assert self.run(self.store.contains(key)) is not None

    @invariant()
    def invariants_hold(self) -> None:
        assert self.store.audit() == []
        assert self.store.stats()["entries"] == len(self.expected)

    def teardown(self) -> None:
        self.run(self.store.close())
        disk = Path(self.folder.name) / "disk"
        files = list(disk.rglob("*.safetensors")) if disk.exists() else []
        assert len(files) == self.store.stats()["tiers"]["disk"]["entries"]
        self.loop.close()
        self.folder.cleanup()


StoreModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_store_matches_the_model = StoreModel.TestCase
