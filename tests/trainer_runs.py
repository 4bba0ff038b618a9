"""Run the trainer the way users do (new processes through the launcher) and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from mae_core import storage
from mae_core.checkpoint import Checkpointer, load_weights
from mae_core.config import TrainConfig
from mae_core.train import make_model
from orchestrator.testing.specs import merge

TINY: dict[str, Any] = {
    "seed": 3,
    "model": {"arch": "mae_vit_micro_patch4"},
    "data": {"num_samples": 256, "input_size": 32},
    "optim": {"epochs": 1, "global_batch": 32, "warmup_epochs": 0.5, "blr": 1e-3},
    "checkpoint": {"interval_steps": 100},
    "runtime": {"per_device_batch": 16, "threads": 1},
}


def write_config(directory: Path, name: str, output: str, **over: Any) -> Path:
    cfg = merge(TINY, {"output": output, **over})
    TrainConfig.model_validate(cfg)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mae_core.launch", "--nproc", str(nproc), str(config)],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def losses(output: str) -> list[float]:
    lines = storage.read_bytes(storage.join(output, "metrics.jsonl")).decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


def final_weights(config: Path) -> dict[str, torch.Tensor]:
    cfg = TrainConfig.from_yaml(config)
    info = Checkpointer(storage.join(cfg.output, "checkpoints"), rank=0, world_size=1).latest()
    assert info is not None, f"no complete checkpoint under {cfg.output}"
    return load_weights(info, make_model(cfg)).state_dict()
