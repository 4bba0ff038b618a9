"""Driving the `maestro` CLI from tests (in-process for speed, or as the user's shell would) and
reading what its runs wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch

from mae_core import storage
from mae_core.checkpoint import Checkpointer, load_weights
from mae_core.train import make_model
from orchestrator import cli
from orchestrator.registry import Registry, RunState


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """(exit code, stdout+stderr) of `maestro ARGS` without starting a process."""
    old = sys.argv
    sys.argv = ["maestro", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out + out.err


def maestro(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "maestro")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def wait_for(predicate: Callable[[], bool], timeout: float = 180, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def weights(registry: Registry, state: RunState) -> dict[str, torch.Tensor]:
    """The run's parameters at its latest complete checkpoint."""
    spec = registry.spec(state.experiment, state.run_id)
    run_url = registry.run_url(state.experiment, state.run_id)
    info = Checkpointer(storage.join(run_url, "checkpoints"), rank=0, world_size=1).latest()
    assert info is not None
    return load_weights(info, make_model(spec.train_config(output=run_url))).state_dict()
