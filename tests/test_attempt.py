"""What every backend's attempt obeys (orchestrator.runner, mae_core.contract): a crash is never
counted as a preemption, one attempt writes a run at a time, and a trainer that stops advancing is
stopped. The backends' own suites show the same on SLURM and Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from maestro_cli import maestro, run_in_process, trained_step, trainer_pids, wait_for
from trainer_runs import write_config

from mae_core import storage
from mae_core.contract import ATTEMPT_ENV, PREEMPTED_EXIT_CODE, claim_output, exit_status, latest_checkpoint
from orchestrator import runner
from orchestrator.backends.slurm import stop_reason
from orchestrator.profiles import LocalProfile, SlurmProfile
from orchestrator.registry import Registry, RunState, StaleAttempt
from orchestrator.spec import validate
from orchestrator.sweep import PlannedRun

REPO = Path(__file__).resolve().parents[1]
SPEC: dict[str, Any] = {
    "name": "attempts", "seed": 1, "model": {"arch": "mae_vit_micro_patch4"},
    "data": {"num_samples": 256, "input_size": 32},
    "optim": {"epochs": 200, "global_batch": 32, "warmup_epochs": 1, "blr": 1e-3},
    "resources": {"gpus_per_node": 1, "per_device_batch": 16}, "runtime": {"threads": 1},
    "checkpoint": {"interval_steps": 20}, "metrics": {"log_interval": 1, "flush_s": 1.0},
    "requeue": {"max_failures": 2},
    "cluster": str(REPO / "cluster_configs/local.yaml"),
}


def new_run(root: str, **fields: Any) -> tuple[Registry, RunState]:
    registry = Registry(root)
    registry.create(PlannedRun("attempts", "r1", validate(SPEC, "spec"), {}), LocalProfile(), 240)
    return registry, registry.update("attempts", "r1", **fields)


@pytest.mark.parametrize(("code", "forwarded", "expected"), [
    (PREEMPTED_EXIT_CODE, [], PREEMPTED_EXIT_CODE),                        # checkpointed on request
    (-signal.SIGUSR2, [signal.SIGUSR2], PREEMPTED_EXIT_CODE),              # died of our signal while starting
    (-signal.SIGKILL, [signal.SIGUSR2], -signal.SIGKILL),                  # OOM-killed during a preemption
    (-signal.SIGSEGV, [signal.SIGTERM], -signal.SIGSEGV),                  # crashed during a cancel
    (-signal.SIGTERM, [], -signal.SIGTERM),                                # a TERM nobody forwarded
    (1, [signal.SIGUSR2], 1),
])
def test_only_the_forwarded_signal_or_the_trainers_own_exit_is_a_preemption(code: int, forwarded: list[int],
                                                                            expected: int) -> None:
    assert exit_status(code, forwarded) == expected


def test_sigkill_during_a_preemption_is_a_failure_of_the_local_run(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer is stopped, the runner forwards a preemption signal to it, and then the trainer
    is killed before it could checkpoint: that is a crash, counted against requeue.max_failures."""
    monkeypatch.setenv("MAESTRO_STATE_DIR", str(tmp_path / "state"))
    root = str(tmp_path / "registry")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    assert maestro("submit", str(spec), "--root", root).returncode == 0
    registry = Registry(root)
    wait_for(lambda: bool(registry.runs()) and trained_step(registry, registry.runs()[0]) > 0, what="training")
    [state] = registry.runs()
    [trainer] = trainer_pids(state.run_id)
    os.kill(trainer, signal.SIGSTOP)  # it cannot act on what follows
    assert state.pid is not None
    os.kill(state.pid, signal.SIGUSR2)  # the runner forwards it, through the launcher, to the trainer
    time.sleep(1.0)
    os.kill(trainer, signal.SIGKILL)
    wait_for(lambda: registry.runs()[0].status not in ("queued", "running"), timeout=60, what="the attempt's end")
    [state] = registry.runs()
    assert state.status == "failed" and state.failures == 1 and state.preemptions == 0, state
    [end] = [e for e in registry.events("attempts", state.run_id) if e["event"] == "failed"]
    assert end["exit_code"] not in (0, PREEMPTED_EXIT_CODE)


