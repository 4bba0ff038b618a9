"""Shared fixtures: a real S3 endpoint (moto server on 127.0.0.1), real local SLURM clusters, and
the no-skip rule for CI."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.registry import Registry, RunState
from orchestrator.testing.ray_cluster import RAY_TEST_ENV, RayCluster, start_ray_cluster
from orchestrator.testing.ray_cluster import available as ray_available
from orchestrator.testing.s3_server import start_s3_server
from orchestrator.testing.slurm_cluster import SlurmCluster, start_cluster
from orchestrator.testing.slurm_cluster import available as slurm_available

REQUIRE_ALL = os.environ.get("MAESTRO_REQUIRE_ALL") == "1"
# Runners look at the registry every 2 s instead of every 2 minutes, so cancels through the
# registry (Ray's path) and log uploads happen within a test's patience. Set before any runner
# is imported here, and inherited by every process the tests start (local, SLURM and Ray jobs).
os.environ.setdefault("MAESTRO_POLL_S", "2")


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


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback; the code under test reaches it through s3fs, unchanged."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        require("moto[server] and s3fs", False)
    try:
        server = start_s3_server()
    except RuntimeError as e:
        pytest.fail(str(e))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        yield server.endpoint
    server.stop()


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


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint: str) -> Iterator[RayCluster]:
    """A real Ray cluster on loopback, its own process group, stopped by signalling that process
    (never `ray stop`), and gone before other modules' tests run. Its nodes have their own
    credentials for the moto S3 endpoint."""
    require("ray (pip install -e .[ray])", ray_available())
    from orchestrator.testing.s3_server import TEST_CREDENTIALS

    cluster = start_ray_cluster(num_cpus=8, extra_env={"AWS_ENDPOINT_URL": s3_endpoint, **TEST_CREDENTIALS})
    try:
        with pytest.MonkeyPatch.context() as mp:
            # Only Ray's own settings: the cluster's OMP_NUM_THREADS=1 must not reach other tools here.
            for key, value in RAY_TEST_ENV.items():
                if key.startswith("RAY_"):
                    mp.setenv(key, value)
            yield cluster
    finally:
        cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that used the Ray cluster reports the cluster's and its jobs' logs: the
    fixture deletes them with the cluster, and a failure seen once in CI is otherwise blind."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    cluster = getattr(item, "funcargs", {}).get("ray_cluster")
    if report.failed and isinstance(cluster, RayCluster):
        report.sections.append(("Ray cluster logs", cluster.log_tail()))


REPO = Path(__file__).resolve().parents[1]
# The README quickstart's registry, its one run, and what the command printed.
Quickstart = tuple[Registry, RunState, str]


def readme_command(script: str) -> str:
    """The README's first-screen command that runs ``script``."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README has no bash block"
    [line] = [ln for ln in block.group(1).splitlines() if script in ln]
    return line.split("#")[0].strip()


@pytest.fixture(scope="session")
def readme_quickstart(tmp_path_factory: pytest.TempPathFactory) -> Quickstart:
    """The README's quickstart command, run exactly as written there, once per session: its test
    checks the run, and `maestro viz` is tested on the model it trained."""
    tmp = tmp_path_factory.mktemp("readme-quickstart")
    env = {**os.environ, "MAESTRO_ROOT": str(tmp / "runs"), "MAESTRO_STATE_DIR": str(tmp / "state")}
    proc = subprocess.run(["bash", "-c", readme_command("quickstart")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    registry = Registry(str(tmp / "runs"))
    [state] = registry.runs("quickstart")
    return registry, state, proc.stdout


@pytest.fixture(scope="session")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A labelled validation split: other crops of the demo photos than any training split here."""
    from eval_chain import build_held_out

    return build_held_out(str(tmp_path_factory.mktemp("val") / "demo-val"))
