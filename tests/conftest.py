"""Shared fixtures: a real S3 endpoint (moto server on 127.0.0.1), real local SLURM clusters, and
the no-skip rule for CI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from slurm_cluster import SlurmCluster, start_cluster
from slurm_cluster import available as slurm_available

REQUIRE_ALL = os.environ.get("MAESTRO_REQUIRE_ALL") == "1"


def require(component: str, available: bool) -> None:
    """Skip when a component is missing, except in CI, where a missing component is a failure."""
    if available:
        return
    if REQUIRE_ALL:
        pytest.fail(f"{component} is missing but MAESTRO_REQUIRE_ALL=1 demands it")
    pytest.skip(f"{component} is not installed")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if REQUIRE_ALL and skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback; the code under test reaches it through s3fs, unchanged."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        require("moto[server] and s3fs", False)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """A fresh bucket per test, as an ``s3://`` URL prefix."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    name = f"maestro-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()



def _running_cluster(nodes: int) -> Iterator[SlurmCluster]:
    require("SLURM with slurmdbd and MariaDB (scripts/local_slurm.sh install), as root", slurm_available())
    cluster = start_cluster(nodes)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in cluster.env.items():
                mp.setenv(key, value)
            yield cluster
    finally:
        cluster.stop()


# One cluster per layout and test class, torn down with it, so two never run side by side.
@pytest.fixture(scope="class")
def one_node() -> Iterator[SlurmCluster]:
    yield from _running_cluster(1)


@pytest.fixture(scope="class")
def two_nodes() -> Iterator[SlurmCluster]:
    yield from _running_cluster(2)
