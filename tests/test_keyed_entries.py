"""A secret (``auth_key``) on the disk and redis tiers: no planted bytes are ever served.

The attacker here is code without the secret: a second redis client (plain redis-py) or a
second local user writing files, both building entries with lmtier's own serde, so that each
plant is a well-formed entry that a tier without a secret would serve.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import lmtier.store as store_module
from lmtier import StoreConfig, TierConfig, TieredStore, serde
from lmtier.errors import ConfigError, CorruptEntryError, LmtierTypeError
from lmtier.keys import KeyLike
from lmtier.testing.tier import lru
from lmtier.tiers import Tier
from lmtier.tiers.disk import DiskTier

from conftest import tensor_for
from redis_helpers import RedisProcess

SECRET = b"test secret: 0123456789abcdef0123456789abcdef"
OTHER_SECRET = b"another secret: fedcba9876543210fedcba9876543210"
KIB = 1024


def planted(
    key: KeyLike, tensor: torch.Tensor, namespace: str = "", checksum: str | None = None
) -> bytes:
    """An entry built with lmtier's serde by code without the secret (unkeyed, or with a
    checksum of its choosing)."""
    payload = serde.payload_view(tensor.contiguous())
    shape, nbytes = tuple(tensor.shape), payload.nbytes
    if checksum is None:
        digest = serde.payload_digest(payload)
        checksum = serde.entry_checksum(key, tensor.dtype, shape, nbytes, digest, namespace)
    return serde.encode_header(key, tensor.dtype, shape, nbytes, checksum, namespace) + bytes(
        payload
    )


def store_over(monkeypatch: pytest.MonkeyPatch, *tiers: Tier) -> TieredStore:
    """A store over tiers built here (the config's own tier list is not used)."""
    monkeypatch.setattr(store_module, "build_tiers", lambda config: list(tiers))
    stand_in = (TierConfig("unused", "memory", KIB),)
    return TieredStore(StoreConfig(stand_in, room_timeout_s=5, promote_on_hit=False))


def disk_tier(root: Path, auth_key: bytes | None, budget: int = 64 * KIB) -> DiskTier:
    return DiskTier("disk", lru(budget), root, auth_key=auth_key)


def assert_served(got: torch.Tensor | None, expected: torch.Tensor) -> None:
    assert got is not None and torch.equal(got, expected)


# ---------------------------------------------------------------------- the checksums
def test_a_keyed_checksum_depends_on_the_secret_and_covers_header_and_payload() -> None:
    keyed, other = serde.EntryChecksums(SECRET), serde.EntryChecksums(OTHER_SECRET)
    tensor = tensor_for("k")
    payload = serde.payload_view(tensor)

    def checksum(checksums: serde.EntryChecksums, key: str = "k", shape: Any = (256,)) -> str:
        digest = checksums.payload_digest(payload)
        return checksums.entry_checksum(key, torch.int32, shape, 1024, digest, "ns")

    mine = checksum(keyed)
    assert len(mine) == serde.KEYED_CHECKSUM_CHARS
    assert mine == checksum(serde.EntryChecksums(SECRET))  # a function of the secret alone
    assert mine != checksum(other)
    assert mine != checksum(keyed, key="j") and mine != checksum(keyed, shape=(16, 16))
    hasher = keyed.payload_hasher()
    hasher.update(payload[:100])
    hasher.update(payload[100:])
    assert hasher.finish() == keyed.payload_digest(payload)  # one pass, piece by piece
    header = serde.decode_header(planted("k", tensor, "ns", checksum=mine))
    assert header.keyed
    keyed.check(header, keyed.payload_digest(payload), "entry")
    flipped = bytearray(payload)
    flipped[0] ^= 1
    with pytest.raises(CorruptEntryError, match="checksum mismatch"):
        keyed.check(header, keyed.payload_digest(flipped), "entry")
    with pytest.raises(CorruptEntryError, match="checksum mismatch"):
        other.check(header, other.payload_digest(payload), "entry")


def test_each_kind_refuses_the_other() -> None:
    tensor = tensor_for("k")
    unkeyed_header = serde.decode_header(planted("k", tensor))
    keyed = serde.EntryChecksums(SECRET)
    with pytest.raises(CorruptEntryError, match="without the tier's secret"):
        keyed.check(unkeyed_header, keyed.payload_digest(serde.payload_view(tensor)), "entry")
    forged = planted("k", tensor, checksum="0" * serde.KEYED_CHECKSUM_CHARS)
    with pytest.raises(CorruptEntryError, match="this tier has none"):
        serde.UNKEYED.check_kind(serde.decode_header(forged), "entry")
    # With no secret the format is today's: a 16-digit xxh3 checksum.
    assert not unkeyed_header.keyed and len(unkeyed_header.checksum) == serde.CHECKSUM_CHARS
    for digits in (15, 24, 33):  # a checksum of neither length is no entry's
        with pytest.raises(CorruptEntryError, match="hex digits"):
            serde.decode_header(planted("k", tensor, checksum="a" * digits))


def test_a_bad_secret_gets_a_clear_error_without_its_value() -> None:
    with pytest.raises(LmtierTypeError, match="auth_key must be bytes, got str") as raised:
        serde.EntryChecksums("a secret as text")  # type: ignore[arg-type]
    assert "a secret as text" not in str(raised.value)
    with pytest.raises(ConfigError, match="auth_key is empty"):
        serde.EntryChecksums(b"")


def test_a_secret_without_blake3_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "blake3", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'lmtier\[auth\]'"):
        serde.EntryChecksums(SECRET)
    assert not serde.EntryChecksums().keyed  # without a secret, blake3 is not needed


# ---------------------------------------------------------------------- disk
async def test_a_planted_disk_file_is_never_served_but_dropped_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files written by code without the secret, while the tier was closed: an unkeyed entry
    (which a tier without a secret serves) and one with a made-up keyed checksum."""
    async with store_over(monkeypatch, disk_tier(tmp_path, SECRET)) as store:
        await store.put("own", tensor_for("own"))
        disk = store.tiers[0]
        assert isinstance(disk, DiskTier)
        folder = disk.root
    fake = tensor_for("fake", version=1)
    files = {
        "unkeyed": planted("unkeyed", fake),
        "forged": planted("forged", fake, checksum="ab" * (serde.KEYED_CHECKSUM_CHARS // 2)),
    }
    paths = {}
    for key, data in files.items():
        path = disk.path_for(key)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        paths[key] = path

    async with store_over(monkeypatch, disk_tier(tmp_path, SECRET)) as store:
        disk = store.tiers[0]
        assert isinstance(disk, DiskTier) and disk.root == folder
        for key in files:
            assert await store.get(key) is None
        assert disk.counters.corrupt == len(files)
        assert_served(await store.get("own"), tensor_for("own"))
        assert store.audit() == []
    # Removals run in the background; closing waits for them.
    assert not any(path.exists() for path in paths.values()), "dropped: the files are removed"

    # The plant is well-formed: a tier without a secret (whose folder is another) serves it.
    plain = disk_tier(tmp_path, None)
    assert plain.root != folder, "each secret has a folder of its own"
    plain.path_for("unkeyed").parent.mkdir(parents=True)
    plain.path_for("unkeyed").write_bytes(files["unkeyed"])
    async with store_over(monkeypatch, plain) as store:
        assert_served(await store.get("unkeyed"), fake)


@pytest.mark.parametrize("read", ["loop", "thread"])
async def test_a_file_rewritten_under_its_own_header_is_never_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    """An entry's file rewritten in place with its own header (checksum included, so it
    matches the index) and another payload of the same size."""
    if read == "thread":
        monkeypatch.setattr("lmtier.tiers.disk.LOOP_READ_BYTES", -1)
    async with store_over(monkeypatch, disk_tier(tmp_path, SECRET)) as store:
        await store.put("k", tensor_for("k"))
        disk = store.tiers[0]
        (path,) = [Path(meta.path) for meta in disk.cache_dict.values()]
        data = path.read_bytes()
        start = serde.decode_header(data).payload_offset
        fake = tensor_for("k", version=1)
        path.write_bytes(data[:start] + bytes(serde.payload_view(fake)))
        out = torch.full_like(fake, 7)
        assert await store.get("k", out=out) is None
        assert not torch.equal(out, fake), "no planted byte is left in the caller's buffer"
        assert disk.counters.corrupt == 1 and store.audit() == []
    assert not path.exists()


async def test_a_restart_reindexes_its_own_entries_and_only_the_secret_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"k{i}" for i in range(6)]
    async with store_over(monkeypatch, disk_tier(tmp_path, SECRET)) as store:
        for key in keys:
            await store.put(key, tensor_for(key))

    reopened = disk_tier(tmp_path, SECRET)
    async with store_over(monkeypatch, reopened) as store:
        assert reopened.recovery.indexed == len(keys) and reopened.recovery.unreadable == 0
        for key in keys[:3]:
            assert_served(await store.get(key), tensor_for(key))
        assert reopened.counters.corrupt == 0

    # Another secret, or none, opens a folder of its own: a miss, and nothing is dropped.
    for secret, key in ((OTHER_SECRET, keys[3]), (None, keys[4])):
        stranger = disk_tier(tmp_path, secret)
        assert stranger.root != reopened.root
        async with store_over(monkeypatch, stranger) as store:
            assert await store.get(key) is None
            assert stranger.recovery.indexed == 0 and stranger.counters.corrupt == 0
    async with store_over(monkeypatch, disk_tier(tmp_path, SECRET)) as store:
        for key in keys:
            assert_served(await store.get(key), tensor_for(key))

    # Entries written without a secret stay readable by a tier without one (today's format is
    # unchanged); a tier with a secret does not see them.
    plain_root = tmp_path / "plain"
    async with store_over(monkeypatch, disk_tier(plain_root, None)) as store:
        await store.put("p", tensor_for("p"))
    async with store_over(monkeypatch, disk_tier(plain_root, None)) as store:
        assert_served(await store.get("p"), tensor_for("p"))
    async with store_over(monkeypatch, disk_tier(plain_root, SECRET)) as store:
        assert await store.get("p") is None


async def test_inspect_leaves_keyed_entries_alone(tmp_path: Path) -> None:
    """``lmtier inspect`` has no secret: it cannot verify a keyed entry, and a repair keeps it."""
    from lmtier.cli.inspect import inspect_path

    disk = disk_tier(tmp_path, SECRET)
    await disk.open()
    meta = disk.write_published("k", tensor_for("k"))
    await disk.close()
    (report,) = inspect_path(tmp_path, repair=True)
    assert report.removed == 0 and Path(meta.path).exists()
    assert [why for _, why in report.scan.left_alone] == [
        "a keyed entry: its checksum needs the secret"
    ]


# ---------------------------------------------------------------------- redis
def remote_tier(url: str, auth_key: bytes | None, namespace: str = "") -> Any:
    from lmtier.tiers.remote import RemoteTier

    return RemoteTier(
        "remote", lru(1 << 20), url, namespace=namespace, op_timeout_s=5, auth_key=auth_key
    )


@pytest.fixture
async def raw(redis_server: RedisProcess) -> AsyncIterator[Any]:
    """A second client on the server, without the secret: plain redis-py."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.mark.redis
