"""Real redis-server processes on loopback ports for the remote tier's tests (no mocks).

Tests that need one skip when ``redis-server`` is not installed, unless
``REQUIRE_REDIS_TESTS=1`` (CI sets it) makes them fail instead.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from lmtier import TierConfig

REQUIRE_ENV = "REQUIRE_REDIS_TESTS"


def need_redis() -> None:
    """Skip (or, with REQUIRE_REDIS_TESTS=1, fail) unless redis-server and redis-py exist."""
    missing = []
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        missing.append("redis-server (apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        missing.append("redis-py (pip install 'lmtier[redis]')")
    if not missing:
        return
    why = f"needs {' and '.join(missing)}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{why}, and {REQUIRE_ENV}=1", pytrace=False)
    pytest.skip(f"{why}; set {REQUIRE_ENV}=1 to fail instead")


# A round trip to a healthy server on loopback never takes this long, however loaded the
# machine: a test that wants a timeout to fire (a stopped server) sets a short one itself.
# A server that is down refuses connections at once and needs no timeout to be noticed.
ROUND_TRIP_MARGIN_S = 10.0


def remote_spec(url: str, budget: int = 1 << 20, **fields: object) -> TierConfig:
    """A redis tier that reconnects quickly, with timeouts a loaded machine keeps."""
    defaults = {
        "connect_timeout_s": ROUND_TRIP_MARGIN_S,
        "op_timeout_s": ROUND_TRIP_MARGIN_S,
        "reconnect_max_s": 0.2,
    }
    return TierConfig("remote", "redis", budget, url=url, **{**defaults, **fields})  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too, as cluster nodes need."""
    rng = random.Random()
    while True:
        port = rng.randrange(20_000, 45_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port


class RedisProcess:
    """One redis-server on 127.0.0.1, without persistence, in its own folder."""

    def __init__(self, folder: Path, port: int | None = None, *args: str) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisProcess:
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.folder), *self.args]
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while self.cli("ping", check=False) != "PONG":
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on {self.port} did not start: {self.log()}")
            time.sleep(0.02)
        return self

    def cli(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=check,
        )
        return done.stdout.strip()

    def kill(self) -> None:
        """SIGKILL: the server dies with its data, as a crashed machine would."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process dies only when resumed
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections but answers nothing (a slow server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def start_cluster(folder: Path, masters: int = 3) -> list[RedisProcess]:
    """``masters`` cluster-enabled servers joined by ``redis-cli --cluster create``."""
    nodes: list[RedisProcess] = []
    try:
        for i in range(masters):
            node = RedisProcess(
                folder / f"node{i}", free_cluster_port(), "--cluster-enabled", "yes",
                "--cluster-config-file", str(folder / f"node{i}" / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            )  # fmt: skip
            nodes.append(node)
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=30,
            check=True,
        )
        deadline = time.monotonic() + 20
        while not all("cluster_state:ok" in n.cli("cluster", "info") for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


def make_tls_files(folder: Path) -> dict[str, Path]:
    """A throwaway CA, and a server and a client certificate it signed (for 127.0.0.1), made
    with the openssl program: ``{"ca", "server_cert", "server_key", "client_cert",
    "client_key"}``."""
    if shutil.which("openssl") is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"needs the openssl program, and {REQUIRE_ENV}=1", pytrace=False)
        pytest.skip("needs the openssl program")
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, capture_output=True, check=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=lmtier test CA")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for who in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr",
                "-subj", f"/CN=lmtier test {who}")  # fmt: skip
        signing = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.ext"]
        openssl("x509", "-req", "-in", f"{who}.csr", *signing, "-out", f"{who}.crt", "-days", "2")
    return {
        "ca": folder / "ca.crt",
        **{f"{who}_{part}": folder / f"{who}.{ext}" for who in ("server", "client")
           for part, ext in (("cert", "crt"), ("key", "key"))},
    }  # fmt: skip


def tls_server_args(files: dict[str, Path], port: int, clients_need_certs: bool) -> list[str]:
    """redis-server arguments for a TLS port beside the plain one (which the helpers use)."""
    return [
        "--tls-port", str(port), "--tls-cert-file", str(files["server_cert"]),
        "--tls-key-file", str(files["server_key"]), "--tls-ca-cert-file", str(files["ca"]),
        "--tls-auth-clients", "yes" if clients_need_certs else "no",
    ]  # fmt: skip
