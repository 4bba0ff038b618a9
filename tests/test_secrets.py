"""Credentials: refused in every input with the field named and the value never shown, and never
written anywhere by a complete run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from maestro_cli import maestro, run_in_process, wait_for, write_small_spec

from orchestrator.registry import Registry

CANARY = "canary-5d0e9c2a7b41f3"


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one error line of `maestro ARGS`, which must not show the canary."""
    code, out = run_in_process(capsys, *args)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in out, out
    assert CANARY not in out and "carries a credential" in out, out
    return lines[0]


@pytest.mark.parametrize(("profile", "field"), [
    ({"backend": "slurm", "setup": ["module load cuda", f"export AWS_SECRET_ACCESS_KEY={CANARY}"]}, "setup[1]"),
    ({"backend": "slurm", "setup": [f"export HF_TOKEN={CANARY}"]}, "setup[0]"),
    ({"backend": "slurm", "setup": [f"aws s3 cp 's3://b/x?X-Amz-Signature={CANARY}' ."]}, "setup[0]"),
    ({"backend": "slurm", "setup": [f"curl -H 'Authorization: Bearer {CANARY}' https://h/x"]}, "setup[0]"),
    ({"backend": "slurm", "extra_sbatch": {"comment": f"GITHUB_TOKEN={CANARY}"}}, "extra_sbatch.comment"),
    ({"backend": "ray", "address": f"http://user:{CANARY}@head:8265"}, "address"),
    ({"backend": "ray", "address": "http://head:8265", "runtime_env": {"env_vars": {"AWS_SESSION_TOKEN": CANARY}}},
     "runtime_env.env_vars.AWS_SESSION_TOKEN"),
    ({"backend": "ray", "address": "http://head:8265",
      "runtime_env": {"working_dir": f"https://b.s3.amazonaws.com/wd.zip?X-Amz-Signature={CANARY}"}},
     "runtime_env.working_dir"),
    ({"backend": "ray", "address": "http://head:8265",
      "runtime_env": {"pip": ["torch", f"git+https://user:{CANARY}@github.com/org/pkg.git"]}},
     "runtime_env.pip[1]"),
])
def test_credentials_in_a_profile_are_refused_without_showing_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], profile: dict[str, Any], field: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(profile))
    line = refused(capsys, "plan", str(write_small_spec(tmp_path, path)))
    assert f" {field} carries a credential" in line


@pytest.mark.parametrize(("over", "field"), [
    ({"data": {"url": f"s3://AKIAEXAMPLE:{CANARY}@bucket/shards"}}, "data.url"),
    ({"data": {"url": f"https://h.example/shards/train-{{000000..000009}}.tar?X-Amz-Signature={CANARY}"}},
     "data.url"),
    ({"data": {"url": f"https://h.example/shards.tar?token={CANARY}"}}, "data.url"),
    ({"data": {"url": ["data/demo", f"https://acct.blob.core.windows.net/c/x.tar?sv=2024&sig={CANARY}"]}},
     "data.url[1]"),
    ({"storage": {"root": f"s3://user:{CANARY}@bucket/runs"}}, "storage.root"),
    ({"sweep": {"grid": {"data.url": ["data/demo", f"s3://u:{CANARY}@b/x"]}}}, "sweep.grid.data.url[1]"),
])
def test_credentials_in_a_spec_are_refused_without_showing_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], over: dict[str, Any], field: str) -> None:
    line = refused(capsys, "plan", str(write_small_spec(tmp_path, **over)))
    assert f" {field} carries a credential" in line


def test_a_credential_given_with_set_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(capsys, "plan", str(write_small_spec(tmp_path)), "--set", f"data.url=s3://b/x?X-Amz-Credential={CANARY}")
    assert " data.url carries a credential" in line


def test_field_names_that_look_like_credentials_are_not_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # model.mask_tokens_in_encoder contains TOKEN; only values are judged in a spec.
    code, out = run_in_process(capsys, "plan", str(write_small_spec(tmp_path, model={"mask_tokens_in_encoder": True})))
    assert code == 0, out


def test_no_credential_reaches_the_registry_logs_or_checkpoints(
        tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete run on S3 with credentials in the environment of every process: no registry
    object (spec, state, events, metrics, logs, checkpoints) and no local file holds one."""
    secret_key, session_token = f"{CANARY}-key", f"{CANARY}-session"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)  # moto accepts any key
    monkeypatch.setenv("AWS_SESSION_TOKEN", session_token)
    monkeypatch.setenv("MAESTRO_CANARY", CANARY)
    monkeypatch.setenv("MAESTRO_STATE_DIR", str(tmp_path / "state"))
    root = f"{s3_bucket}/registry"
    spec = write_small_spec(tmp_path, name="canary", seed=1, model={"arch": "mae_vit_micro_patch4"},
                      data={"num_samples": 128, "input_size": 32},
                      optim={"epochs": 2, "global_batch": 32, "blr": 1e-3},
                      resources={"gpus_per_node": 2, "per_device_batch": 16}, runtime={"threads": 1},
                      checkpoint={"interval_steps": 4})
    proc = maestro("submit", str(spec), "--root", root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    registry = Registry(root)
    wait_for(lambda: all(s.status in ("completed", "failed") for s in registry.runs("canary")), timeout=300,
             what="the run to finish")
    [state] = registry.runs("canary")
    assert state.status == "completed" and state.step == state.total_steps == 8, state.message
    log = maestro("logs", state.run_id, "--root", root).stdout
    assert "step 8/8" in log

    import s3fs

    fs = s3fs.S3FileSystem()
    objects = fs.find(s3_bucket.removeprefix("s3://"))
    assert any("/checkpoints/step-000000008/" in p for p in objects) and any("/logs/" in p for p in objects)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    for where, blob in [*((p, fs.cat_file(p)) for p in objects), *((str(p), p.read_bytes()) for p in files),
                        ("maestro logs", log.encode())]:
        assert CANARY.encode() not in blob, where  # the key and the token contain it
