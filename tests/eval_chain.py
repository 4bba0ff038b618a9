"""Pre-training runs that continue into their evaluations, for the tests of every backend: labelled
demo data, a held-out split of it, a tiny spec with an ``eval:`` section, and what ``maestro report``
says about the probes."""

from __future__ import annotations

import csv
import io
from typing import Any

from maestro_cli import maestro

from mae_core.data.demo import build_demo
from orchestrator.testing.specs import merge


def build_held_out(url: str) -> str:
    """Other crops of the demo photos than any training split here (another seed): a held-out split."""
    build_demo(url, 512, (48, 48), seed=1)
    return url


def build_train(url: str, count: int = 512) -> str:
    """A labelled training split (its classes are the demo's source photos)."""
    build_demo(url, count, (48, 48), seed=2)
    return url


def chain_spec(name: str, train: str, val: str, cluster: str, **over: Any) -> dict[str, Any]:
    """A tiny pre-training run (micro ViT, 32 px, one process) whose ``eval:`` section continues it
    with a short linear probe on ``val``."""
    return merge({
        "name": name, "seed": 1, "model": {"arch": "mae_vit_micro_patch4"},
        "data": {"url": train, "input_size": 32}, "optim": {"epochs": 2, "global_batch": 64},
        "resources": {"gpus_per_node": 1, "per_device_batch": 64}, "runtime": {"threads": 1},
        "checkpoint": {"interval_steps": 100}, "metrics": {"log_interval": 1, "flush_s": 1.0},
        "eval": {"val_url": val, "linprobe": {"epochs": 2, "global_batch": 64, "blr": 4.0}},
        "cluster": cluster}, over)


def report_rows(experiment: str, root: str, env: dict[str, str] | None = None) -> list[dict[str, str]]:
    """`maestro report EXPERIMENT --format csv`, one dict per pre-training run."""
    proc = maestro("report", experiment, "--root", root, "--format", "csv", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return list(csv.DictReader(io.StringIO(proc.stdout)))
