"""Specs: every shipped spec validates, and any bad input is one line naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from maestro_cli import run_in_process
from pydantic import ValidationError

from mae_core.config import ModelConfig
from orchestrator.spec import Derived, load_spec
from orchestrator.sweep import expand

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_shipped_spec_validates(path: Path) -> None:
    spec = load_spec(path)
    assert expand(spec)


def test_vit_huge_recipe_derives_the_paper_numbers() -> None:
    spec = load_spec(REPO / "jobs/vit_huge_1600ep.yaml")
    d = Derived.of(spec)
    assert d.lr == pytest.approx(2.4e-3) and d.world_size == 64 and d.accum_steps == 1
    assert d.steps_per_epoch == 312 and d.total_steps == 1600 * 312 and d.warmup_steps == 40 * 312


def test_global_batch_is_invariant_when_devices_change() -> None:
    base = load_spec(REPO / "jobs/vit_huge_1600ep.yaml")
    fewer = load_spec(REPO / "jobs/vit_huge_1600ep.yaml", ["resources.nodes=2"])
    assert Derived.of(fewer).accum_steps == 4 and Derived.of(fewer).lr == Derived.of(base).lr
    assert expand(fewer)[0].run_id == expand(base)[0].run_id  # same numbers, same run


def base_spec() -> dict[str, Any]:
    return {"name": "fuzz", "data": {"num_samples": 512}, "optim": {"global_batch": 64},
            "resources": {"per_device_batch": 32, "gpus_per_node": 2},
            "cluster": str(REPO / "cluster_configs/local.yaml")}


FIELDS = [("optim", "global_batch"), ("optim", "epochs"), ("optim", "blr"), ("resources", "per_device_batch"),
          ("resources", "nodes"), ("model", "mask_ratio"), ("model", "arch"), ("data", "input_size"),
          ("checkpoint", "keep_last"), ("sweep", "grid"), ("name", None)]
BAD_VALUES = st.one_of(st.integers(-10**6, 0), st.integers(1, 10**6), st.floats(allow_nan=True),
                       st.text(max_size=12), st.lists(st.integers(), max_size=3), st.none(),
                       st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=BAD_VALUES, extra=st.one_of(st.none(), st.text(min_size=1, max_size=10)))
def test_fuzzed_specs_fail_with_one_line_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          field: tuple[str, str | None], value: Any,
                                                          extra: str | None) -> None:
    raw = base_spec()
    section, key = field
    if key is None:
        raw[section] = value
    else:
        raw.setdefault(section, {})[key] = value
    if extra is not None:
        raw.setdefault("optim", {})[f"x_{extra}"] = 1
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, out = run_in_process(capsys, "plan", str(path))
    assert "Traceback" not in out
    if code != 0:
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), out
        # It names one of the fields this example broke.
        named_field = (f"{section}.{key}" if key else section) in lines[0]
        named_extra = extra is not None and "optim." in lines[0] and "unknown field" in lines[0]
        assert named_field or named_extra, out


@pytest.mark.parametrize(("override", "needle"), [
    ("optim.global_batc=64", "did you mean 'global_batch'"),
    ("optim.global_batch=100", "optim.global_batch=100 is not divisible"),
    ("resources.per_device_batch=-1", "resources.per_device_batch"),
    ("model.mask_strategy=checkers", "model.mask_strategy"),
    ("cluster=nowhere.yaml", "cluster profile nowhere.yaml does not exist"),
    ("sweep.zip={model.mask_ratio: [0.5], optim.blr: [1, 2]}", "sweep.zip lists have different lengths"),
    ("sweep.grid={model.mask_ratoi: [0.5]}", "did you mean 'mask_ratio'"),
])
def test_specific_mistakes_get_specific_fixes(capsys: pytest.CaptureFixture[str], tmp_path: Path, override: str,
                                              needle: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec()))
    code, out = run_in_process(capsys, "plan", str(path), "--set", override)
    assert code != 0 and needle in out and len(out.strip().splitlines()) == 1, out


def test_schema_is_json_schema_of_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    code, out = run_in_process(capsys, "schema")
    schema = json.loads(out)
    assert code == 0 and {"model", "optim", "resources", "sweep"} <= set(schema["properties"])


def test_cli_starts_without_importing_torch() -> None:
    # `maestro ls` over a large registry must answer in well under 2 s; torch alone takes ~2 s to import.
    code = "import sys, orchestrator.cli, orchestrator.registry; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# What runs before the trainer starts: the CLI, the runner, every backend (a SLURM task unpickles
# its callable from orchestrator.backends.slurm) and the local launcher.
BEFORE_THE_TRAINER = ["orchestrator.cli", "orchestrator.runner", "orchestrator.backends.local",
                      "orchestrator.backends.slurm", "orchestrator.backends.ray", "mae_core.launch"]


@pytest.mark.parametrize("module", BEFORE_THE_TRAINER)
def test_orchestration_imports_no_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"{module} imports torch"


def test_ls_imports_no_torch(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", "ls", "--root",
                           str(tmp_path)], capture_output=True, text=True)
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert proc.returncode == 0 and "orchestrator.registry" in imported, proc.stderr[-2000:]
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]


def test_moved_resources_keys_still_work_with_a_one_line_deprecation(tmp_path: Path) -> None:
    raw = base_spec()
    raw["resources"]["threads"] = 1
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == ["warning: resources.threads is deprecated; write it as runtime.threads"]
    assert load_spec(path).train_config("out").runtime.threads == 1


def test_grid_masking_refuses_a_mask_ratio_it_would_ignore(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec()))
    code, out = run_in_process(capsys, "plan", str(path), "--set", "model.mask_strategy=grid",
                               "--set", "model.mask_ratio=0.5")
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "model.mask_ratio=0.5 has no effect" in lines[0], out
    assert "set model.mask_ratio: 0.75" in lines[0]
    code, out = run_in_process(capsys, "plan", str(path), "--set", "model.mask_strategy=grid")
    assert code == 0, out  # the ratio grid masking implements
    with pytest.raises(ValidationError, match="model.mask_ratio=0.9"):  # the trainer's own config refuses it too
        ModelConfig(mask_strategy="grid", mask_ratio=0.9)