async def test_a_value_planted_by_another_client_is_never_served(
    redis_server: RedisProcess, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tensor_for("k", version=1)
    keyed = remote_tier(redis_server.url, SECRET)
    async with store_over(monkeypatch, keyed) as store:
        name = keyed.name_for("k")
        for value in (planted("k", fake), planted("k", fake, checksum="0" * 32)):
            await raw.set(name, value)
            assert await store.get("k") is None
        assert keyed.counters.corrupt == 2 and keyed.cache_dict == {}
        assert store.audit() == []

        # An indexed entry whose value is replaced by its own header and another payload.
        await store.put("j", tensor_for("j"))
        value = await raw.get(keyed.name_for("j"))
        start = serde.decode_header(value).payload_offset
        await raw.set(keyed.name_for("j"), value[:start] + bytes(serde.payload_view(fake)))
        assert await store.get("j") is None
        assert keyed.counters.corrupt == 3 and store.audit() == []

    # The plant is well-formed: under the name a tier without a secret uses, it is served.
    plain = remote_tier(redis_server.url, None)
    await raw.set(plain.name_for("k"), planted("k", fake))
    async with store_over(monkeypatch, plain) as store:
        assert_served(await store.get("k"), fake)


@pytest.mark.redis
async def test_different_secrets_never_read_or_delete_each_others_values(
    redis_server: RedisProcess, raw: Any
) -> None:
    secrets = {"one": SECRET, "two": OTHER_SECRET, "none": None}
    writers = {owner: remote_tier(redis_server.url, s) for owner, s in secrets.items()}
    readers = {owner: remote_tier(redis_server.url, s) for owner, s in secrets.items()}
    prefixes = {tier.key_prefix for tier in writers.values()}
    assert len(prefixes) == 3
    for prefix in prefixes:  # no tier's SCAN pattern matches another's names
        assert not any(other.startswith(prefix + ":") for other in prefixes)
    try:
        for tier in [*writers.values(), *readers.values()]:
            await tier.open()
        for owner, tier in writers.items():
            await tier.write("k", tensor_for("k", version=len(owner)))
        for owner, tier in readers.items():
            fetched = await tier.fetch("k")
            assert fetched is not None, f"{owner} finds its own secret's value"
            assert torch.equal(fetched[1], tensor_for("k", version=len(owner)))
            assert tier.counters.corrupt == 0, "no tier ever read another's value"

        assert await readers["one"].clear_prefix() == 1
        assert await readers["none"].clear_prefix() == 1
        assert await raw.exists(writers["two"].name_for("k")) == 1
        assert await readers["one"].fetch("k") is None
        assert await readers["none"].fetch("k") is None
        fetched = await readers["two"].fetch("k")
        assert fetched is not None and torch.equal(fetched[1], tensor_for("k", version=3))
        assert await raw.dbsize() == 1
    finally:
        for tier in [*writers.values(), *readers.values()]:
            await tier.close()


@pytest.mark.redis
async def test_the_same_secret_shares_values(
    redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = remote_tier(redis_server.url, SECRET, namespace="model-a")
    reader = remote_tier(redis_server.url, SECRET, namespace="model-a")
    assert reader.name_for("k") == writer.name_for("k")
    await writer.open()
    try:
        await writer.write("k", tensor_for("k"))
        async with store_over(monkeypatch, reader) as store:
            assert_served(await store.get("k"), tensor_for("k"))
            assert reader.counters.corrupt == 0
    finally:
        await writer.close()


@pytest.mark.redis
async def test_a_value_of_the_other_kind_under_our_name_is_a_counted_miss(
    redis_server: RedisProcess, raw: Any
) -> None:
    """A keyed value copied under the name a tier without a secret reads, and the other way
    round: a miss, counted as corrupt, never a crash or wrong data."""
    tiers = [remote_tier(redis_server.url, secret) for secret in (SECRET, None) for _ in "wr"]
    keyed_writer, keyed, plain_writer, plain = tiers
    try:
        for tier in tiers:
            await tier.open()
        await keyed_writer.write("k", tensor_for("k"))
        await plain_writer.write("k", tensor_for("k"))
        keyed_value = await raw.get(keyed.name_for("k"))
        plain_value = await raw.get(plain.name_for("k"))
        await raw.set(plain.name_for("k"), keyed_value)
        await raw.set(keyed.name_for("k"), plain_value)
        assert await plain.fetch("k") is None and plain.counters.corrupt == 1
        assert await keyed.fetch("k") is None and keyed.counters.corrupt == 1
    finally:
        for tier in tiers:
            await tier.close()


# ---------------------------------------------------------------------- the secret stays secret
def secret_texts() -> Iterator[str]:
    for secret in (SECRET, OTHER_SECRET):
        yield secret.decode()
        yield secret.hex()
        yield repr(secret)


@pytest.mark.redis
async def test_the_secret_never_shows_in_a_repr_a_log_or_an_error(
    tmp_path: Path,
    redis_server: RedisProcess,
    raw: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    disk = disk_tier(tmp_path, SECRET)
    remote = remote_tier(redis_server.url, SECRET)
    async with store_over(monkeypatch, disk, remote) as store:
        await store.put("k", tensor_for("k", numel=16 * KIB))  # to the disk tier
        (meta,) = disk.cache_dict.values()
        Path(meta.path).write_bytes(planted("k", tensor_for("k", numel=16 * KIB)))
        await raw.set(remote.name_for("j"), planted("j", tensor_for("j")))
        assert await store.get("k") is None and await store.get("j") is None
        texts += [repr(disk), repr(remote), repr(vars(disk)), repr(vars(remote))]
        texts += [repr(store.stats()), repr(store.config)]
        for checksums in (serde.EntryChecksums(SECRET), serde.EntryChecksums(OTHER_SECRET)):
            texts.append(repr(checksums))
            with pytest.raises(TypeError) as refused:
                pickle.dumps(checksums)
            texts.append(str(refused.value))
    for tier in (disk, remote):
        header = serde.decode_header(planted("k", tensor_for("k")))
        with pytest.raises(CorruptEntryError) as raised:
            tier._checksums.check(header, 0, "entry")
        texts.append(str(raised.value))
    texts += [record.getMessage() for record in caplog.records]
    assert any("dropped" in text for text in texts)  # the drops were logged
    for text in texts:
        for secret in secret_texts():
            assert secret not in text
