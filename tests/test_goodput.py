"""Goodput and the sweep report, from real local runs: a killed attempt's lost time is the work
after its last checkpoint, and `maestro report` tells every run's story in every format."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from maestro_cli import REPO, assert_goodput_adds_up, maestro, trainer_pids, wait_for

from mae_core.metrics_log import read_records
from mae_core.progress import read_progress
from orchestrator.registry import HUNG_FLUSHES, Registry, RunState


@pytest.fixture(autouse=True)
def private_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAESTRO_STATE_DIR", str(tmp_path / "state"))


def by_ratio(registry: Registry) -> dict[float, RunState]:
    return {s.swept["model.mask_ratio"]: s for s in registry.runs("sweep")}


def test_killed_attempt_loses_the_work_after_its_checkpoint_and_the_report_shows_it(tmp_path: Path) -> None:
    root = str(tmp_path / "registry")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "sweep", "seed": 3, "model": {"arch": "mae_vit_micro_patch4"},
        "data": {"num_samples": 256, "input_size": 32},
        "optim": {"epochs": 40, "global_batch": 32, "warmup_epochs": 1, "blr": 1e-3},
        "resources": {"gpus_per_node": 1, "per_device_batch": 32}, "runtime": {"threads": 1},
        "checkpoint": {"interval_steps": 40}, "metrics": {"log_interval": 1, "flush_s": 0.2},
        "sweep": {"grid": {"model.mask_ratio": [0.5, 0.75]}},
        "cluster": str(REPO / "cluster_configs/local.yaml")}))
    assert maestro("submit", str(spec), "--root", root).returncode == 0
    registry = Registry(root)
    victim = by_ratio(registry)[0.5]
    run_url = registry.run_url("sweep", victim.run_id)

    def past_a_checkpoint() -> bool:
        clock = (read_progress(run_url) or {}).get("goodput") or {}
        return clock.get("saved_step") is not None and read_progress(run_url)["step"] >= clock["saved_step"] + 3

    wait_for(past_a_checkpoint, what="steps after the first checkpoint")
    # While its first attempt runs, `ls` shows that attempt's checkpoint: the state itself only
    # records one when an attempt ends.
    flushed = read_progress(run_url) or {}
    assert flushed["checkpoint_step"] == flushed["goodput"]["saved_step"]  # saves are synchronous here
    [live] = registry.with_progress([registry.state("sweep", victim.run_id)])
    assert live.status == "running" and registry.state("sweep", victim.run_id).last_checkpoint_step is None
    assert live.last_checkpoint_step is not None and live.last_checkpoint_step % 40 == 0
    assert live.last_checkpoint_step >= flushed["checkpoint_step"]
    pids = trainer_pids(victim.run_id)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: by_ratio(registry)[0.5].status == "failed", what="the killed run to fail")
    clock = read_progress(run_url)["goodput"]  # type: ignore[index]  # its trainer is dead: final
    [failed] = [e for e in registry.events("sweep", victim.run_id) if e["event"] == "failed"]
    lost = failed["goodput"]
    assert failed["ended_by"] == "failure" and clock["attempt"] == 1
    # Kept: the steps up to its checkpoint. Lost: from that checkpoint until the kill, which is at
    # least up to the last step it recorded after the checkpoint, and at most until its end was recorded.
    assert lost["productive_s"] == pytest.approx(clock["step_s_at_save"])
    after = [r["time"] for r in read_records(run_url) if r["step"] > clock["saved_step"]]
    assert after and max(after) - clock["saved_at"] <= lost["lost_s"] <= failed["time"] - clock["saved_at"]
    assert_goodput_adds_up(lost, lost=True)

    assert maestro("resume", f"sweep/{victim.run_id}", "--root", root).returncode == 0
    wait_for(lambda: all(s.status == "completed" for s in registry.runs("sweep")), what="both runs to complete")
    runs = by_ratio(registry)
    assert_goodput_adds_up(runs[0.5].goodput.model_dump(), lost=True)
    assert_goodput_adds_up(runs[0.75].goodput.model_dump(), lost=False)
    assert "goodput" in maestro("status", f"sweep/{victim.run_id}", "--root", root).stdout

    table = list(csv.DictReader(io.StringIO(maestro("report", "sweep", "--root", root, "--format", "csv").stdout)))
    assert list(table[0]) == ["run", "model.mask_ratio", "status", "final_loss", "best_loss", "epochs", "wall_h",
                              "gpu_h", "attempts", "ended_by", "goodput"]
    rows: dict[float, dict[str, Any]] = {float(r["model.mask_ratio"]): r for r in table}
    assert sorted(rows) == [0.5, 0.75]
    for ratio, row in rows.items():
        state = runs[ratio]
        losses = [r["loss"] for r in read_records(registry.run_url("sweep", state.run_id))]
        assert row["run"] == state.key and row["status"] == "completed" and float(row["epochs"]) == 40
        assert float(row["final_loss"]) == losses[-1] and float(row["best_loss"]) == min(losses)
        assert float(row["goodput"]) == pytest.approx(state.goodput.ratio, abs=1e-4)
        assert float(row["gpu_h"]) == pytest.approx(state.goodput.allocated_s / 3600, abs=1e-4)
    assert (rows[0.5]["attempts"], rows[0.5]["ended_by"]) == ("2", "completed 1, failure 1")
    assert (rows[0.75]["attempts"], rows[0.75]["ended_by"]) == ("1", "completed 1")

    markdown = maestro("report", "sweep", "--root", root, "--format", "markdown").stdout.splitlines()
    assert markdown[0] == "| " + " | ".join(table[0]) + " |" and len(markdown) == 4
    assert all(line.count("|") == len(table[0]) + 1 for line in markdown)
    assert len(json.loads(maestro("report", "sweep", "--root", root, "--format", "json").stdout)) == 2
    bad = maestro("report", "sweep", "--root", root, "--format", "xls")
    assert bad.returncode == 2 and "--format" in bad.stdout and len(bad.stdout.strip().splitlines()) == 1


def test_a_stale_heartbeat_shows_hung(tmp_path: Path) -> None:
    """Without a profile hang timeout, a running trainer that missed HUNG_FLUSHES heartbeats is shown
    hung; a new attempt still starting (its predecessor's heartbeat is old) is not."""
    registry = Registry(str(tmp_path / "registry"))
    now = time.time()
    state = RunState(experiment="e", run_id="r", status="running", flush_s=10.0, attempt_started=now - 3600,
                     heartbeat=now - 10.0 * HUNG_FLUSHES - 5)
    assert state.hung
    assert not state.model_copy(update={"heartbeat": now - 10.0 * HUNG_FLUSHES + 5}).hung
    assert not state.model_copy(update={"attempt_started": now - 5}).hung  # restarting, not hung
    assert not state.model_copy(update={"status": "requeued"}).hung
    registry.write_state(state)
    assert "hung" in maestro("ls", "--root", registry.root).stdout
