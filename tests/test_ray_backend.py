"""The Ray backend on a real local Ray cluster (loopback), with the registry on S3 (moto).

Runs are Ray jobs whose drivers train with Ray Train; the registry holds the queue, the budgets
and everything the runs write. Each test proves the event happened (a kill, a cancel, a dead
supervisor) from the registry's and the cluster's own records, not from what the CLI wrote.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from maestro_cli import maestro, trained_step, wait_for, weights
from trainer_runs import final_weights, launch, losses

from mae_core import storage
from mae_core.contract import latest_checkpoint
from orchestrator.registry import Registry, RunState
from orchestrator.testing.ray_cluster import RayCluster
from orchestrator.testing.specs import merge

# Minutes each: `pytest -m 'not slow'` leaves them out of a quick inner loop (CI runs everything).
pytestmark = pytest.mark.slow

LIVE = ("PENDING", "RUNNING")
CANARY = "canary-9f3b2d71e0c4a8"

SPEC: dict[str, Any] = {
    "seed": 5, "model": {"arch": "mae_vit_micro_patch4"},
    "data": {"num_samples": 256, "input_size": 32},
    "optim": {"epochs": 30, "global_batch": 32, "warmup_epochs": 1, "blr": 1e-3},
    "resources": {"nodes": 1, "gpus_per_node": 2, "per_device_batch": 16},
    "runtime": {"threads": 1},
    "checkpoint": {"interval_steps": 4},
    "metrics": {"log_interval": 1, "flush_s": 2.0},
    "requeue": {"max_failures": 1},
}
TOTAL_STEPS = 30 * 256 // 32


def write_profile(tmp_path: Path, cluster: RayCluster, **over: Any) -> Path:
    profile = {"backend": "ray", "address": cluster.dashboard_url, "python": sys.executable,
               "max_concurrent_runs": 2, "resources_per_worker": {"CPU": 1}, "hang_timeout_s": 600,
               "cancel_grace_s": 120, **over}
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def write_spec(tmp_path: Path, name: str, profile: Path, **over: Any) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(merge({**SPEC, "name": name, "cluster": str(profile)}, over)))
    return path


def runs(root: str, experiment: str) -> list[RunState]:
    return Registry(root).runs(experiment)


def jobs(cluster: RayCluster) -> list[Any]:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url).list_jobs()


def job_status(cluster: RayCluster, job_id: str) -> str:
    return next(str(j.status.value) for j in jobs(cluster) if j.submission_id == job_id)


def finished(root: str, experiment: str, count: int = 1) -> bool:
    states = runs(root, experiment)
    return len(states) == count and all(s.status in ("completed", "failed", "cancelled") for s in states)


def events(root: str, state: RunState) -> list[dict[str, Any]]:
    return Registry(root).events(state.experiment, state.run_id)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final parameters of SPEC trained without interruption by 2 local processes."""
    from orchestrator.spec import validate

    directory = tmp_path_factory.mktemp("reference")
    spec = validate({**SPEC, "name": "reference"}, "reference")
    config = directory / "train.yaml"
    config.write_text(spec.train_config(output=str(directory / "out")).to_yaml())
    proc = launch(config, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_weights(config)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_run_completes_on_ray_like_a_local_run_and_leaks_no_secret(
        tmp_path: Path, ray_cluster: RayCluster, s3_bucket: str, reference: dict[str, torch.Tensor]) -> None:
    root = f"{s3_bucket}/registry"
    spec = write_spec(tmp_path, "ray-e2e", write_profile(tmp_path, ray_cluster))
    # The submitting machine's own credentials: moto accepts any, and none may travel.
    secret_env = {"AWS_SECRET_ACCESS_KEY": CANARY, "AWS_SESSION_TOKEN": CANARY}
    started = time.monotonic()
    proc = maestro("submit", str(spec), "--root", root, env=secret_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - started < 30  # returns at once; the cluster does the rest
    wait_for(lambda: finished(root, "ray-e2e"), timeout=300, what="the Ray run to finish")
    [state] = runs(root, "ray-e2e")
    assert state.status == "completed" and state.step == TOTAL_STEPS and state.attempts == 1, state.message
    assert state.backend == "ray" and state.job_ids and state.job_ids[-1].startswith("maestro-")
    run_url = Registry(root).run_url("ray-e2e", state.run_id)
    assert len(losses(run_url)) == TOTAL_STEPS
    assert storage.exists(storage.join(run_url, f"checkpoints/step-{TOTAL_STEPS:09d}/COMMITTED"))
    listing = maestro("ls", "--root", root).stdout
    assert "completed" in listing and state.job_ids[-1] in listing and f"{TOTAL_STEPS}/{TOTAL_STEPS}" in listing
    log = maestro("logs", state.run_id, "--root", root, env=secret_env).stdout
    assert f"step {TOTAL_STEPS}/{TOTAL_STEPS}" in log and "--- rank 1 ---" in log and "driver" in log
    assert job_status(ray_cluster, state.job_ids[-1]) == "SUCCEEDED"

    # Same model as everywhere: bit-identical to 2 local processes.
    assert_same(weights(Registry(root), state), reference)

    # Secrets: not in any registry object, any Ray job's runtime_env or entrypoint, nor any log.
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = s3_bucket.removeprefix("s3://")
    for path in fs.find(bucket):
        assert CANARY.encode() not in fs.cat_file(path), path
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    for job in client.list_jobs():
        assert CANARY not in repr(job.runtime_env) and CANARY not in job.entrypoint
        assert CANARY not in client.get_job_logs(job.submission_id)
    assert CANARY not in log


def test_dead_worker_costs_one_restart_from_the_checkpoint(
        tmp_path: Path, ray_cluster: RayCluster, s3_bucket: str, reference: dict[str, torch.Tensor]) -> None:
    root = f"{s3_bucket}/registry"
    spec = write_spec(tmp_path, "ray-kill", write_profile(tmp_path, ray_cluster))
    assert maestro("submit", str(spec), "--root", root).returncode == 0
    registry = Registry(root)

    def first_checkpoint() -> bool:
        states = runs(root, "ray-kill")
        if not states or states[0].status != "running":
            return False
        url = storage.join(registry.run_url("ray-kill", states[0].run_id), "checkpoints")
        return latest_checkpoint(url) is not None and registry.workers(states[0]).get(1, {}).get("attempt") == 1

    wait_for(first_checkpoint, timeout=240, what="the first checkpoint")
    [state] = runs(root, "ray-kill")
    killed = registry.workers(state)[1]["worker_pid"]
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: finished(root, "ray-kill"), timeout=400, what="the run to finish after the kill")
    [state] = runs(root, "ray-kill")
    assert state.status == "completed" and state.attempts == 2 and state.failures == 1, state.message
    history = events(root, state)
    [requeued] = [e for e in history if e["event"] == "requeued"]
    assert requeued["attempt"] == 1 and requeued["reason"]  # why the first attempt ended
    started = [e for e in history if e["event"] == "started"]
    assert [e["attempt"] for e in started] == [1, 2]
    assert started[1]["resumed_from_step"] is not None and started[1]["resumed_from_step"] >= 4
    assert registry.workers(state)[1]["worker_pid"] != killed  # a new worker group did the rest
    assert_same(weights(registry, state), reference)


def test_a_trainer_that_always_crashes_ends_failed_within_its_budget(
        tmp_path: Path, ray_cluster: RayCluster, s3_bucket: str) -> None:
    root = f"{s3_bucket}/registry"
    # Data that does not exist: the trainer fails at start-up, every time.
    spec = write_spec(tmp_path, "ray-crash", write_profile(tmp_path, ray_cluster),
                      data={"url": str(tmp_path / "no-such-data"), "num_samples": 256})
    assert maestro("submit", str(spec), "--root", root).returncode == 0
    wait_for(lambda: finished(root, "ray-crash"), timeout=300, what="the crashing run to end")
    [state] = runs(root, "ray-crash")
    assert state.status == "failed" and state.attempts == 2 and state.failures == 2
    assert "requeue.max_failures=1" in (state.message or "") and "does not exist" in (state.message or "")
    time.sleep(5)  # it does not loop: no new attempt, no live job
    again = runs(root, "ray-crash")[0]
    assert again.attempts == 2 and all(job_status(ray_cluster, j) not in LIVE for j in again.job_ids)


def test_grid_runs_at_most_max_concurrent_runs_at_once(tmp_path: Path, ray_cluster: RayCluster,
                                                       s3_bucket: str) -> None:
    root = f"{s3_bucket}/registry"
    spec = write_spec(tmp_path, "ray-grid", write_profile(tmp_path, ray_cluster, max_concurrent_runs=2),
                      optim={"epochs": 2}, resources={"gpus_per_node": 1}, sweep={"grid": {"seed": [1, 2, 3, 4]}})
    assert maestro("submit", str(spec), "--root", root).returncode == 0
    wait_for(lambda: finished(root, "ray-grid", 4), timeout=600, what="the grid to finish")
    states = runs(root, "ray-grid")
    assert {s.status for s in states} == {"completed"} and len({s.run_id for s in states}) == 4
    # From the registry's timestamps: each run's span from its start to its end.
    spans = []
    for s in states:
        history = events(root, s)
        spans.append((min(e["time"] for e in history if e["event"] == "started"),
                      max(e["time"] for e in history if e["event"] == "completed")))
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most == 2, spans


def test_grid_survives_its_client_and_supervisor(tmp_path: Path, ray_cluster: RayCluster, s3_bucket: str) -> None:
    root = f"{s3_bucket}/registry"
    spec = write_spec(tmp_path, "ray-gone", write_profile(tmp_path, ray_cluster, max_concurrent_runs=1),
                      optim={"epochs": 2}, resources={"gpus_per_node": 1}, sweep={"grid": {"seed": [1, 2, 3]}})
    client = subprocess.Popen([str(Path(sys.executable).with_name("maestro")), "submit", str(spec), "--root", root],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any(s.status == "running" for s in runs(root, "ray-gone")), timeout=240,
             what="the first run to start")
    client.kill()  # the laptop closes
    client.wait()
    [sup] = [j for j in jobs(ray_cluster) if (j.submission_id or "").startswith("maestro-supervise-ray-gone")]
    from ray.job_submission import JobSubmissionClient

    JobSubmissionClient(ray_cluster.dashboard_url).stop_job(sup.submission_id)
    wait_for(lambda: job_status(ray_cluster, sup.submission_id) not in LIVE, timeout=60, what="the supervisor to die")
    # The run that was training goes on; the others wait for a supervisor that is gone.
    wait_for(lambda: any(s.status == "completed" for s in runs(root, "ray-gone")), timeout=300,
             what="the started run to complete on its own")
    time.sleep(2 * 2.0 + 1)
    assert [s.status for s in runs(root, "ray-gone")].count("queued") == 2
    done_before = {s.run_id for s in runs(root, "ray-gone") if s.status == "completed"}

    resumed = maestro("resume", "ray-gone", "--root", root)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    wait_for(lambda: finished(root, "ray-gone", 3) and all(s.status == "completed" for s in runs(root, "ray-gone")),
             timeout=600, what="the rest of the grid")
    for s in runs(root, "ray-gone"):
        starts = [e for e in events(root, s) if e["event"] == "started"]
        assert len(starts) == 1 and s.attempts == 1, (s.run_id, starts)  # nothing ran twice
    assert done_before and done_before <= {s.run_id for s in runs(root, "ray-gone")}


def test_cancel_checkpoints_then_resume_matches_an_uninterrupted_run(
        tmp_path: Path, ray_cluster: RayCluster, s3_bucket: str, reference: dict[str, torch.Tensor]) -> None:
    root = f"{s3_bucket}/registry"
    spec = write_spec(tmp_path, "ray-cancel", write_profile(tmp_path, ray_cluster))
    assert maestro("submit", str(spec), "--root", root).returncode == 0
    registry = Registry(root)
    wait_for(lambda: bool(runs(root, "ray-cancel")) and trained_step(registry, runs(root, "ray-cancel")[0]) >= 8,
             timeout=240,
             what="training to be under way")
    [state] = runs(root, "ray-cancel")
    job_id = state.job_ids[-1]
    assert maestro("cancel", state.run_id, "--root", root).returncode == 0
    cancelled_at = time.monotonic()
    # One attempt at a time: while the cancelled attempt checkpoints, resume is refused.
    early = maestro("resume", state.run_id, "--root", root)
    assert early.returncode == 2 and "still cancelling" in early.stdout, early.stdout + early.stderr
    wait_for(lambda: job_status(ray_cluster, job_id) not in LIVE, timeout=30, what="the run's job to leave")
    assert time.monotonic() - cancelled_at <= 30
    wait_for(lambda: runs(root, "ray-cancel")[0].status == "cancelled", timeout=30, what="cancelled")
    [state] = runs(root, "ray-cancel")
    assert all(job_status(ray_cluster, j) not in LIVE for j in state.job_ids)
    stopped = state.step
    assert 8 <= stopped < TOTAL_STEPS and state.last_checkpoint_step == stopped
    info = latest_checkpoint(storage.join(registry.run_url("ray-cancel", state.run_id), "checkpoints"))
    assert info is not None and info.step == stopped

    assert maestro("resume", "ray-cancel", "--root", root).returncode == 0
    wait_for(lambda: runs(root, "ray-cancel")[0].status == "completed", timeout=300, what="the resumed run")
    [state] = runs(root, "ray-cancel")
    assert [e["resumed_from_step"] for e in events(root, state) if e["event"] == "started"] == [None, stopped]
    assert_same(weights(registry, state), reference)


def test_plan_renders_the_ray_submission_without_a_cluster(tmp_path: Path) -> None:
    profile = tmp_path / "ray.yaml"
    profile.write_text(yaml.safe_dump({"backend": "ray", "address": "http://127.0.0.1:9", "max_concurrent_runs": 3,
                                       "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}))
    spec = write_spec(tmp_path, "ray-plan", profile)
    # A machine with no Ray anywhere: no ray CLI on the PATH, and ray never imported.
    code = ("import sys; from orchestrator import cli; sys.argv = ['maestro', 'plan', sys.argv[1]]\n"
            "try:\n    cli.main()\nfinally:\n    print('RAY-IMPORTED' if 'ray' in sys.modules else 'NO-RAY')")
    proc = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True,
                          env={**os.environ, "PATH": "/usr/bin:/bin", "AWS_ENDPOINT_URL": "http://s3.example:9000"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "NO-RAY" in out and "at most 3 run(s) at once" in out
    assert "-m orchestrator.backends.ray supervise" in out and "-m orchestrator.backends.ray run" in out
    assert "TorchTrainer, 2 worker(s)" in out and '"OMP_NUM_THREADS": "1"' in out
    assert "http://s3.example:9000" in out  # the endpoint is forwarded; keys never are


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("runtime_env", {"env_vars": {"AWS_SECRET_ACCESS_KEY": CANARY}}, "runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"),
    ("runtime_env", {"env_vars": {"DATA": f"s3://user:{CANARY}@host/x"}}, "runtime_env.env_vars.DATA"),
    ("address", "auto", "address"),
    ("address", "http://head:8265\n", "address"),
    ("python", "python3; rm -rf /", "python"),
])
def test_bad_ray_profiles_get_one_line_without_the_secret(tmp_path: Path, field: str, value: Any,
                                                          needle: str) -> None:
    profile = {"backend": "ray", "address": "http://127.0.0.1:8265", field: value}
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump(profile))
    proc = maestro("plan", str(write_spec(tmp_path, "ray-bad", path)))
    lines = proc.stdout.strip().splitlines() + proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], proc.stdout + proc.stderr
    assert CANARY not in proc.stdout + proc.stderr
