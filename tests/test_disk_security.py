"""The disk tier is private by default and refuses a folder another local user can tamper with.

Tests marked ``as_second_user`` run as root and fork a child that becomes ``nobody`` (uid
65534) to try what another user of the machine would: read entries, list folders, hold the
lock, make the folder first, plant links.  The rest need no second user.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pickle
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lmtier.cli.inspect import inspect_path
from lmtier.errors import ConfigError, StorageError
from lmtier.testing import lru, store_in
from lmtier.tiers import DiskTier
from lmtier.tiers.disk_files import LOCK_NAME, namespace_folder

from conftest import tensor_for

NOBODY = 65534

as_second_user = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="switching to a second user (nobody, uid 65534) needs root",
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def tier_with(root: Path, keys: str, mode: int = 0o600) -> DiskTier:
    tier = DiskTier("disk", lru(1 << 20), root, mode=mode)
    await tier.open()
    for key in keys:
        await store_in(tier, key, tensor_for(key))
    return tier


async def reopen(root: Path, mode: int = 0o600) -> DiskTier:
    tier = DiskTier("disk", lru(1 << 20), root, mode=mode)
    await tier.open()
    return tier


def files_and_folders(root: Path) -> tuple[list[Path], list[Path]]:
    everything = [root, *root.rglob("*")]
    return [p for p in everything if p.is_file()], [p for p in everything if p.is_dir()]


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------- as a second user


def _become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def as_nobody(action: Callable[[], object]) -> object:
    """Run ``action`` in a forked child that is uid/gid 65534; what it returned, or the
    ``OSError`` errno it raised as ``("errno", name)``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain os calls only, then _exit
        try:
            os.close(read_end)
            try:
                _become_nobody()
                answer: object = action()
            except OSError as exc:
                answer = ("errno", errno.errorcode.get(exc.errno or 0, str(exc)))
            os.write(write_end, pickle.dumps(answer))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer_pipe:
        data = answer_pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the second user's child failed"
    return pickle.loads(data)


@contextmanager
def nobody_holding(path: Path) -> Iterator[object]:
    """A child as uid 65534 that tries to open and flock ``path``, holding it until the block
    ends; yields ``"held"`` or its ``("errno", name)``."""
    answer_read, answer_write = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(answer_read)
            os.close(release_write)
            try:
                _become_nobody()
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                answer: object = "held"
            except OSError as exc:
                answer = ("errno", errno.errorcode.get(exc.errno or 0, str(exc)))
            os.write(answer_write, pickle.dumps(answer))
            os.close(answer_write)
            os.read(release_read, 1)  # until the parent lets go (or dies: EOF)
        finally:
            os._exit(0)
    os.close(answer_write)
    os.close(release_read)
    try:
        with os.fdopen(answer_read, "rb") as answer_pipe:
            yield pickle.loads(answer_pipe.read())
    finally:
        os.close(release_write)
        os.waitpid(pid, 0)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder like /tmp: world-writable with the sticky bit, reachable by every user."""
    folder = Path(tempfile.mkdtemp(prefix="lmtier-shared-"))
    try:
        os.chmod(folder, 0o1777)
        yield folder
    finally:
        shutil.rmtree(folder)


@as_second_user
async def test_another_user_reads_no_entry_lists_no_folder_holds_no_lock(shared: Path) -> None:
    tier = await tier_with(shared / "cache", "abc")
    try:
        entry = Path(tier.lookup("a").path)
        assert as_nobody(lambda: os.open(entry, os.O_RDONLY)) == ("errno", "EACCES")
        for folder in (shared / "cache", tier.root, entry.parent):
            assert as_nobody(lambda folder=folder: os.listdir(folder)) == ("errno", "EACCES")
        with nobody_holding(tier.root / LOCK_NAME) as held:
            assert held == ("errno", "EACCES")
    finally:
        await tier.close()


@as_second_user
@pytest.mark.parametrize("below", ["", "made/by/lmtier"])
async def test_a_folder_another_user_made_first_is_refused(shared: Path, below: str) -> None:
    """The other user makes the tier's path, or a folder lmtier would make the path in, first
    (as if waiting for the victim), open to all."""
    theirs = shared / "cache"
    assert as_nobody(lambda: os.mkdir(theirs, 0o777)) is None
    with pytest.raises(StorageError, match=rf"{theirs.name} is owned by uid 65534, not you"):
        await reopen(theirs / below)
    assert os.listdir(theirs) == []  # nothing of the victim's was made in it


@as_second_user
async def test_a_namespace_folder_another_user_made_with_a_held_lock_is_refused(
    shared: Path,
) -> None:
    """In a sticky folder the victim made, the other user makes the namespace folder first,
    with a lock file it holds: a refusal that says whose it is, not 'in use'."""
    path = shared / "cache"
    path.mkdir(mode=0o1777)
    os.chmod(path, 0o1777)
    folder = namespace_folder(path, "")

    def plant() -> None:
        os.mkdir(folder, 0o755)
        os.close(os.open(folder / LOCK_NAME, os.O_CREAT | os.O_WRONLY, 0o644))

    assert as_nobody(plant) is None
    with nobody_holding(folder / LOCK_NAME) as held:
        assert held == "held"
        with pytest.raises(StorageError, match=r"owned by uid 65534.*remove it"):
            await reopen(path)


@as_second_user
async def test_a_symlink_planted_as_lock_by_another_user_creates_nothing(
    shared: Path, tmp_path: Path
) -> None:
    path = shared / "cache"
    path.mkdir()
    os.chmod(path, 0o1777)
    folder = namespace_folder(path, "")
    target = tmp_path / "made-by-a-follower"

    def plant() -> None:
        os.mkdir(folder, 0o777)
        os.chmod(folder, 0o777)
        os.symlink(target, folder / LOCK_NAME)

    assert as_nobody(plant) is None
    with pytest.raises(StorageError, match="owned by uid 65534"):
        await reopen(path)
    assert not os.path.lexists(target)


@as_second_user
async def test_a_symlink_another_user_planted_as_the_path_is_refused(
    shared: Path, tmp_path: Path
) -> None:
    """The link would steer the victim's cache into a folder the other user chose."""
    chosen = tmp_path / "chosen"
    chosen.mkdir(mode=0o700)
    path = shared / "cache"
    assert as_nobody(lambda: os.symlink(chosen, path)) is None
    with pytest.raises(StorageError, match="symbolic link owned by uid 65534"):
        await reopen(path)
    assert list(chosen.iterdir()) == []


