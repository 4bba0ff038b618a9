"""Start and stop a real local SLURM cluster (scripts/local_slurm.sh) from pytest fixtures."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The repository's own script: these helpers run from a checkout (tests, benchmarks).
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "local_slurm.sh"
# The daemons live in sbin, which is not on every PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# The script also needs slurmdbd and mariadbd: without them start fails instead of skipping.
_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch")
# Start takes about 3 s here; the bound only guards against a hung daemon.
_SCRIPT_TIMEOUT_S = 120


def available() -> bool:
    """Whether a cluster can be started here: the binaries are installed and we are root."""
    return os.geteuid() == 0 and all(shutil.which(name, path=_SEARCH_PATH) for name in _BINARIES)


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster; merge ``env`` into ``os.environ`` so sbatch, sacct and submitit reach it."""

    base: Path
    slurm_conf: Path
    nodes: int
    env: dict[str, str]

    def stop(self, clean: bool = True) -> None:
        """Cancel every job, stop the daemons and, with ``clean``, delete the cluster's directory."""
        _run_script(["stop", "--base", str(self.base), *(["--clean"] if clean else [])])


def start_cluster(nodes: int = 1) -> SlurmCluster:
    """Start a fresh cluster of 1 node (all CPUs) or 2 nodes (1 CPU each) and wait until it is idle."""
    env: dict[str, str] = {}
    for line in _run_script(["start", "--nodes", str(nodes)]).splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    if "SLURM_CONF" not in env:
        raise RuntimeError(f"{SCRIPT.name} start printed no SLURM_CONF")
    conf = Path(env["SLURM_CONF"])
    return SlurmCluster(base=conf.parent.parent, slurm_conf=conf, nodes=nodes, env=env)


def _run_script(args: list[str]) -> str:
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=_SCRIPT_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc.stdout
