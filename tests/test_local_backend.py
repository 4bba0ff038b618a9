"""The product end to end on one machine: submit, watch, cancel, resume, with real processes."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from maestro_cli import assert_goodput_adds_up, attempts_one_at_a_time, maestro, resume_at_once, wait_for, weights
from trainer_runs import losses

from mae_core import storage
from mae_core.contract import latest_checkpoint
from orchestrator.registry import Registry, RunState

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAESTRO_STATE_DIR", str(tmp_path / "state"))


def write_spec(tmp_path: Path, name: str, **over: Any) -> Path:
    raw: dict[str, Any] = {
        "name": name, "seed": 1, "model": {"arch": "mae_vit_micro_patch4"},
        "data": {"num_samples": 256, "input_size": 32},
        "optim": {"epochs": 3, "global_batch": 32, "warmup_epochs": 1, "blr": 1e-3},
        "resources": {"gpus_per_node": 2, "per_device_batch": 16}, "runtime": {"threads": 1},
        "checkpoint": {"interval_steps": 4}, "metrics": {"log_interval": 1, "flush_s": 2.0},
        "cluster": str(REPO / "cluster_configs/local.yaml"), **over}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def only_run(registry: Registry, experiment: str) -> RunState:
    [state] = registry.runs(experiment)
    return state


@pytest.mark.parametrize("where", ["local", "s3"])
def test_submitted_run_completes_with_metrics_and_checkpoint(tmp_path: Path, request: pytest.FixtureRequest,
                                                             where: str) -> None:
    root = str(tmp_path / "registry") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/registry"
    spec = write_spec(tmp_path, "e2e")
    proc = maestro("submit", str(spec), "--root", root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    registry = Registry(root)
    watch = maestro("watch", "e2e", "--root", root, "--interval", "0.5", timeout=240)
    assert watch.returncode == 0, watch.stdout + watch.stderr
    state = only_run(registry, "e2e")
    assert state.status == "completed" and state.step == state.total_steps == 24
    assert state.last_checkpoint_step == 24 and state.attempts == 1
    run_url = registry.run_url("e2e", state.run_id)
    assert len(losses(run_url)) == 24
    assert storage.exists(storage.join(run_url, "checkpoints/step-000000024/COMMITTED"))
    assert "step 24/24" in maestro("logs", state.run_id, "--root", root).stdout
    listing = maestro("ls", "--root", root).stdout
    assert state.run_id in listing and "completed" in listing and "24/24" in listing


def test_cancel_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    root = str(tmp_path / "registry")
    registry = Registry(root)
    assert maestro("submit", str(write_spec(tmp_path, "straight", optim={"epochs": 30, "global_batch": 32})),
                   "--root", root).returncode == 0
    wait_for(lambda: only_run(registry, "straight").status == "completed", what="straight run")

    assert maestro("submit", str(write_spec(tmp_path, "stopped", optim={"epochs": 30, "global_batch": 32})),
                   "--root", root).returncode == 0
    wait_for(lambda: only_run(registry, "stopped").status == "running", what="run to start")
    # Into training (its first checkpoint is committed), well before the end, however slow start-up is.
    checkpoints = storage.join(registry.run_url("stopped", only_run(registry, "stopped").run_id), "checkpoints")
    wait_for(lambda: latest_checkpoint(checkpoints) is not None, what="the first checkpoint")
    assert maestro("cancel", "stopped", "--root", root).returncode == 0
    resume_at_once("stopped", root)  # refused until the cancelled attempt has checkpointed and left
    wait_for(lambda: only_run(registry, "stopped").status == "completed", what="resumed run")
    resumed, straight = only_run(registry, "stopped"), only_run(registry, "straight")
    assert resumed.attempts == 2 and resumed.run_id == straight.run_id
    assert losses(registry.run_url("stopped", resumed.run_id)) == losses(registry.run_url("straight", straight.run_id))
    a, b = weights(registry, resumed), weights(registry, straight)
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = registry.events("stopped", resumed.run_id)
    assert [e["event"] for e in events].count("started") == 2 and "resumed" in [e["event"] for e in events]
    [cancelled] = [e for e in events if e["event"] == "cancelled"]
    assert 0 < cancelled["last_checkpoint_step"] < 240
    [_, second] = [e for e in events if e["event"] == "started"]
    assert second["resumed_from_step"] == cancelled["last_checkpoint_step"]
    attempts_one_at_a_time(registry, resumed)
    # Goodput: the cancelled attempt checkpointed at the step it stopped, so it lost no work.
    assert cancelled["ended_by"] == "cancelled" and cancelled["step"] == cancelled["last_checkpoint_step"]
    assert_goodput_adds_up(cancelled["goodput"], lost=False)
    [completed] = [e for e in events if e["event"] == "completed"]
    assert_goodput_adds_up(completed["goodput"], lost=False)
    total = resumed.goodput.model_dump()
    assert total == pytest.approx({k: cancelled["goodput"][k] + completed["goodput"][k] for k in total})
    report = json.loads(maestro("report", "stopped", "--root", root, "--format", "json").stdout)
    assert [(r["attempts"], r["ended_by"]) for r in report] == [(2, "cancelled 1, completed 1")]
    assert report[0]["goodput"] == pytest.approx(resumed.goodput.ratio, abs=1e-4)


def test_submitting_twice_does_not_duplicate_and_cancel_stops_every_run(tmp_path: Path) -> None:
    root = str(tmp_path / "registry")
    spec = write_spec(tmp_path, "grid", sweep={"grid": {"model.mask_ratio": [0.5, 0.75, 0.9],
                                                         "model.decoder_depth": [1, 2]}},
                      optim={"epochs": 1, "global_batch": 32})
    assert "submitted 6 run(s)" in maestro("submit", str(spec), "--root", root).stdout
    again = maestro("submit", str(spec), "--root", root)
    assert again.returncode == 0 and "submitted 0 run(s)" in again.stdout and "already exists" in again.stdout
    registry = Registry(root)
    states = registry.runs("grid")
    assert len(states) == 6 and all(len(s.job_ids) == 1 for s in states)
    # Cancelled at once: the running run is still starting up, the others wait for the slot.
    assert maestro("cancel", "grid", "--root", root).returncode == 0
    wait_for(lambda: all(s.status in ("cancelled", "completed", "failed") for s in registry.runs("grid")),
             what="cancel all")
    assert {s.status for s in registry.runs("grid")} <= {"cancelled", "completed"}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_readers_never_see_a_torn_state_file(tmp_path: Path, request: pytest.FixtureRequest, where: str) -> None:
    root = str(tmp_path / "registry") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/registry"
    registry = Registry(root)
    state = RunState(experiment="load", run_id="r1", message="x" * 20_000)
    registry.write_state(state)
    url = storage.join(registry.run_url("load", "r1"), "state.json")
    stop = threading.Event()
    bad: list[str] = []

    def read() -> None:
        while not stop.is_set():
            try:
                json.loads(storage.read_bytes(url))
            except ValueError as e:
                bad.append(str(e))

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(150):
        state.step = step
        state.message = str(step) * (1 + step * 50)
        registry.write_state(state)
    stop.set()
    reader.join()
    assert not bad
    assert registry.state("load", "r1").step == 149


@pytest.mark.parametrize("where", ["local", "s3"])
def test_listing_follows_every_state_change(tmp_path: Path, request: pytest.FixtureRequest, where: str) -> None:
    # On object stores `ls` serves unchanged runs from the experiment's index; a run that changed
    # since must still show its new state, whoever wrote it.
    root = str(tmp_path / "registry") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/registry"
    writer, reader = Registry(root), Registry(root)
    for i in range(5):
        writer.write_state(RunState(experiment="grid", run_id=f"r{i}", step=i))
    assert [s.step for s in reader.runs("grid")] == [0, 1, 2, 3, 4]
    for i in (1, 3):
        writer.update("grid", f"r{i}", status="running", step=100 + i)
    writer.write_state(RunState(experiment="grid", run_id="r5", step=5))
    listed = {s.run_id: s for s in reader.runs()}
    assert [listed[f"r{i}"].step for i in range(6)] == [0, 101, 2, 103, 4, 5]
    assert listed["r1"].status == listed["r3"].status == "running" and listed["r0"].status == "pending"
    assert Registry(root).runs("grid") == reader.runs("grid")
