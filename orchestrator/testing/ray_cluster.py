"""Start and stop a real local Ray cluster bound to loopback, for pytest fixtures and benchmarks.

The cluster is one ``ray start --head --block`` process in its own session. Stopping it sends that
process SIGTERM: its handler stops only the processes of its own node. ``ray stop`` is never used,
because it kills every Ray process on the machine, other people's clusters included.

Neither ray nor torch is imported at module import (nor by ``start_ray_cluster``): importing ray
reads settings such as ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, so a test process must merge
``RayCluster.env`` (or ``RAY_TEST_ENV``) into ``os.environ`` before its first ``import ray``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

RAY_TEST_ENV: dict[str, str] = {
    # On Linux Ray ignores --node-ip-address=127.0.0.1 and registers (and listens on) the machine's
    # routable address unless this is 0; then everything binds to loopback. Every Ray process needs
    # it (cluster, drivers, the test process): a driver without it tries the other address and hangs.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # A fresh ray.init() otherwise turns token auth on and writes ~/.ray/auth_token, after which
    # other clusters and drivers on this machine fail with InvalidAuthToken.
    "RAY_AUTH_MODE": "disabled",
    # No network here, and tests must not phone home.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Each worker gets its own process group, killed with the worker: children a Train worker spawns
    # (the training processes) die with it instead of outliving it.
    "RAY_process_group_cleanup_enabled": "1",
    # The machine has 2 cores shared with other work; one thread per process keeps several workers
    # (and the drivers, which Ray does not limit) from oversubscribing it.
    "OMP_NUM_THREADS": "1",
    # On SIGTERM `ray start` first drains the node and waits up to 30 s for every worker lease to
    # return. Train V2 leaves a detached actor (AutoscalingCoordinator) behind, so after any Train
    # run stop() took the full 30 s. A test cluster has nothing to drain to: 0 tears it down at once.
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}

# Ray builds AF_UNIX socket paths (limit 107 bytes) under the temp dir, after a ~40-character
# session directory name: keep the root short.
_TEMP_ROOT = "/tmp"
# Start takes 10-17 s here (2 busy cores); the timeout of start_ray_cluster only guards against a hang.
_POLL_S = 0.5
_HTTP_TIMEOUT_S = 5.0
_LOG_TAIL_CHARS = 6000
_START_LOG = "ray_start.log"
# Set in the cluster's environment, and so inherited by every process of it (raylet, workers, job
# drivers and what they spawn), with the temp dir as value: stop() finds all of them by it.
_MARKER = "MAESTRO_RAY_TEST_CLUSTER"
# After `ray start` has exited, how long its processes get to exit on their own before SIGKILL.
_STRAGGLER_GRACE_S = 5.0


def ray_executable() -> Path:
    """The ``ray`` CLI of this interpreter's environment (PATH may hold another one, or none)."""
    return Path(sys.executable).parent / "ray"


def available() -> bool:
    """Whether a cluster can be started here: the ``ray`` CLI sits next to ``sys.executable``."""
    exe = ray_executable()
    return exe.is_file() and os.access(exe, os.X_OK)


