"""`maestro report`'s evaluation columns: a top-1 is shown as a result only once its evaluation
completed; one stopped or still running shows its status, not the accuracy of its last epoch."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from mae_core.metrics_log import SegmentWriter
from orchestrator.registry import Registry, RunState
from orchestrator.report import render, rows


def scored(registry: Registry, state: RunState, top1: list[float]) -> None:
    """The validation records an evaluation's trainer leaves, one per epoch."""
    writer = SegmentWriter(registry.run_url(state.experiment, state.run_id), resume_step=0)
    for epoch, value in enumerate(top1, 1):
        writer.append({"step": 10 * epoch, "epoch": epoch, "loss": 1.0, "val_top1": value})
    writer.flush()


def test_an_unfinished_evaluation_shows_its_status_not_the_top1_it_reached(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "runs"))
    run = RunState(experiment="abl", run_id="r1", swept={"model.mask_ratio": 0.75}, status="completed")
    probe = RunState(experiment="abl", run_id="r1.linprobe", job="linprobe", evaluates="r1", status="completed")
    tune = RunState(experiment="abl", run_id="r1.finetune", job="finetune", evaluates="r1", status="cancelled")
    floor = RunState(experiment="abl", run_id="r1.linprobe-step0", job="linprobe", evaluates="r1",
                     status="running")
    for state in (run, probe, tune, floor):
        registry.write_state(state)
    scored(registry, probe, [40.0, 84.567])
    scored(registry, tune, [49.61])  # cancelled after its first of five epochs
    scored(registry, floor, [30.0])

    [row] = rows(registry, registry.runs("abl"))
    assert (row["linprobe_top1"], row["finetune_top1"], row["linprobe-step0_top1"]) == (84.57, "cancelled", "running")
    [parsed] = csv.DictReader(io.StringIO(str(render([row], "csv"))))
    assert (parsed["linprobe_top1"], parsed["finetune_top1"], parsed["linprobe-step0_top1"]) == \
        ("84.57", "cancelled", "running")
    assert "49.61" not in str(render([row], "markdown"))
