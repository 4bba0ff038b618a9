"""Run the trainer the way users do (new processes through the launcher) and read what it wrote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.state_dict import get_state_dict

from mae_core import storage
from mae_core.checkpoint import Checkpointer, load_weights
from mae_core.config import TrainConfig
from mae_core.contract import CHECKPOINTS_DIR, scan_checkpoints
from mae_core.metrics_log import read_records
from mae_core.optim import build_optimizer
from mae_core.train import make_model
from orchestrator.testing.specs import merge

TINY: dict[str, Any] = {
    "seed": 3,
    "model": {"arch": "mae_vit_micro_patch4"},
    "data": {"num_samples": 256, "input_size": 32},
    "optim": {"epochs": 1, "global_batch": 32, "warmup_epochs": 0.5, "blr": 1e-3},
    "checkpoint": {"interval_steps": 100},
    "runtime": {"per_device_batch": 16, "threads": 1},
    # One record per step: tests compare whole curves step by step.
    "metrics": {"log_interval": 1, "flush_s": 2.0},
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
    """The run's curve, which must hold each step once, in order (a spec logging every step)."""
    records = read_records(output)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


def final_weights(config: Path) -> dict[str, torch.Tensor]:
    cfg = TrainConfig.from_yaml(config)
    info = Checkpointer(storage.join(cfg.output, "checkpoints"), rank=0, world_size=1).latest()
    assert info is not None, f"no complete checkpoint under {cfg.output}"
    return load_weights(info, make_model(cfg)).state_dict()


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), value


def checkpoint_state(config: Path, step: int | None = None) -> dict[str, Any]:
    """Everything a checkpoint holds for the model and the optimizer (parameters, AdamW moments and
    step counts, param groups), as full tensors under dotted keys: the latest complete checkpoint
    of the config's output, or the one at ``step``."""
    cfg = TrainConfig.from_yaml(config)
    complete, _ = scan_checkpoints(storage.join(cfg.output, CHECKPOINTS_DIR))
    info = complete[-1] if step is None else next(c for c in complete if c.step == step)
    model = make_model(cfg)
    optimizer = build_optimizer(model, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2))
    model_sd, optim_sd = get_state_dict(model, optimizer)  # creates the optimizer state to load into
    state = {"train": {"model": model_sd, "optim": optim_sd}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=FsspecReader(info.url), no_dist=True)
    return dict(_flatten(state["train"]))


def assert_same_state(a: dict[str, Any], b: dict[str, Any], exact: bool = True) -> None:
    """Every tensor bit-identical (``exact``) or within float tolerance; other values equal."""
    assert a.keys() == b.keys()
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg_sq") for k in a)  # optimizer state is in
    for k in a:
        if not isinstance(a[k], torch.Tensor):
            assert a[k] == b[k], k
        elif exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


STEP_LINE = re.compile(r"step (\d+)/")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def run_until_step(config: Path, nproc: int, step: int) -> tuple[subprocess.Popen[str], int]:
    """Start a run and return once rank 0 has logged ``step``; also returns the last step seen."""
    proc = subprocess.Popen([sys.executable, "-m", "mae_core.launch", "--nproc", str(nproc), str(config)],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        match = STEP_LINE.search(line)
        if match and int(match.group(1)) >= step:
            return proc, int(match.group(1))
        assert time.monotonic() < deadline, "run did not reach the step in time"
    raise AssertionError(f"run ended before step {step}: exit {proc.wait()}")
