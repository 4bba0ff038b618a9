"""Driving the `maestro` CLI from tests (in-process for speed, or as the user's shell would) and
reading what its runs wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mae_core import storage
from mae_core.checkpoint import Checkpointer, load_weights
from mae_core.progress import read_progress
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


def trained_step(registry: Registry, state: RunState) -> int:
    """The step a run's trainer last flushed to ``progress.json`` (the registry's state only
    records steps when an attempt ends)."""
    last = read_progress(registry.run_url(state.experiment, state.run_id))
    return int(last["step"]) if last else 0


def trainer_pids(run_id: str) -> list[int]:
    """Live trainer processes (``mae_core.train``) of a run on this machine: their config lives in
    the runner's temp dir named after the run."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"mae_core.train" in argv and any(f"maestro-{run_id}-".encode() in a for a in argv):
            pids.append(int(entry))
    return pids


def resume_at_once(target: str, root: str, timeout: float = 120) -> int:
    """`maestro resume` right after a cancel, retried the way an impatient user would: refused
    (one line, exit 2) while the cancelled attempt is still checkpointing. Returns the refusals."""
    refusals, deadline = 0, time.monotonic() + timeout
    while True:
        proc = maestro("resume", target, "--root", root)
        if proc.returncode == 0:
            return refusals
        assert proc.returncode == 2 and "still cancelling" in proc.stdout, proc.stdout + proc.stderr
        assert time.monotonic() < deadline, "the cancelled attempt never left"
        refusals += 1
        time.sleep(0.2)


def attempts_one_at_a_time(registry: Registry, state: RunState) -> None:
    """Each attempt's start comes after the previous attempt recorded its end."""
    events = registry.events(state.experiment, state.run_id)
    ends = {"completed", "cancelled", "failed", "requeued", "preempted"}
    open_attempt = False
    for e in events:
        if e["event"] == "started":
            assert not open_attempt, f"attempt {e['attempt']} started while another was running: {events}"
            open_attempt = True
        elif e["event"] in ends:
            open_attempt = False


def assert_goodput_adds_up(terms: dict[str, float], lost: bool) -> None:
    """An attempt's (or a run's) goodput terms: disjoint spans of the allocated time, each positive
    (lost time only where ``lost``: work after a last checkpoint was thrown away)."""
    spent = terms["productive_s"] + terms["lost_s"] + terms["overhead_s"] + terms["checkpoint_s"]
    assert terms["allocated_s"] >= spent, terms
    assert terms["productive_s"] > 0 and terms["overhead_s"] > 0 and terms["checkpoint_s"] > 0, terms
    assert (terms["lost_s"] > 0) if lost else (terms["lost_s"] == 0), terms


REPO = Path(__file__).resolve().parents[1]


def write_small_spec(tmp_path: Path, cluster: Path | None = None, **over: Any) -> Path:
    """A small valid spec (experiment ``exp``, local cluster unless ``cluster``) for CLI tests
    that plan or refuse it rather than train it."""
    raw: dict[str, Any] = {"name": "exp", "data": {"num_samples": 512}, "optim": {"global_batch": 64},
                           "resources": {"per_device_batch": 32, "gpus_per_node": 2},
                           "cluster": str(cluster or REPO / "cluster_configs/local.yaml"), **over}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
