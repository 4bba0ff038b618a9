"""SIGUSR2/SIGTERM stop a run at the next step boundary with a complete checkpoint, on every rank."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from trainer_runs import children, final_weights, launch, losses, run_until_step, write_config

from mae_core import storage
from mae_core.checkpoint import Checkpointer
from mae_core.contract import PREEMPTED_EXIT_CODE


@pytest.mark.parametrize(("target", "signum"), [("rank1", signal.SIGUSR2), ("launcher", signal.SIGTERM)])
def test_signal_saves_and_exits_preempted_within_one_step(tmp_path: Path, target: str, signum: int) -> None:
    out = str(tmp_path / "run")
    cfg = write_config(tmp_path, "run", out, optim={"epochs": 6})
    proc, seen = run_until_step(cfg, nproc=2, step=3)
    pid = children(proc.pid)[1] if target == "rank1" else proc.pid
    os.kill(pid, signum)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == PREEMPTED_EXIT_CODE, rest[-2000:]
    info = Checkpointer(storage.join(out, "checkpoints"), rank=0, world_size=1).latest()
    assert info is not None and info.world_size == 2
    # A signal to any one rank stops all of them at the same step boundary: the one in flight
    # (the log line can lag the step by one).
    assert seen <= info.step <= seen + 2
    assert len(losses(out)) == info.step

    proc = launch(write_config(tmp_path, "run", out, optim={"epochs": 6}), 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref_out = str(tmp_path / "ref")
    ref = write_config(tmp_path, "ref", ref_out, optim={"epochs": 6})
    assert launch(ref, 2).returncode == 0
    assert losses(out) == losses(ref_out)
    ours, theirs = final_weights(cfg), final_weights(ref)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
