"""The local SLURM cluster of scripts/local_slurm.sh is real and usable the way maestro uses SLURM:
batch jobs with accounting, submitit jobs, preemption with checkpoint and requeue, and two nodes."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import require

from orchestrator.testing.slurm_cluster import SlurmCluster

TESTS_DIR = Path(__file__).resolve().parent
# sacct lags the real state by 1-4 s.
ACCOUNTING_TIMEOUT_S = 30.0


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


def sbatch(*args: str) -> str:
    return run("sbatch", "--parsable", *args).strip().split(";")[0]


def sacct_states(job_id: str) -> list[str]:
    """Every accounting record of the job, oldest first: a requeued job has one per run."""
    return run("sacct", "-n", "-X", "-P", "--duplicates", "-j", job_id, "-o", "State").splitlines()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``condition``; return the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def wait_completed(job_id: str) -> None:
    wait_until(lambda: sacct_states(job_id)[-1:] == ["COMPLETED"], ACCOUNTING_TIMEOUT_S,
               f"sacct to report job {job_id} COMPLETED")


def submitit_executor(folder: Path, **params: Any) -> Any:
    require("submitit", importlib.util.find_spec("submitit") is not None)
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # timeout_min <= 10 would make submitit treat every USR2 as a timeout; PYTHONPATH lets the job
    # import tests/slurm_jobs.py, whose callables are pickled by reference.
    executor.update_parameters(
        timeout_min=11,
        slurm_setup=[f"export PYTHONPATH={shlex.quote(str(TESTS_DIR))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        **params,
    )
    return executor


def wait_done(job: Any, timeout_s: float) -> None:
    # job.result() alone would poll forever if the job never finishes.
    wait_until(job.done, timeout_s, f"submitit job {job.job_id} to finish")


class TestOneNode:
    def test_sbatch_job_completes_and_is_accounted(self, one_node: SlurmCluster, tmp_path: Path) -> None:
        out = tmp_path / "out.txt"
        job_id = sbatch("--output", str(out), "--wrap", "echo hello from $SLURM_JOB_ID")
        wait_completed(job_id)
        assert out.read_text().strip() == f"hello from {job_id}"

    def test_submitit_function_returns_its_result(self, one_node: SlurmCluster, tmp_path: Path) -> None:
        executor = submitit_executor(tmp_path, slurm_partition="low", cpus_per_task=1)
        import slurm_jobs

        job = executor.submit(slurm_jobs.add, 2, 3)
        wait_done(job, 60)
        assert job.result() == 5
        wait_completed(job.job_id)

    def test_preempted_checkpointable_job_is_requeued_and_resumes(self, one_node: SlurmCluster,
                                                                  tmp_path: Path) -> None:
        executor = submitit_executor(tmp_path / "submitit", slurm_partition="low", cpus_per_task=1)
        import slurm_jobs

        markers = tmp_path / "markers"
        markers.mkdir()
        low = executor.submit(slurm_jobs.PreemptibleSleeper(), str(markers))
        wait_until((markers / "running-0").exists, 60, "the low-priority job to start")

        # A high-priority job that needs every CPU can only start by preempting the low one.
        cpus = run("sinfo", "-h", "-p", "high", "-o", "%c").strip()
        high = sbatch("--partition", "high", "--cpus-per-task", cpus, "--output", "/dev/null", "--wrap", "sleep 2")
        requeue_s = wait_until((markers / "running-1").exists, 60, "the preempted job to run again")
        print(f"preemption -> running again: {requeue_s:.1f} s")
        # The 121 s that cred_expire's default adds would show up here.
        assert requeue_s < 45

        wait_done(low, 60)
        assert low.result() == {"restart_count": 1, "checkpointed_at_restart": 0}
        # USR2 from preemption, not the time limit: a timeout would count against the requeue budget.
        log = low.stderr() or ""
        assert "Caught signal SIGUSR2" in log and "this job is preempted" in log, log
        wait_completed(high)
        wait_completed(low.job_id)
        states = sacct_states(low.job_id)
        print(f"sacct records of the preempted job: {states}")
        assert len(states) >= 2 and states[-1] == "COMPLETED", states
        assert any(s in ("PREEMPTED", "REQUEUED") for s in states[:-1]), states


class TestTwoNodes:
    def test_two_tasks_run_one_per_node(self, two_nodes: SlurmCluster, tmp_path: Path) -> None:
        out = tmp_path / "out.txt"
        job_id = sbatch("--nodes", "2", "--ntasks-per-node", "1", "--output", str(out),
                        "--wrap", "srun bash -c 'echo $SLURM_PROCID $SLURMD_NODENAME'")
        wait_completed(job_id)
        assert sorted(out.read_text().splitlines()) == ["0 node1", "1 node2"]
