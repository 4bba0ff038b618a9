"""What running on Ray costs against the local backend, and how fast a run recovers from a dead worker.

One run of this script starts a moto S3 server and a real Ray cluster on loopback
(``orchestrator.testing``), then submits the same tiny spec (mae_vit_micro_patch4, synthetic
data, 2 workers x 1 CPU, registry on S3) three times through the `maestro` CLI:

1. on the local backend (2 processes through ``mae_core.launch``): the baseline;
2. on Ray (a supervisor job, a driver job, TorchTrainer with 2 workers);
3. on Ray again, SIGKILLing the rank-1 worker (by the pid the run recorded) after the first
   checkpoint; the run restarts from that checkpoint.

For each it reports the time from `maestro submit` to the first training step (the first
metrics record's timestamp) and the whole run's wall time (submit to the `completed` event), and
prints the ratios Ray / local. For 3 it reports the recovery time: from the kill to the first
training step of the next attempt. Why: Ray's start-up (jobs, actors, a worker group) is paid per
run and per restart; this says how much, against running the same processes directly.

    python benchmarks/ray_overhead.py [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mae_core import storage
from mae_core.contract import latest_checkpoint
from mae_core.metrics_log import read_records
from orchestrator.registry import Registry, RunState
from orchestrator.testing.ray_cluster import RAY_TEST_ENV, start_ray_cluster
from orchestrator.testing.s3_server import start_s3_server

MAESTRO = str(Path(sys.executable).with_name("maestro"))
POLL_S = 0.2


def spec(name: str, profile: Path, epochs: int) -> dict[str, Any]:
    return {"name": name, "seed": 5, "model": {"arch": "mae_vit_micro_patch4"},
            "data": {"num_samples": 256, "input_size": 32},
            "optim": {"epochs": epochs, "global_batch": 32, "warmup_epochs": 1, "blr": 1e-3},
            "resources": {"nodes": 1, "gpus_per_node": 2, "per_device_batch": 16}, "runtime": {"threads": 1},
            "checkpoint": {"interval_steps": 4}, "requeue": {"max_failures": 1}, "cluster": str(profile),
            # Every step recorded: first-step and recovery times read the first new record.
            "metrics": {"log_interval": 1, "flush_s": 10.0}}


def only(root: str, experiment: str) -> RunState | None:
    states = Registry(root).runs(experiment)
    return states[0] if states else None


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def metric_times(root: str, state: RunState) -> list[float]:
    return [r["time"] for r in read_records(Registry(root).run_url(state.experiment, state.run_id))]


def submit_and_time(root: str, work: Path, name: str, profile: Path, epochs: int,
                    kill_after_checkpoint: bool = False) -> dict[str, float]:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec(name, profile, epochs)))
    t0 = time.time()
    proc = subprocess.run([MAESTRO, "submit", str(path), "--root", root], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"maestro submit failed: {proc.stdout}{proc.stderr}")
    registry = Registry(root)
    killed_at = None
    if kill_after_checkpoint:
        def checkpointed() -> bool:
            state = only(root, name)
            if state is None or state.status != "running":
                return False
            url = storage.join(registry.run_url(name, state.run_id), "checkpoints")
            return latest_checkpoint(url) is not None and registry.workers(state).get(1, {}).get("attempt") == 1
        wait(checkpointed, 600, "the first checkpoint")
        state = only(root, name)
        assert state is not None
        os.kill(registry.workers(state)[1]["worker_pid"], signal.SIGKILL)
        killed_at = time.time()
    wait(lambda: (s := only(root, name)) is not None and s.status in ("completed", "failed"), 1200, f"{name}")
    state = only(root, name)
    assert state is not None
    if state.status != "completed":
        raise RuntimeError(f"{name} ended {state.status}: {state.message}")
    times = metric_times(root, state)
    done = max(e["time"] for e in registry.events(name, state.run_id) if e["event"] == "completed")
    out = {"first_step_s": times[0] - t0 if not killed_at else float("nan"), "wall_s": done - t0,
           "attempts": float(state.attempts)}
    if killed_at is not None:
        out["recovery_s"] = min(t for t in times if t > killed_at) - killed_at
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="8 steps each")
    args = parser.parse_args()
    os.environ.update(RAY_TEST_ENV)
    s3 = start_s3_server()
    os.environ.update(s3.env)
    cluster = start_ray_cluster(num_cpus=8, extra_env=s3.env)
    try:
        import s3fs

        s3fs.S3FileSystem().mkdir("bench-ray")
        root = "s3://bench-ray/registry"
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            local = work / "local.yaml"
            local.write_text(yaml.safe_dump({"backend": "local", "max_concurrent_runs": 1}))
            ray = work / "ray.yaml"
            ray.write_text(yaml.safe_dump({"backend": "ray", "address": cluster.dashboard_url,
                                           "python": sys.executable, "max_concurrent_runs": 1,
                                           "resources_per_worker": {"CPU": 1}}))
            os.environ["MAESTRO_STATE_DIR"] = str(work / "state")
            results = {"local": submit_and_time(root, work, "bench-local", local, args.epochs),
                       "ray": submit_and_time(root, work, "bench-ray", ray, args.epochs),
                       "ray-kill": submit_and_time(root, work, "bench-kill", ray, args.epochs, True)}
    finally:
        cluster.stop()
        s3.stop()
    steps = args.epochs * 8
    print(f"tiny MAE (mae_vit_micro_patch4), 2 workers x 1 CPU, {steps} steps, registry on moto S3, "
          f"{os.cpu_count()} cores")
    print(f"{'backend':<10} {'submit->first step s':>21} {'wall s':>8} {'attempts':>9}")
    for name, r in results.items():
        print(f"{name:<10} {r['first_step_s']:>21.1f} {r['wall_s']:>8.1f} {r['attempts']:>9.0f}")
    local, ray = results["local"], results["ray"]
    print(f"ratio ray/local: submit->first step {ray['first_step_s'] / local['first_step_s']:.2f}x, "
          f"wall {ray['wall_s'] / local['wall_s']:.2f}x")
    print(f"worker kill -> next training step: {results['ray-kill']['recovery_s']:.1f} s "
          f"(the killed run's wall {results['ray-kill']['wall_s']:.1f} s vs {ray['wall_s']:.1f} s unkilled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