def test_when_slurm_cannot_say_why_a_job_stopped_it_is_a_failure(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))  # no squeue: SLURM cannot be asked
    assert stop_reason(SlurmProfile(partition="low"), attempts=2) is None
    registry, state = new_run(str(tmp_path / "registry"), status="running", attempts=1)
    state = runner.finish_attempt(registry, state, PREEMPTED_EXIT_CODE, "", can_requeue=True,
                                  stop_reason=lambda: stop_reason(SlurmProfile(partition="low"), attempts=1))
    assert state.status == "requeued" and state.failures == 1 and state.preemptions == 0
    assert "could not say" in (state.message or "")


def test_a_stale_attempts_writes_are_refused_and_logged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry, _ = new_run(str(tmp_path / "registry"), status="queued")
    old = runner.begin_attempt(registry, "attempts", "r1")
    new = runner.begin_attempt(registry, "attempts", "r1")  # e.g. a resume that raced a slow cancel
    assert old is not None and new is not None and (old.attempts, new.attempts) == (1, 2)
    with pytest.raises(StaleAttempt):
        registry.update("attempts", "r1", owner=old.attempts, status="completed")
    ended = runner.finish_attempt(registry, old, 0, "", can_requeue=False)
    assert ended.status == "running" and ended.attempts == 2
    assert registry.state("attempts", "r1").status == "running"
    assert "attempt 1 of attempts/r1 is stale" in capsys.readouterr().err
    assert [e["event"] for e in registry.events("attempts", "r1")].count("completed") == 0


def test_a_stale_trainer_commits_no_checkpoint(tmp_path: Path) -> None:
    output = str(tmp_path / "run")
    config = write_config(tmp_path, "stale", output)
    claim_output(output, 2)  # attempt 2 owns the run; this trainer is attempt 1
    proc = subprocess.run([sys.executable, "-m", "mae_core.launch", "--nproc", "1", str(config)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, ATTEMPT_ENV: "1"})
    assert proc.returncode == 1 and "attempt 1 is stale: attempt 2 now owns" in proc.stderr, proc.stderr[-2000:]
    assert latest_checkpoint(storage.join(output, "checkpoints")) is None
    # The same trainer as the owning attempt saves as usual.
    proc = subprocess.run([sys.executable, "-m", "mae_core.launch", "--nproc", "1", str(config)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, ATTEMPT_ENV: "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert latest_checkpoint(storage.join(output, "checkpoints")) is not None


def test_resume_is_refused_while_the_cancelled_attempt_is_leaving(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "registry")
    new_run(root, status="cancelling", attempts=1)
    code, out = run_in_process(capsys, "resume", "attempts/r1", "--root", root)
    assert code == 2 and "still cancelling" in out and len(out.strip().splitlines()) == 1, out
    assert Registry(root).state("attempts", "r1").status == "cancelling"


def test_a_trainer_without_new_steps_is_hung_stopped_and_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "registry")
    registry, state = new_run(root, status="running", attempts=1, heartbeat=time.time(), hang_timeout_s=1.0)
    monkeypatch.setattr(runner, "UPLOAD_S", 0.0)  # progress is read on every poll here
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    log = tmp_path / "train.log"
    log.write_text("starting\n")
    watch = runner.AttemptWatch(registry, state, log, hang_timeout_s=1.0)
    deadline = time.monotonic() + 20
    while trainer.poll() is None and time.monotonic() < deadline:
        watch.poll(trainer)
        time.sleep(0.2)
    assert watch.hung and trainer.wait(timeout=5) == -signal.SIGKILL
    assert [e["event"] for e in registry.events("attempts", "r1")][-1] == "hung"
    assert registry.read_logs(state, 1) == "starting\n"
    code, out = run_in_process(capsys, "ls", "attempts", "--root", root)
    assert code == 0 and "hung" in out


def test_log_uploads_rewrite_only_the_newest_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry, state = new_run(str(tmp_path / "registry"), status="running", attempts=1)
    monkeypatch.setattr(runner.LogUpload, "PART_BYTES", 100)
    log = tmp_path / "train.log"
    upload = runner.LogUpload(registry, state, log)
    written: list[int] = []
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda url, data: (written.append(len(data)), real(url, data)))
    text = ""
    for i in range(40):
        line = f"step {i} loss {i / 7:.4f}\n"
        text += line
        log.write_text(text)
        upload()
    assert max(written) <= 100  # never the whole log, however long it grew
    assert registry.read_logs(state, 1) == text
