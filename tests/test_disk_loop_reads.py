"""Small disk reads served on the event loop from the page cache, and every way that falls back
to the worker thread: pages not cached, a short read, a filesystem without RWF_NOWAIT, and files
changed behind the store's back (whatever is wrong with them is judged by the thread path)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import StoreConfig, TierConfig, TieredStore
from lmtier.tiers import DiskTier
from lmtier.tiers import disk as disk_module

from conftest import tensor_for

KIB = 1024
pytestmark = pytest.mark.skipif(
    not getattr(os, "RWF_NOWAIT", 0), reason="this platform has no RWF_NOWAIT reads"
)


def disk_store(root: Path) -> TieredStore:
    return TieredStore(StoreConfig((TierConfig("disk", "disk", 64 * KIB, path=str(root)),)))


@pytest.fixture
def thread_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths of the reads that went to the worker thread (``_read_file``)."""
    paths: list[str] = []
    real = DiskTier._read_file

    def counted(self: DiskTier, meta: Any, out: torch.Tensor | None = None) -> Any:
        paths.append(meta.path)
        return real(self, meta, out)

    monkeypatch.setattr(DiskTier, "_read_file", counted)
    yield paths


def disk_of(store: TieredStore) -> DiskTier:
    tier = store.tiers[0]
    assert isinstance(tier, DiskTier)
    return tier


async def test_a_cached_entry_is_read_on_the_loop(tmp_path: Path, thread_reads: list[str]) -> None:
    async with disk_store(tmp_path) as store:
        await store.put("a", tensor_for("a"))
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("a"))
        out = torch.empty_like(tensor_for("a"))
        assert await store.get("a", out=out) is out and torch.equal(out, tensor_for("a"))
        assert thread_reads == [], "no thread hop for bytes the page cache holds"
        assert store.audit() == []


@pytest.mark.parametrize("fault", ["EAGAIN", "short", "EOPNOTSUPP"])
async def test_what_the_loop_cannot_read_whole_is_read_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_reads: list[str], fault: str
) -> None:
    real_preadv = os.preadv

    def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags and fault == "short":
            return int(real_preadv(fd, [buffers[0]], offset, flags))  # the payload not cached
        if flags:
            raise OSError(getattr(errno, fault), os.strerror(getattr(errno, fault)))
        return int(real_preadv(fd, buffers, offset, flags))

    async with disk_store(tmp_path) as store:
        await store.put("a", tensor_for("a"))
        monkeypatch.setattr(os, "preadv", preadv)
        for _ in range(2):
            got = await store.get("a")
            assert got is not None and torch.equal(got, tensor_for("a"))
        assert len(thread_reads) == 2
        # A filesystem that cannot answer RWF_NOWAIT is not asked again; a cache miss is.
        assert disk_of(store)._nowait_reads is (fault != "EOPNOTSUPP")
        assert disk_of(store).counters.errors == 0 and store.audit() == []


async def test_entries_over_the_loop_size_are_read_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_reads: list[str]
) -> None:
    monkeypatch.setattr(disk_module, "LOOP_READ_BYTES", 512)
    async with disk_store(tmp_path) as store:
        small, large = tensor_for("s", numel=128), tensor_for("l", numel=256)  # 512 B, 1 KiB
        await store.put("s", small)
        await store.put("l", large)
        for key, value in (("s", small), ("l", large)):
            got = await store.get(key)
            assert got is not None and torch.equal(got, value)
        assert thread_reads == [disk_of(store).lookup("l").path]


def rewrite(path: Path, change: str) -> None:
    data = bytearray(path.read_bytes())
    if change == "payload byte":
        data[-1] ^= 0xFF
    elif change == "header byte":  # a field of the same length: the dtype's letter
        at = data.index(b'"dtype":"I32"')
        data[at + 10] = ord("U")
    elif change == "appended":
        data += b"\0" * 8
    elif change == "truncated":
        del data[-8:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("change", ["payload byte", "header byte", "truncated"])
async def test_a_changed_file_is_judged_by_the_thread_and_never_served(
    tmp_path: Path, thread_reads: list[str], change: str
) -> None:
    async with disk_store(tmp_path) as store:
        await store.put("a", tensor_for("a"))
        path = Path(disk_of(store).lookup("a").path)
        rewrite(path, change)
        assert await store.get("a") is None
        assert thread_reads == [str(path)], "the loop read handed it over"
        assert disk_of(store).counters.corrupt == 1 and await store.contains("a") is None
        assert store.audit() == []
    assert not path.exists(), "the bad file is removed (by the time the store closed)"


async def test_bytes_appended_behind_the_store_are_not_read_as_its_header(
    tmp_path: Path, thread_reads: list[str]
) -> None:
    """The loop reads the header as the bytes before the payload the index knows; a longer
    file misplaces it, so the thread reads the file as its header describes."""
    async with disk_store(tmp_path) as store:
        await store.put("a", tensor_for("a"))
        path = Path(disk_of(store).lookup("a").path)
        rewrite(path, "appended")
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("a"))
        assert thread_reads == [str(path)]


@pytest.mark.parametrize("hostile", ["symlink", "fifo", "folder"])
async def test_a_file_replaced_by_a_hostile_thing_is_never_read_through(
    tmp_path: Path, thread_reads: list[str], hostile: str
) -> None:
    outside = tmp_path / "outside"
    async with disk_store(tmp_path / "tier") as store:
        await store.put("a", tensor_for("a"))
        await store.put("b", tensor_for("b"))
        path = Path(disk_of(store).lookup("a").path)
        os.replace(disk_of(store).lookup("b").path, outside)  # an intact entry, elsewhere
        path.unlink()
        if hostile == "symlink":
            path.symlink_to(outside)
        elif hostile == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()
        assert await store.get("a") is None  # neither hangs nor serves b's bytes
        assert thread_reads == [str(path)]
        assert await store.contains("a") is None and store.audit() == []
        assert outside.exists() and os.path.lexists(path), "only the tier's own files go"