@dataclass
class RayCluster:
    """A running single-node cluster.

    ``env`` goes into ``os.environ`` of drivers and the test process: ``RAY_TEST_ENV`` plus
    ``RAY_ADDRESS`` (GCS) and ``RAY_API_SERVER_ADDRESS`` (dashboard). ``JobSubmissionClient``
    prefers those two variables over its ``address`` argument, so they must name this cluster.
    The ``extra_env`` given to ``start_ray_cluster`` reaches only the cluster's processes.
    """

    proc: subprocess.Popen[bytes]
    address: str
    dashboard_url: str
    temp_dir: Path
    env: dict[str, str]

    @property
    def log_path(self) -> Path:
        """Output of the ``ray start`` process (Ray's own logs are under ``temp_dir/session_*/logs``)."""
        return self.temp_dir / _START_LOG

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of the ``ray start`` output, of the GCS, raylet and dashboard logs, and of each
        job's driver log, for errors."""
        parts = []
        paths = [self.log_path]
        for name in ("gcs_server.err", "raylet.err", "dashboard.err", "dashboard_agent.err", "dashboard.log",
                     "job-driver-*.log"):
            paths.extend(sorted(self.temp_dir.glob(f"session_*/logs/{name}")))
        for path in paths:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {path.name} ---\n{text[-chars:]}")
        return "\n".join(parts)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the ``ray start`` process, wait up to ``timeout`` s, then SIGKILL what is left.

        "What is left" is the process group of ``ray start`` and every process that carries this
        cluster's marker variable: workers run in process groups of their own and job drivers in
        sessions of their own, and a driver whose ``sh -c`` wrapper died is reparented to init, so
        neither the group nor the process tree finds them all. Finally the temp dir is removed.
        """
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # ray start's handler stops raylet, GCS and dashboard, and workers exit once the raylet is
        # gone; give them a moment, then kill the stragglers (a hung worker, an orphaned driver).
        marker = f"{_MARKER}={self.temp_dir}"
        deadline = time.monotonic() + min(timeout, _STRAGGLER_GRACE_S)
        while _marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in _marked_processes(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=timeout)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_cluster(num_cpus: int = 8, extra_env: dict[str, str] | None = None, timeout: float = 90) -> RayCluster:
    """Start a head node on 127.0.0.1 with ``num_cpus`` logical CPUs and wait until jobs can be submitted.

    ``num_cpus`` above the core count is fine: controllers and job entrypoints take 0 CPU.
    ``extra_env`` is added to the cluster's environment only, e.g. the nodes' own AWS credentials
    and endpoint, which then reach job drivers (not the test process).
    Raises RuntimeError, with the end of the logs, if the cluster is not ready within ``timeout`` s.
    """
    if not available():
        raise RuntimeError(f"no ray CLI at {ray_executable()}")
    gcs_port, dashboard_port, client_port, agent_port = _free_ports(4)
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir=_TEMP_ROOT))
    address = f"127.0.0.1:{gcs_port}"
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    cmd = [
        str(ray_executable()), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        # These four default to fixed ports (6379, 8265, 10001, 52365): pin free ones so clusters
        # started side by side (other tests, other sessions) do not collide.
        f"--port={gcs_port}",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        # Workers default to the fixed range 10002-19999; 0 lets the OS pick each worker's port
        # (what Ray's own tests do via RAY_USE_RANDOM_PORTS). The other ports already default to 0.
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    env = {**os.environ, **RAY_TEST_ENV, **(extra_env or {}), _MARKER: str(temp_dir)}
    # A RAY_ADDRESS inherited from the caller would make `ray start --head` look for that cluster.
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    with open(temp_dir / _START_LOG, "wb") as log:
        # Own session: stop() can signal the whole group without touching the caller's.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    cluster = RayCluster(
        proc=proc,
        address=address,
        dashboard_url=dashboard_url,
        temp_dir=temp_dir,
        env={**RAY_TEST_ENV, "RAY_ADDRESS": address, "RAY_API_SERVER_ADDRESS": dashboard_url},
    )
    # Ready means: the dashboard serves the Jobs API (so GCS is up) and the node's agent, which
    # runs job drivers, reports a healthy raylet. Polled over plain HTTP so this process needs no ray.
    checks = [f"{dashboard_url}/api/jobs/", f"http://127.0.0.1:{agent_port}/api/healthz"]
    deadline = time.monotonic() + timeout
    last_error = "not polled"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last_error = f"ray start exited with {proc.returncode}"
            break
        last_error = _first_failure(checks)
        if not last_error:
            return cluster
        time.sleep(_POLL_S)
    else:
        last_error = f"not ready within {timeout:.0f} s ({last_error})"
    tail = cluster.log_tail()
    cluster.stop(timeout=10)
    raise RuntimeError(f"Ray cluster at {address} failed to start: {last_error}\n{tail}")


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all sockets stay open until every port is chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _first_failure(urls: list[str]) -> str:
    """'' when every URL answers 200, else why the first one did not."""
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as resp:
                if resp.status != 200:
                    return f"{url}: HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            return f"{url}: {exc}"
    return ""


def _marked_processes(marker: str) -> list[int]:
    """Live (not zombie) processes, other than this one, whose initial environment holds ``marker``."""
    needle = marker.encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The state letter follows the command name, which is in parentheses and may hold spaces.
        if (b"\0" + environ).find(b"\0" + needle) >= 0 and stat[stat.rindex(")") + 2] != "Z":
            found.append(int(entry))
    return found
