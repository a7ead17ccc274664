"""The redis tier over TLS (rediss://) against a real redis-server with a TLS port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmtier import PutStatus, StoreConfig, TieredStore
from lmtier.config import parse_config
from lmtier.errors import ConfigError
from lmtier.tiers.redis_connections import READ_LIMIT

from redis_helpers import (
    RedisProcess,
    free_port,
    make_tls_files,
    need_redis,
    remote_spec,
    tls_server_args,
)

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


class TLSServer(RedisProcess):
    """A redis-server with a TLS port beside its plain one (which the helpers use)."""

    def __init__(self, folder: Path, files: dict[str, Path], clients_need_certs: bool) -> None:
        need_redis()
        self.tls_port = free_port()
        super().__init__(folder, None, *tls_server_args(files, self.tls_port, clients_need_certs))

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}"


@pytest.fixture
def server(tmp_path: Path, tls_files: dict[str, Path]) -> Iterator[TLSServer]:
    process = TLSServer(tmp_path / "redis", tls_files, clients_need_certs=False)
    process.start()
    yield process
    process.kill()


def tls_store(process: TLSServer, **fields: object) -> TieredStore:
    return TieredStore(StoreConfig((remote_spec(process.tls_url, **fields),)))


async def test_a_rediss_tier_stores_and_reads_back_over_tls(
    server: TLSServer, tls_files: dict[str, Path]
) -> None:
    tensor = torch.randn(8, 32)
    async with tls_store(server, tls_ca_file=str(tls_files["ca"])) as store:
        assert await store.put("k", tensor) is PutStatus.LEGAL
        got = await store.get("k")
        assert got is not None and torch.equal(got, tensor)
        assert store.tiers[0].stats()["available"]
        # Its connections are the tier's own kind, whose reader takes large values in large steps.
        client = store.tiers[0]._client  # type: ignore[attr-defined]
        (connection,) = client.connection_pool._available_connections
        assert connection._reader._limit == READ_LIMIT
    # The value went through the TLS port into the same server the plain port serves.
    assert int(server.cli("dbsize")) == 1


async def test_a_server_certificate_from_an_unknown_ca_is_refused(server: TLSServer) -> None:
    async with tls_store(server) as store:  # the system's CAs never signed the test CA
        assert await store.put("k", torch.ones(4)) is PutStatus.ILLEGAL
        tier = store.tiers[0]
        assert not tier.stats()["available"]
        assert tier.counters.unavailable >= 1
    assert int(server.cli("dbsize")) == 0


async def test_a_server_that_asks_for_client_certificates_gets_ours(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    process = TLSServer(tmp_path / "mtls", tls_files, clients_need_certs=True)
    process.start()
    try:
        async with tls_store(process, tls_ca_file=str(tls_files["ca"])) as store:
            assert await store.put("k", torch.ones(4)) is PutStatus.ILLEGAL  # no certificate
        certificate = {
            "tls_cert_file": str(tls_files["client_cert"]),
            "tls_key_file": str(tls_files["client_key"]),
        }
        async with tls_store(process, tls_ca_file=str(tls_files["ca"]), **certificate) as store:
            assert await store.put("k", torch.ones(4)) is PutStatus.LEGAL
            got = await store.get("k")
            assert got is not None and torch.equal(got, torch.ones(4))
    finally:
        process.kill()


def _config(**fields: object) -> dict[str, object]:
    tier = {"name": "remote", "kind": "redis", "max_size_mb": 1, **fields}
    return {"tiers": [tier]}


def test_tls_files_need_a_rediss_url(tls_files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="needs a rediss:// url"):
        parse_config(_config(url="redis://h:1", tls_ca_file=str(tls_files["ca"])))


def test_a_client_certificate_needs_its_key(tls_files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="go together"):
        parse_config(_config(url="rediss://h:1", tls_cert_file=str(tls_files["client_cert"])))


def test_a_missing_tls_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.crt"
    with pytest.raises(ConfigError, match="no file at") as info:
        parse_config(_config(url="rediss://h:1", tls_ca_file=str(missing)))
    assert str(missing) in str(info.value)


def test_tls_files_reach_the_tier_config(tls_files: dict[str, Path]) -> None:
    config = parse_config(
        _config(
            url="rediss://h:1",
            tls_ca_file=str(tls_files["ca"]),
            tls_cert_file=str(tls_files["client_cert"]),
            tls_key_file=str(tls_files["client_key"]),
        )
    )
    tier = config.tiers[0]
    assert (tier.tls_ca_file, tier.tls_cert_file, tier.tls_key_file) == (
        str(tls_files["ca"]),
        str(tls_files["client_cert"]),
        str(tls_files["client_key"]),
    )