@as_second_user
async def test_a_shard_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    """Only a folder open to others (refused now) could have let another user make one."""
    tier = await tier_with(tmp_path / "cache", "a")
    shard = Path(tier.lookup("a").path).parent
    await tier.close()
    os.chown(shard, NOBODY, NOBODY)
    with pytest.raises(StorageError, match=rf"{shard.name} is owned by uid 65534"):
        await reopen(tmp_path / "cache")


@as_second_user
async def test_an_older_version_s_open_folder_is_closed_to_another_user(shared: Path) -> None:
    tier = await tier_with(shared / "cache", "ab")
    entry = Path(tier.lookup("a").path)
    await tier.close()
    for folder in (shared / "cache", tier.root, entry.parent):
        os.chmod(folder, 0o755)
    os.chmod(entry, 0o644)
    os.chmod(tier.root / LOCK_NAME, 0o644)
    assert as_nobody(lambda: os.open(entry, os.O_RDONLY) >= 0) is True  # the hole, before
    tier = await reopen(shared / "cache")
    try:
        assert as_nobody(lambda: os.open(entry, os.O_RDONLY)) == ("errno", "EACCES")
        with nobody_holding(tier.root / LOCK_NAME) as held:
            assert held == ("errno", "EACCES")
    finally:
        await tier.close()


# ---------------------------------------------------------------- without a second user


async def test_a_permissive_umask_leaves_folders_0700_and_files_0600(tmp_path: Path) -> None:
    path = tmp_path / "made" / "by" / "lmtier"
    with umask(0):
        tier = await tier_with(path, "abcdef")
    try:
        files, folders = files_and_folders(tmp_path / "made")
        assert len(files) == 7  # six entries and the lock
        assert {f.name for f in files} >= {LOCK_NAME}
        assert {mode_of(f) for f in files} == {0o600}
        assert len(folders) >= 4  # made, by, lmtier, the namespace folder, its shards
        assert {mode_of(f) for f in folders} == {0o700}
    finally:
        await tier.close()


@pytest.mark.parametrize("mask", [0o077, 0o022, 0])
async def test_mode_0640_gives_group_read_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        tier = await tier_with(tmp_path / "cache", "abc", mode=0o640)
    try:
        files, folders = files_and_folders(tmp_path / "cache")
        assert {mode_of(f) for f in files} == {0o640}
        assert {mode_of(f) for f in folders} == {0o750}
    finally:
        await tier.close()


async def test_mode_0660_makes_group_writable_folders_that_it_reopens(tmp_path: Path) -> None:
    with umask(0o022):
        tier = await tier_with(tmp_path / "cache", "a", mode=0o660)
    await tier.close()
    assert mode_of(tier.root) == 0o770
    await (await reopen(tmp_path / "cache", mode=0o660)).close()  # no refusal
    with pytest.raises(StorageError, match="writable by group"):
        await reopen(tmp_path / "cache")  # the default mode refuses what another may write


@pytest.mark.parametrize(
    ("loose", "who"), [(0o775, "group"), (0o757, "others"), (0o777, "group and others")]
)
async def test_a_namespace_folder_others_can_write_in_is_refused(
    tmp_path: Path, loose: int, who: str
) -> None:
    tier = await tier_with(tmp_path / "cache", "a")
    await tier.close()
    os.chmod(tier.root, loose)
    with pytest.raises(StorageError, match=rf"writable by {who} \(mode {oct(loose)}\).*chmod"):
        await reopen(tmp_path / "cache")
    assert mode_of(tier.root) == loose  # refused, not changed


