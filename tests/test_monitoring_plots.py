"""Watching runs without a terminal session: `maestro plot` draws a sweep's curves, and `maestro
sync-tb` brings an S3 registry's TensorBoard files to a local folder TensorBoard can read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from maestro_cli import run_in_process, wait_for
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mae_core import storage
from mae_core.metrics_log import TB_DIR, SegmentWriter, read_records
from orchestrator import plot
from orchestrator.errors import UserError
from orchestrator.registry import FINISHED, Registry, RunState

TAB10 = [tuple(round(c * 255) for c in rgb) for rgb in colormaps["tab10"].colors]


@pytest.fixture(autouse=True)
def private_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAESTRO_STATE_DIR", str(tmp_path / "state"))


def write_spec(tmp_path: Path, name: str, concurrent_runs: int = 1, **over: Any) -> Path:
    """A tiny spec: 8 steps of one process, a record per step, on a local profile that runs
    ``concurrent_runs`` runs side by side."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"backend": "local", "max_concurrent_runs": concurrent_runs}))
    raw: dict[str, Any] = {
        "name": name, "seed": 1, "model": {"arch": "mae_vit_micro_patch4"},
        "data": {"num_samples": 256, "input_size": 32},
        "optim": {"epochs": 1, "global_batch": 32, "warmup_epochs": 0.5, "blr": 1e-3},
        "resources": {"gpus_per_node": 1, "per_device_batch": 32}, "runtime": {"threads": 1},
        "checkpoint": {"interval_steps": 4}, "metrics": {"log_interval": 1, "flush_s": 2.0},
        "cluster": str(cluster), **over}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def finished(registry: Registry, experiment: str, runs: int) -> list[RunState]:
    """The experiment's runs once all have ended; each must have completed."""
    wait_for(lambda: len(states := registry.runs(experiment)) == runs and all(s.status in FINISHED for s in states),
             timeout=240, what=f"{experiment} to finish")
    states = registry.runs(experiment)
    assert all(s.status == "completed" for s in states), [(s.run_id, s.status, s.message) for s in states]
    return states


def colours(png: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(px) for px in np.round(png[..., :3] * 255).astype(int).reshape(-1, 3)}


def test_plot_of_a_finished_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "registry")
    spec = write_spec(tmp_path, "masks", concurrent_runs=2, sweep={"grid": {"model.mask_ratio": [0.5, 0.75]}})
    code, out = run_in_process(capsys, "submit", str(spec), "--root", root)
    assert code == 0 and "submitted 2 run(s)" in out, out
    registry = Registry(root)
    states = finished(registry, "masks", 2)

    # What the command drew, as plot_runs returned it (the CLI imports it when it runs).
    drawn: list[dict[str, list[tuple[float, float]]]] = []

    def recording(*args: Any, **kwargs: Any) -> dict[str, list[tuple[float, float]]]:
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    real = plot.plot_runs
    monkeypatch.setattr(plot, "plot_runs", recording)
    output = tmp_path / "plots" / "loss.png"  # its folder does not exist yet
    code, out = run_in_process(capsys, "plot", "masks", "-o", str(output), "--root", root)
    assert code == 0 and "loss of 2 run(s)" in out, out

    png = imread(output)
    assert png.shape[:2] == (600, 1000)
    seen = colours(png)
    assert TAB10[0] in seen and TAB10[1] in seen  # one line per run...
    assert TAB10[2] not in seen  # ...and no third
    [curves] = drawn
    by_ratio = {s.swept["model.mask_ratio"]: s for s in states}
    expected = {}
    for ratio, name in ((0.5, "mask_ratio=0.5"), (0.75, "mask_ratio=0.75")):
        records = read_records(registry.run_url("masks", by_ratio[ratio].run_id))
        assert [r["step"] for r in records] == list(range(1, 9))
        expected[name] = [(r["epoch"], r["loss"]) for r in records]
    assert curves == expected
    assert expected["mask_ratio=0.5"] != expected["mask_ratio=0.75"]  # two different runs, not one twice

    code, out = run_in_process(capsys, "plot", "masks", "-o", str(tmp_path / "nope.png"), "--metric", "nope",
                               "--root", root)
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "'nope'" in out and "loss" in out and "grad_norm" in out
    assert not (tmp_path / "nope.png").exists()


