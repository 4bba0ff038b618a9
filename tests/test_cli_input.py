"""Input that is almost right: trailing newlines, paths posing as run names, --debug after the
command, and plans on a machine without SLURM or Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from maestro_cli import REPO, maestro, run_in_process, write_small_spec

from orchestrator.profiles import load_profile
from orchestrator.registry import Registry
from orchestrator.spec import load_spec
from orchestrator.sweep import expand


def write_profile(tmp_path: Path, **fields: Any) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"backend": "slurm", "partition": "low", **fields}))
    return path


def one_line_error(out: str) -> str:
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in out, out
    return lines[0]


# Trailing newlines ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("profile", "field"), [
    ({"partition": "low\n"}, "partition"),
    ({"account": "vision\n"}, "account"),
    ({"extra_sbatch": {"comment": "x\n"}}, "extra_sbatch"),
    ({"extra_sbatch": {"comment\n": "x"}}, "extra_sbatch"),
])
def test_trailing_newline_in_a_profile_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   profile: dict[str, Any], field: str) -> None:
    spec = write_small_spec(tmp_path, write_profile(tmp_path, **profile))
    code, out = run_in_process(capsys, "plan", str(spec))
    assert code == 2 and field in one_line_error(out)


@pytest.mark.parametrize(("over", "field"), [
    ({"name": "exp\n"}, "name"),
    ({"sweep": {"grid": {"model.mask_ratio\n": [0.5]}}}, "model"),
])
def test_trailing_newline_in_a_spec_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                over: dict[str, Any], field: str) -> None:
    code, out = run_in_process(capsys, "plan", str(write_small_spec(tmp_path, **over)))
    assert code == 2 and field in one_line_error(out)


def test_name_override_with_a_trailing_newline_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_in_process(capsys, "plan", str(write_small_spec(tmp_path)), "--set", 'name="exp\\n"')
    assert code == 2 and "name" in one_line_error(out)


# Targets are names, never paths ----------------------------------------------------------------------

@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A registry holding one run, and a run-shaped folder next to it that no target may reach."""
    spec = load_spec(write_small_spec(tmp_path))
    registry = Registry(str(tmp_path / "registry"))
    [run] = expand(spec)
    assert registry.create(run, load_profile(spec.cluster), total_steps=16)
    outside = Registry(str(tmp_path))
    assert outside.create(run, load_profile(spec.cluster), total_steps=16)  # tmp_path/exp/<run_id>/
    # Finished runs: a `watch` that reached either would return instead of waiting for it.
    for where in (registry, outside):
        where.update("exp", run.run_id, status="completed")
    return registry


BAD_TARGETS = ["../exp", "..", "exp/../../exp", "../exp/run", "/etc/passwd", "exp\n", "exp/run/x", "a b", ""]


@pytest.mark.parametrize("command", ["status", "logs", "cancel", "resume"])
@pytest.mark.parametrize("target", BAD_TARGETS, ids=ascii)
def test_run_targets_are_names_not_paths(registry: Registry, capsys: pytest.CaptureFixture[str], command: str,
                                         target: str) -> None:
    code, out = run_in_process(capsys, command, target, "--root", registry.root)
    assert code == 2 and "is not a run or experiment" in one_line_error(out)


@pytest.mark.parametrize("target", [*BAD_TARGETS, "exp/run"], ids=ascii)
def test_experiment_targets_are_names_not_paths(registry: Registry, capsys: pytest.CaptureFixture[str],
                                                target: str) -> None:
    code, out = run_in_process(capsys, "ls", target, "--root", registry.root)
    assert code == 2 and "is not an experiment" in one_line_error(out)
    # In a process with a time limit: `watch` waits for an experiment that has no runs yet.
    proc = maestro("watch", target, "--root", registry.root, timeout=60)
    assert proc.returncode == 2 and "is not an experiment" in one_line_error(proc.stdout + proc.stderr)


def test_good_targets_still_resolve(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    [state] = registry.runs("exp")
    for target in ("exp", f"exp/{state.run_id}", state.run_id, state.run_id[:3]):
        assert [s.key for s in registry.resolve(target)] == [state.key]
    code, out = run_in_process(capsys, "ls", "exp", "--root", registry.root)
    assert code == 0 and state.run_id in out, out


# --debug after the command -----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--debug", "plan", "missing.yaml"], ["plan", "missing.yaml", "--debug"],
                                  ["plan", "--debug", "missing.yaml"]])
def test_debug_is_accepted_before_and_after_the_command(tmp_path: Path, args: list[str]) -> None:
    proc = maestro(*args)
    assert proc.returncode != 0 and "No such option" not in proc.stdout + proc.stderr
    assert "Traceback" in proc.stderr and "UserError: spec missing.yaml does not exist" in proc.stderr


def test_without_debug_the_error_is_one_line() -> None:
    proc = maestro("plan", "missing.yaml")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    one_line_error(proc.stdout + proc.stderr)


# Plans on a laptop -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "absent", "needles"), [
    (["jobs/vit_huge_1600ep.yaml"], ["srun", "sbatch", "squeue", "scontrol"],
     ["#SBATCH --nodes=8", "#SBATCH --partition=gpu", "srun --unbuffered", "submitit.core._submit"]),
    # data/demo is built by the quickstart; its size is given so the plan does not need it.
    (["jobs/ablation_mask_ratio.yaml", "--set", "data.num_samples=2048"], ["ray"],
     ["-m orchestrator.backends.ray supervise", "TorchTrainer"]),
], ids=["slurm", "ray"])
def test_plan_needs_no_cluster_commands_on_the_path(tmp_path: Path, args: list[str], absent: list[str],
                                                    needles: list[str]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    assert all(shutil.which(command, path=str(bin_dir)) is None for command in absent)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", *args], capture_output=True, text=True,
                          cwd=REPO,
                          env={**os.environ, "PATH": str(bin_dir)}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert all(needle in out for needle in needles), proc.stdout
