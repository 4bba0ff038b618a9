"""A run with an ``eval:`` section continues, once pre-trained, with its linear probe on the same
backend, as a run of its own: on a real local SLURM cluster (where the probe is also preempted for
real, requeued and resumed from its own checkpoint) and on a real local Ray cluster. The local
backend's chain is tested in tests/test_evaluate.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from eval_chain import build_train, chain_spec, report_rows
from maestro_cli import maestro, wait_for
from test_ray_backend import write_profile
from test_slurm_backend import PROFILE, in_squeue, preempt, requeues_resume_where_they_stopped

from mae_core import storage
from mae_core.contract import CHECKPOINTS_DIR, latest_checkpoint
from mae_core.metrics_log import read_records
from orchestrator.registry import FINISHED, Registry, RunState
from orchestrator.testing.ray_cluster import RayCluster
from orchestrator.testing.slurm_cluster import SlurmCluster
from orchestrator.testing.specs import merge

# Minutes each: `pytest -m 'not slow'` leaves them out of a quick inner loop (CI runs everything).
pytestmark = pytest.mark.slow

# Checkpoints every 4 steps; on SLURM the probe's 6 epochs of 8 steps leave time to preempt it after
# its first. Elsewhere the probe is as short as the local test's.
CHECKPOINTS: dict[str, Any] = {"interval_steps": 4}
PREEMPTED_EPOCHS = 6
PROBE_EPOCHS = 2


def submit(spec: dict[str, Any], tmp_path: Path, root: str) -> Registry:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = maestro("submit", str(path), "--root", root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Registry(root)


def runs(registry: Registry, experiment: str) -> dict[str, RunState]:
    return {s.run_id: s for s in registry.runs(experiment)}


def pretraining(registry: Registry, experiment: str) -> RunState:
    [state] = [s for s in registry.runs(experiment) if s.job == "pretrain"]
    return state


def probe_of(registry: Registry, experiment: str) -> RunState | None:
    pre = pretraining(registry, experiment)
    return runs(registry, experiment).get(f"{pre.run_id}.linprobe")


def checkpoint_step(registry: Registry, state: RunState) -> int:
    info = latest_checkpoint(storage.join(registry.run_url(state.experiment, state.run_id), CHECKPOINTS_DIR))
    return info.step if info else 0


def chain_finished(registry: Registry, experiment: str) -> bool:
    states = registry.runs(experiment)
    return len(states) == 2 and all(s.status in FINISHED for s in states)


def assert_probe_ran_on(backend: str, registry: Registry, experiment: str,
                        epochs: int = PROBE_EPOCHS) -> tuple[RunState, RunState]:
    """The pre-training run and its probe both completed on ``backend``, each with its own jobs;
    the probe evaluated the final checkpoint and scored on the held-out split, as the report shows."""
    states = runs(registry, experiment)
    pre = pretraining(registry, experiment)
    probe = states[f"{pre.run_id}.linprobe"]
    assert [pre.status, probe.status] == ["completed", "completed"], [pre.message, probe.message]
    assert pre.backend == probe.backend == backend
    assert probe.job == "linprobe" and probe.evaluates == pre.run_id and probe.attempts >= 1
    assert probe.job_ids and pre.job_ids and not set(probe.job_ids) & set(pre.job_ids), (pre.job_ids, probe.job_ids)
    assert probe.step == probe.total_steps == epochs * 8
    started = [e for e in registry.events(experiment, pre.run_id) if e["event"] == "evaluation"]
    assert [(e["run_id"], e["step"]) for e in started] == [(probe.run_id, pre.last_checkpoint_step)]
    # The probe existed before its run was marked completed: `maestro watch`, which stops once no
    # run is active, cannot stop between the two.
    [created] = [e for e in registry.events(experiment, probe.run_id) if e["event"] == "created"]
    assert pre.ended is not None and created["time"] < pre.ended
    assert pre.last_checkpoint_step == pre.total_steps
    scored = [r for r in read_records(registry.run_url(experiment, probe.run_id)) if "val_top1" in r]
    assert len(scored) == epochs and 0 <= scored[-1]["val_top1"] <= 100
    [row] = report_rows(experiment, registry.root)
    assert row["run"] == f"{experiment}/{pre.run_id}"
    assert float(row["linprobe_top1"]) == pytest.approx(scored[-1]["val_top1"], abs=0.01)
    return pre, probe


def write_slurm_profile(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(merge(PROFILE, {"folder": str(tmp_path / "submitit")})))
    return path


class TestSlurm:
    def test_the_probe_is_a_slurm_run_of_its_own_that_resumes_after_preemption(
            self, one_node: SlurmCluster, held_out: str, tmp_path: Path) -> None:
        train = build_train(str(tmp_path / "demo"))
        spec = chain_spec("slurm-eval", train, held_out, str(write_slurm_profile(tmp_path)), checkpoint=CHECKPOINTS,
                          eval={"linprobe": {"epochs": PREEMPTED_EPOCHS}})
        registry = submit(spec, tmp_path, str(tmp_path / "registry"))

        # The probe trains, past its first checkpoint, once the pre-training job has left the
        # cluster (a preemption now must hit the probe alone).
        def probe_checkpointed() -> bool:
            probe = probe_of(registry, "slurm-eval")
            return probe is not None and probe.status == "running" and checkpoint_step(registry, probe) > 0 \
                and not in_squeue(pretraining(registry, "slurm-eval").job_ids[-1])

        wait_for(probe_checkpointed, timeout=400, what="the probe's first checkpoint")
        preempt()
        wait_for(lambda: chain_finished(registry, "slurm-eval"), timeout=600, what="the probe to finish")
        pre, probe = assert_probe_ran_on("slurm", registry, "slurm-eval", PREEMPTED_EPOCHS)
        assert pre.attempts == 1 and len(pre.job_ids) == 1 and pre.job_ids[0].isdigit()
        assert probe.job_ids[0].isdigit() and int(probe.job_ids[0]) > int(pre.job_ids[0])

        # Preempted once, requeued under its job id, resumed from the step it checkpointed at.
        assert probe.attempts == 2 and probe.preemptions == 1 and probe.timeouts == probe.failures == 0
        [requeue] = requeues_resume_where_they_stopped(registry, probe)
        assert requeue["reason"] == "preempted" and requeue["ended_by"] == "preempted"
        assert 0 < requeue["step"] < probe.total_steps
        resumed = re.findall(r"resumed from \S+ at step (\d+)", registry.read_logs(probe, 2))
        assert resumed == [str(requeue["step"])]
        assert "resumed from" not in registry.read_logs(probe, 1)


def test_the_probe_is_a_ray_run_of_its_own(tmp_path: Path, ray_cluster: RayCluster, s3_bucket: str,
                                           held_out: str) -> None:
    train = build_train(str(tmp_path / "demo"))
    spec = chain_spec("ray-eval", train, held_out, str(write_profile(tmp_path, ray_cluster)))
    registry = submit(spec, tmp_path, f"{s3_bucket}/registry")
    # Generous: each of the two runs is a Ray job whose TorchTrainer takes a minute to start on a busy machine.
    wait_for(lambda: chain_finished(registry, "ray-eval"), timeout=900, what="the run and its probe to finish")
    pre, probe = assert_probe_ran_on("ray", registry, "ray-eval")
    assert pre.attempts == probe.attempts == 1
    assert all(j.startswith(f"maestro-{s.run_id}-") for s in (pre, probe) for j in s.job_ids)
