"""Sweeps expand into runs with stable, distinct ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from maestro_cli import run_in_process

from orchestrator.spec import load_spec
from orchestrator.sweep import expand

REPO = Path(__file__).resolve().parents[1]
ABLATION = str(REPO / "jobs/ablation_mask_ratio.yaml")


def test_ablation_plan_lists_six_stable_distinct_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_in_process(capsys, "plan", ABLATION, "--set", "data.num_samples=2048")
    assert code == 0, out
    runs = expand(load_spec(ABLATION, ["data.num_samples=2048"]))
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids)) == 6
    # Two swept fields of one section: each run has its own values (no section shared between runs).
    assert [(r.spec.model.mask_ratio, r.spec.model.decoder_depth) for r in runs] == \
        [(m, d) for m in (0.5, 0.75, 0.9) for d in (1, 8)]
    assert all(i in out for i in ids)
    assert ids == [r.run_id for r in expand(load_spec(ABLATION, ["data.num_samples=2048"]))]
    assert ids[0].startswith("mask_ratio-0.5_decoder_depth-1-")


def test_zip_pairs_values_and_grid_multiplies() -> None:
    spec = load_spec(ABLATION, ["data.num_samples=2048", "sweep.grid={}",
                                "sweep.zip={model.mask_ratio: [0.5, 0.9], optim.blr: [0.001, 0.002]}"])
    runs = expand(spec)
    assert [(r.spec.model.mask_ratio, r.spec.optim.blr) for r in runs] == [(0.5, 0.001), (0.9, 0.002)]
    both = load_spec(ABLATION, ["data.num_samples=2048", "sweep.grid={seed: [1, 2, 3]}",
                                "sweep.zip={model.mask_ratio: [0.5, 0.9]}"])
    assert len(expand(both)) == 6


def test_plan_on_slurm_shows_the_recipe_and_the_sbatch_script(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_in_process(capsys, "plan", str(REPO / "jobs/vit_huge_1600ep.yaml"))
    assert code == 0, out
    assert "8x8" in out and "0.0024" in out and "499200" in out  # devices, lr, total steps
    assert "time limit 72:00 h" in out and "timeouts" in out and "preemptions unlimited" in out
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=4320", "#SBATCH --partition=gpu"):
        assert line in out, line
    assert "srun" in out and "submitit" in out


@pytest.mark.parametrize("overrides", [
    ["model.mask_strategy=grid"],  # the spec's grid over mask_ratio: 0.5 and 0.9 would train 0.75
    ["sweep.grid={model.mask_strategy: [random, grid]}", "model.mask_ratio=0.5"],
])
def test_sweeping_a_mask_ratio_grid_masking_ignores_fails_at_plan(capsys: pytest.CaptureFixture[str],
                                                                  overrides: list[str]) -> None:
    args = [a for o in ["data.num_samples=2048", *overrides] for a in ("--set", o)]
    code, out = run_in_process(capsys, "plan", ABLATION, *args)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "sweep point" in lines[0], out
    assert "model.mask_ratio=0.5 has no effect with model.mask_strategy=grid" in lines[0]