def test_resumes_and_preemptions_are_marked_on_the_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run preempted at step 30 after a checkpoint at 20, resumed from 20 and still training:
    drawn from its records and events, no trainer needed."""
    registry = Registry(str(tmp_path / "registry"))
    state = RunState(experiment="exp", run_id="r1", status="running", attempts=2)
    registry.write_state(state)
    output = registry.run_url("exp", "r1")

    def attempt(resume: int, steps: range, loss: float) -> None:
        writer = SegmentWriter(output, resume)
        for step in steps:
            writer.append({"step": step, "epoch": step / 10, "loss": loss + step / 100, "lr": 1e-3})
        writer.flush()

    attempt(0, range(1, 31), 1.0)
    registry.event(state, "started", resumed_from_step=None)
    registry.event(state, "requeued", step=30, last_checkpoint_step=20)
    attempt(20, range(21, 36), 2.0)
    registry.event(state, "started", resumed_from_step=20)
    figures: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])

    curves = plot.plot_runs(registry, registry.runs("exp"), str(tmp_path / "loss.png"))
    # The clean curve: the first attempt's steps past 20 are replaced by the second's.
    assert curves == {"r1": [(s / 10, 1.0 + s / 100) for s in range(1, 21)] +
                      [(s / 10, 2.0 + s / 100) for s in range(21, 36)]}
    [fig] = figures
    top, lr = fig.axes
    assert lr.get_xlabel() == "epoch" and lr.get_ylabel() == "lr"
    marks = {line.get_marker(): (float(line.get_xdata()[0]), float(line.get_ydata()[0]))
             for line in top.get_lines() if line.get_linestyle() == "None"}
    # Both on the clean curve: the resume at step 20, the stop at step 30 (now the second attempt's).
    assert marks == {"^": (2.0, pytest.approx(1.2)), "v": (3.0, pytest.approx(2.3))}
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert legend == ["r1", "resumed from checkpoint", "preempted / requeued"]


def test_plot_refuses_runs_without_metrics(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "registry"))
    registry.write_state(RunState(experiment="exp", run_id="r1"))
    with pytest.raises(UserError, match="'loss'.*none has logged metrics"):
        plot.plot_runs(registry, registry.runs("exp"), str(tmp_path / "loss.png"))
    assert not (tmp_path / "loss.png").exists()


def test_sync_tb_from_s3_gives_tensorboard_every_logged_step(tmp_path: Path, s3_bucket: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = f"{s3_bucket}/registry"
    code, out = run_in_process(capsys, "submit", str(write_spec(tmp_path, "tb")), "--root", root)
    assert code == 0, out
    registry = Registry(root)
    [state] = finished(registry, "tb", 1)
    run_url = registry.run_url("tb", state.run_id)
    stored = [e for e in storage.listdir(storage.join(run_url, TB_DIR)) if "tfevents" in e["name"]]
    assert stored

    dest = tmp_path / "tensorboard"
    code, out = run_in_process(capsys, "sync-tb", str(dest), "--root", root)
    assert code == 0 and f"copied {len(stored)} event file(s)" in out, out
    acc = EventAccumulator(str(dest / "tb" / state.run_id))
    acc.Reload()
    records = read_records(run_url)
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in records] == list(range(1, 9))
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)

    code, out = run_in_process(capsys, "sync-tb", str(dest), "--root", root)
    assert code == 0 and "copied 0 event file(s)" in out, out
    # A local copy that differs in size from the registry's (a file still growing) is fetched again.
    copy = dest / "tb" / state.run_id / stored[0]["name"].rsplit("/", 1)[-1]
    with open(copy, "r+b") as f:
        f.truncate(os.path.getsize(copy) // 2)
    code, out = run_in_process(capsys, "sync-tb", str(dest), "--root", root)
    assert code == 0 and "copied 1 event file(s)" in out, out
    assert copy.stat().st_size == stored[0]["size"]
