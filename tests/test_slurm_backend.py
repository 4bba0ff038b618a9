"""The SLURM backend on a real local cluster (scripts/local_slurm.sh): runs submitted through
submitit, preempted and timed out for real, requeued and resumed, on one node and on two."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import submitit
import torch
import yaml
from maestro_cli import (
    assert_goodput_adds_up,
    attempts_one_at_a_time,
    maestro,
    resume_at_once,
    trained_step,
    trainer_pids,
    wait_for,
    weights,
)
from trainer_runs import final_weights, launch, losses

from mae_core import storage
from mae_core.checkpoint import Checkpointer
from mae_core.contract import PREEMPTED_EXIT_CODE
from orchestrator.backends.slurm import SlurmBackend, slurm_state
from orchestrator.profiles import load_profile
from orchestrator.registry import Registry, RunState
from orchestrator.spec import load_spec
from orchestrator.sweep import expand
from orchestrator.testing.slurm_cluster import SlurmCluster
from orchestrator.testing.specs import merge

# Minutes each: `pytest -m 'not slow'` leaves them out of a quick inner loop (CI runs everything).
pytestmark = pytest.mark.slow

# 8 steps per epoch: 240 steps, long enough to preempt three times.
SPEC: dict[str, Any] = {
    "name": "slurm", "seed": 5, "model": {"arch": "mae_vit_micro_patch4"},
    "data": {"num_samples": 256, "input_size": 32},
    "optim": {"epochs": 30, "global_batch": 32, "warmup_epochs": 1, "blr": 1e-3},
    "resources": {"nodes": 1, "gpus_per_node": 2, "per_device_batch": 16}, "runtime": {"threads": 1},
    "checkpoint": {"interval_steps": 20, "keep_last": 2},
    "metrics": {"log_interval": 1, "flush_s": 2.0},
}
PROFILE: dict[str, Any] = {
    "backend": "slurm", "partition": "low", "gpus_per_node": 0, "cpus_per_task": 1, "time_min": 30,
    "signal_delay_s": 10, "array_parallelism": 2, "rendezvous": "file",
    # gloo binds to loopback only, as everything in the tests does.
    "setup": ["export GLOO_SOCKET_IFNAME=lo"],
}


def write_spec(tmp_path: Path, profile: dict[str, Any] | None = None, **over: Any) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(merge(PROFILE, {"folder": str(tmp_path / "submitit"), **(profile or {})})))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(merge(SPEC, {"cluster": str(cluster), **over})))
    return path


def submit(spec: Path, root: str) -> Registry:
    proc = maestro("submit", str(spec), "--root", root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Registry(root)


def only(registry: Registry) -> RunState:
    [state] = registry.runs()
    return state


def finished(registry: Registry, timeout: float = 240) -> list[RunState]:
    wait_for(lambda: all(s.status in ("completed", "failed", "cancelled") for s in registry.runs()),
             timeout=timeout, what="runs to finish")
    return registry.runs()


def checkpoint_step(registry: Registry, state: RunState) -> int:
    url = storage.join(registry.run_url(state.experiment, state.run_id), "checkpoints")
    info = Checkpointer(url, rank=0, world_size=1).latest()
    return info.step if info else 0


def preempt() -> str:
    """Submit a high-priority job that needs every CPU: it can only start by preempting ``low``."""
    cpus = subprocess.run(["sinfo", "-h", "-p", "high", "-o", "%c"], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    out = subprocess.run(["sbatch", "--parsable", "--partition", "high", "--cpus-per-task", cpus, "--output",
                          "/dev/null", "--wrap", "sleep 2"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def in_squeue(job_id: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The uninterrupted run of SPEC: the same trainer config on 2 local processes."""
    tmp = tmp_path_factory.mktemp("reference")
    spec = load_spec(str(write_spec(tmp)))
    config = tmp / "train.yaml"
    config.write_text(spec.train_config(output=str(tmp / "run")).to_yaml())
    proc = launch(config, 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return losses(str(tmp / "run")), final_weights(config)


def assert_same_run(registry: Registry, state: RunState,
                    reference: tuple[list[float], dict[str, torch.Tensor]]) -> None:
    assert losses(registry.run_url(state.experiment, state.run_id)) == reference[0]
    mine = weights(registry, state)
    assert all(torch.equal(mine[k], reference[1][k]) for k in reference[1])


def requeues_resume_where_they_stopped(registry: Registry, state: RunState) -> list[dict[str, Any]]:
    """Each requeue's checkpoint is the step it stopped at, and the next attempt starts from it:
    no step is computed twice beyond the one in flight when the signal came."""
    events = registry.events(state.experiment, state.run_id)
    requeues = [e for e in events if e["event"] == "requeued"]
    starts = [e for e in events if e["event"] == "started"]
    assert len(starts) == len(requeues) + 1
    for stop, start in zip(requeues, starts[1:], strict=True):
        assert stop["last_checkpoint_step"] == stop["step"] > 0
        assert start["resumed_from_step"] == stop["step"]
        assert start["job_id"] == starts[0]["job_id"]  # requeued under the same job id
    return requeues


class TestOneNode:
    def test_submitted_run_completes_in_the_s3_registry(self, one_node: SlurmCluster, tmp_path: Path,
                                                        s3_bucket: str) -> None:
        root = f"{s3_bucket}/registry"
        registry = submit(write_spec(tmp_path, optim={"epochs": 3}), root)
        [state] = finished(registry)
        assert state.status == "completed" and state.step == state.total_steps == 24, state.message
        job_id = state.job_ids[0]
        assert job_id.isdigit() and state.backend == "slurm"
        run_url = registry.run_url(state.experiment, state.run_id)
        assert run_url.startswith("s3://") and len(losses(run_url)) == 24
        assert storage.exists(storage.join(run_url, "checkpoints/step-000000024/COMMITTED"))
        listing = maestro("ls", "--root", root).stdout
        assert f"slurm ({job_id})" in listing and "completed" in listing
        assert "step 24/24" in maestro("logs", state.run_id, "--root", root).stdout

    def test_preempted_run_requeues_and_equals_an_uninterrupted_run(
            self, one_node: SlurmCluster, tmp_path: Path,
            reference: tuple[list[float], dict[str, torch.Tensor]]) -> None:
        registry = submit(write_spec(tmp_path), str(tmp_path / "registry"))
        wait_for(lambda: checkpoint_step(registry, only(registry)) > 0, what="the first checkpoint")
        preempt()
        [state] = finished(registry)
        assert state.status == "completed", state.message
        assert state.attempts == 2 and state.preemptions == 1 and state.timeouts == 0
        [requeue] = requeues_resume_where_they_stopped(registry, state)
        assert requeue["reason"] == "preempted"
        assert_same_run(registry, state, reference)
        # Goodput: the preempted attempt saved at the step it stopped, so no work after its last
        # checkpoint was lost; its allocation went to start-up, steps and checkpoints.
        assert requeue["ended_by"] == "preempted" and requeue["step"] == requeue["last_checkpoint_step"]
        assert_goodput_adds_up(requeue["goodput"], lost=False)
        assert_goodput_adds_up(state.goodput.model_dump(), lost=False)
        report = json.loads(maestro("report", "slurm", "--root", registry.root, "--format", "json").stdout)
        assert [(r["attempts"], r["ended_by"]) for r in report] == [(2, "completed 1, preempted 1")]

    def test_three_preemptions_at_different_steps(self, one_node: SlurmCluster, tmp_path: Path,
                                                  reference: tuple[list[float], dict[str, torch.Tensor]]) -> None:
        registry = submit(write_spec(tmp_path), str(tmp_path / "registry"))
        for attempt in range(1, 4):
            start = checkpoint_step(registry, only(registry))
            wait_for(lambda a=attempt, s=start: only(registry).attempts == a and only(registry).status == "running"
                     and checkpoint_step(registry, only(registry)) > s, what=f"attempt {attempt} to train")
            preempt()
            wait_for(lambda a=attempt: only(registry).preemptions == a, what=f"preemption {attempt}")
        [state] = finished(registry)
        assert state.status == "completed" and state.attempts == 4 and state.preemptions == 3, state.message
        requeues = requeues_resume_where_they_stopped(registry, state)
        assert len({r["step"] for r in requeues}) == 3
        assert_same_run(registry, state, reference)

    def test_time_limit_requeues_until_the_timeout_budget(self, one_node: SlurmCluster, tmp_path: Path) -> None:
        # A 1-minute limit with USR2 10 s before it. 40,000 steps cannot fit in three attempts on any
        # machine (this one does ~1,500 per attempt), so the outcome does not depend on its speed: two
        # time limits are requeued within requeue.max_timeouts=2 and the third stops the run.
        spec = write_spec(tmp_path, {"time_min": 1}, resources={"gpus_per_node": 1},
                          checkpoint={"interval_steps": 200}, optim={"epochs": 5000}, requeue={"max_timeouts": 2})
        registry = submit(spec, str(tmp_path / "registry"))
        [state] = finished(registry, timeout=600)
        assert state.status == "failed" and state.attempts == 3, state.message
        assert state.timeouts == 3 and state.preemptions == 0 and state.failures == 0
        assert state.message is not None and "requeue.max_timeouts=2" in state.message
        assert "maestro resume" in state.message
        requeues = requeues_resume_where_they_stopped(registry, state)
        assert [r["reason"] for r in requeues] == ["timeout", "timeout"]
        # One clean curve: the steps of every attempt follow each other without a gap or a repeat.
        assert len(losses(registry.run_url(state.experiment, state.run_id))) >= requeues[-1]["step"]

    def test_grid_is_one_array_running_two_at_a_time(self, one_node: SlurmCluster, tmp_path: Path) -> None:
        spec = write_spec(tmp_path, optim={"epochs": 2}, resources={"gpus_per_node": 1},
                          sweep={"grid": {"model.mask_ratio": [0.5, 0.75], "model.decoder_depth": [1, 2]}})
        registry = submit(spec, str(tmp_path / "registry"))
        states = finished(registry)
        assert [s.status for s in states] == ["completed"] * 4
        assert len({s.run_id for s in states}) == 4
        array_ids = {s.job_ids[0].split("_")[0] for s in states}
        assert len(array_ids) == 1 and sorted(s.job_ids[0].split("_")[1] for s in states) == ["0", "1", "2", "3"]
        spans = []
        for s in states:
            events = {e["event"]: e["time"] for e in registry.events(s.experiment, s.run_id)}
            spans.append((events["started"], events["completed"]))
        most_at_once = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
        assert most_at_once == 2

    def test_a_grid_the_registry_cannot_record_is_cancelled_while_held(
            self, one_node: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # The array is submitted held, so that the registry can record its job ids before any
        # task runs. If that write fails, nothing may run unrecorded: the held array is cancelled
        # and the runs are left pending for `maestro resume`.
        spec = load_spec(str(write_spec(tmp_path, resources={"gpus_per_node": 1}, sweep={"grid": {"seed": [1, 2]}})))
        profile = load_profile(spec.cluster)
        registry = Registry(str(tmp_path / "registry"))
        arrays: list[list[Any]] = []
        map_array = submitit.SlurmExecutor.map_array
        monkeypatch.setattr(submitit.SlurmExecutor, "map_array",
                            lambda self, *a: arrays.append(map_array(self, *a)) or arrays[-1])

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise OSError("the bucket refused the write")

        monkeypatch.setattr(registry, "update_many", refuse)
        runs = expand(spec)
        with pytest.raises(OSError, match="refused"), \
                registry.creating(runs, profile, {r.run_id: 16 for r in runs}) as new:
            SlurmBackend(profile).submit(registry, new)
        [jobs] = arrays
        assert len(jobs) == 2
        wait_for(lambda: not any(in_squeue(job.job_id) for job in jobs), timeout=15, what="the held array to go")
        # An array whose tasks never started is one record in SLURM's accounting, under its own id.
        wait_for(lambda: slurm_state(jobs[0].job_id.split("_")[0]) == "CANCELLED", timeout=30,
                 what="SLURM to account the array cancelled")
        assert not any(Path(job.paths.stdout).exists() for job in jobs)  # no task ever started
        assert [(s.status, s.job_ids) for s in Registry(registry.root).runs()] == [("pending", [])] * 2

    def test_a_queued_run_whose_job_was_scancelled_by_hand_ends_cancelled(self, one_node: SlurmCluster,
                                                                          tmp_path: Path) -> None:
        # Accounting says "CANCELLED by <uid>"; the state is its first word, not its last.
        job_id = subprocess.run(["sbatch", "--parsable", "--hold", "--partition", "low", "--output", "/dev/null",
                                 "--wrap", "true"], capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["scancel", job_id], check=True)
        wait_for(lambda: not in_squeue(job_id), timeout=15, what="the job to leave squeue")
        profile = load_profile(str(write_spec(tmp_path).parent / "cluster.yaml"))
        state = RunState(experiment="slurm", run_id="r", status="queued", backend="slurm", job_ids=[job_id],
                         updated=time.time() - 60)
        wait_for(lambda: SlurmBackend(profile).status(Registry(str(tmp_path)), state) is not None, timeout=30,
                 what="SLURM to account the job")
        ended = SlurmBackend(profile).status(Registry(str(tmp_path)), state)
        assert ended is not None and ended.status == "cancelled" and f"{job_id} ended CANCELLED" in ended.message

    def test_cancel_leaves_squeue_within_15_s(self, one_node: SlurmCluster, tmp_path: Path) -> None:
        root = str(tmp_path / "registry")
        registry = submit(write_spec(tmp_path, optim={"epochs": 2000}), root)
        wait_for(lambda: only(registry).status == "running" and trained_step(registry, only(registry)) > 0,
                 what="the run to train")
        job_id = only(registry).job_ids[-1]
        started = time.monotonic()
        assert maestro("cancel", "slurm", "--root", root).returncode == 0
        wait_for(lambda: not in_squeue(job_id), timeout=15, what="the job to leave squeue")
        print(f"cancel -> out of squeue: {time.monotonic() - started:.1f} s")
        wait_for(lambda: only(registry).status == "cancelled", timeout=15, what="cancelled")
        assert only(registry).status == "cancelled"

    def test_cancel_then_resume_at_once_runs_one_attempt_at_a_time(
            self, one_node: SlurmCluster, tmp_path: Path,
            reference: tuple[list[float], dict[str, torch.Tensor]]) -> None:
        root = str(tmp_path / "registry")
        registry = submit(write_spec(tmp_path), root)
        wait_for(lambda: checkpoint_step(registry, only(registry)) > 0, what="the first checkpoint")
        assert maestro("cancel", "slurm", "--root", root).returncode == 0
        resume_at_once("slurm", root)  # refused until the cancelled attempt has checkpointed and left
        [state] = finished(registry)
        assert state.status == "completed" and state.attempts == 2, state.message
        attempts_one_at_a_time(registry, state)
        events = registry.events(state.experiment, state.run_id)
        [cancelled] = [e for e in events if e["event"] == "cancelled"]
        assert [e["resumed_from_step"] for e in events if e["event"] == "started"] == \
            [None, cancelled["last_checkpoint_step"]]
        assert_same_run(registry, state, reference)

    def test_a_killed_trainer_is_a_failure_within_the_budget(self, one_node: SlurmCluster, tmp_path: Path) -> None:
        registry = submit(write_spec(tmp_path, resources={"gpus_per_node": 1}, requeue={"max_failures": 1}),
                          str(tmp_path / "registry"))
        wait_for(lambda: only(registry).status == "running" and trained_step(registry, only(registry)) > 0,
                 what="the run to train")
        for pid in trainer_pids(only(registry).run_id):
            os.kill(pid, signal.SIGKILL)  # what the kernel's OOM killer does
        [state] = finished(registry)
        assert state.status == "completed" and state.attempts == 2, state.message
        assert state.failures == 1 and state.preemptions == 0 and state.timeouts == 0
        [requeue] = [e for e in registry.events(state.experiment, state.run_id) if e["event"] == "requeued"]
        assert requeue["exit_code"] not in (0, PREEMPTED_EXIT_CODE)

    def test_a_trainer_that_crashes_on_every_start_spends_the_failure_budget(self, one_node: SlurmCluster,
                                                                             tmp_path: Path) -> None:
        missing = str(tmp_path / "no-such-dataset")
        registry = submit(write_spec(tmp_path, resources={"gpus_per_node": 1}, requeue={"max_failures": 1},
                                     data={"url": missing, "num_samples": 256}), str(tmp_path / "registry"))
        [state] = finished(registry)
        assert state.status == "failed" and state.attempts == 2 and state.failures == 2, state.message
        assert "requeue.max_failures=1" in (state.message or "") and state.preemptions == 0

    def test_external_scancel_stops_the_run_instead_of_requeueing_it(self, one_node: SlurmCluster,
                                                                     tmp_path: Path) -> None:
        registry = submit(write_spec(tmp_path, optim={"epochs": 2000}), str(tmp_path / "registry"))
        # Past its first checkpoint, so that start-up is over: a plain scancel gives the job only
        # SLURM's KillWait to checkpoint before it kills it.
        wait_for(lambda: checkpoint_step(registry, only(registry)) > 0, what="the first checkpoint")
        job_id = only(registry).job_ids[-1]
        subprocess.run(["scancel", job_id], check=True)
        [state] = finished(registry, timeout=60)
        assert state.status == "cancelled" and state.attempts == 1 and "SIGTERM" in (state.message or "")
        wait_for(lambda: not in_squeue(job_id), timeout=30, what="the job to leave squeue")
        assert state.last_checkpoint_step is not None and state.last_checkpoint_step > 0

    def test_partition_with_shell_metacharacters_is_refused_before_submitting(
            self, one_node: SlurmCluster, tmp_path: Path) -> None:
        marker = tmp_path / "pwned"
        spec = write_spec(tmp_path, {"partition": f"low;touch {marker}"})
        root = str(tmp_path / "registry")
        proc = maestro("submit", str(spec), "--root", root)
        assert proc.returncode == 2
        [line] = proc.stdout.strip().splitlines()
        assert line.startswith("error:") and "partition" in line and "Traceback" not in proc.stderr
        assert not Registry(root).runs()
        assert not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip()
        assert not marker.exists()


class TestTwoNodes:
    def test_two_nodes_one_task_each_match_two_local_processes(
            self, two_nodes: SlurmCluster, tmp_path: Path,
            reference: tuple[list[float], dict[str, torch.Tensor]]) -> None:
        registry = submit(write_spec(tmp_path, resources={"nodes": 2, "gpus_per_node": 1}),
                          str(tmp_path / "registry"))
        [state] = finished(registry, timeout=300)
        assert state.status == "completed", state.message
        log = maestro("logs", state.run_id, "--root", str(tmp_path / "registry")).stdout
        assert "world 2," in log
        assert_same_run(registry, state, reference)