async def test_a_path_others_can_write_in_needs_the_sticky_bit(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    path.mkdir()
    os.chmod(path, 0o777)
    with pytest.raises(StorageError, match=r"writable by group and others .* no sticky bit"):
        await reopen(path)
    assert os.listdir(path) == []
    os.chmod(path, 0o1777)  # like /tmp: only a folder's owner may rename it
    tier = await tier_with(path, "a")
    try:
        assert mode_of(tier.root) == 0o700
    finally:
        await tier.close()


async def test_a_parent_lmtier_makes_folders_in_is_checked(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    os.chmod(parent, 0o775)
    with pytest.raises(StorageError, match=r"parent is writable by group"):
        await reopen(parent / "a" / "cache")
    assert os.listdir(parent) == []


async def test_an_older_version_s_folder_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tier = await tier_with(tmp_path / "cache", "ab")
    await tier.close()
    shards = {Path(tier.lookup(k).path).parent for k in "ab"}
    for folder in (tier.root, *shards):
        os.chmod(folder, 0o755)
    os.chmod(tier.root / LOCK_NAME, 0o644)
    with caplog.at_level(logging.WARNING):
        tier = await reopen(tmp_path / "cache")
    try:
        assert len(tier.cache_dict) == 2
        assert {mode_of(f) for f in (tier.root, *shards)} == {0o700}
        assert mode_of(tier.root / LOCK_NAME) == 0o600
        warned = [r.getMessage() for r in caplog.records if "older lmtier" in r.getMessage()]
        assert len(warned) == 1 + len(shards)
        assert str(tier.root) in warned[0] and "0o755" in warned[0]
    finally:
        await tier.close()


@pytest.mark.parametrize("dangling", [True, False])
async def test_a_symlink_as_lock_is_refused_and_its_target_never_made(
    tmp_path: Path, dangling: bool
) -> None:
    tier = await tier_with(tmp_path / "cache", "a")
    await tier.close()
    target = tmp_path / "target"
    if not dangling:
        target.write_bytes(b"someone else's file")
        os.chmod(target, 0o644)
    (tier.root / LOCK_NAME).unlink()
    (tier.root / LOCK_NAME).symlink_to(target)
    with pytest.raises(StorageError, match=r"LOCK is a symbolic link, not followed"):
        await reopen(tmp_path / "cache")
    with pytest.raises(StorageError, match="symbolic link"):
        inspect_path(tmp_path / "cache", repair=True)
    if dangling:
        assert not os.path.lexists(target)
    else:
        assert target.read_bytes() == b"someone else's file"
        assert mode_of(target) == 0o644  # not taken for a lock file and tightened


async def test_a_fifo_as_lock_is_refused_not_waited_on(tmp_path: Path) -> None:
    tier = await tier_with(tmp_path / "cache", "a")
    await tier.close()
    (tier.root / LOCK_NAME).unlink()
    os.mkfifo(tier.root / LOCK_NAME, 0o600)
    with pytest.raises(StorageError, match=r"LOCK is not a regular file: remove it"):
        await reopen(tmp_path / "cache")


async def test_a_symlinked_namespace_folder_is_refused(tmp_path: Path) -> None:
    tier = await tier_with(tmp_path / "cache", "a")
    await tier.close()
    elsewhere = tmp_path / "elsewhere"
    tier.root.rename(elsewhere)
    tier.root.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StorageError, match="is a symbolic link: lmtier does not follow it"):
        await reopen(tmp_path / "cache")


async def test_a_symlink_of_your_own_on_the_path_is_followed_once(tmp_path: Path) -> None:
    """A link the user (or root) made is the user's choice: the path resolves through it."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    tier = await tier_with(tmp_path / "link" / "cache", "a")
    try:
        assert tier.root.parent == real / "cache"
        assert Path(tier.lookup("a").path).is_relative_to(real)
    finally:
        await tier.close()


@pytest.mark.parametrize("mode", [0o700, 0o400, 0o666, 0o4600, True, "0600", 384.0])
def test_a_mode_that_is_not_private_files_is_a_config_error(tmp_path: Path, mode: object) -> None:
    with pytest.raises(ConfigError, match="mode must hold owner read and write"):
        DiskTier("disk", lru(1 << 20), tmp_path, mode=mode)  # type: ignore[arg-type]


async def test_doing_what_a_refusal_says_makes_the_path_usable(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    path.mkdir()
    os.chmod(path, 0o777)
    tier = DiskTier("disk", lru(1 << 20), path)
    with pytest.raises(StorageError, match=rf"\(chmod go-w {re.escape(str(path))}\)"):
        await tier.open()
    os.chmod(path, 0o755)
    await tier.open()
    try:
        await store_in(tier, "a", tensor_for("a"))
        assert torch.equal(await tier.load(tier.lookup("a")), tensor_for("a"))
        assert mode_of(tier.root) == 0o700
    finally:
        await tier.close()
