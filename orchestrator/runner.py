"""One attempt of one run, wherever it executes: the bridge between a backend and the trainer.

It marks the run running, writes the trainer's config, runs ``mae_core.launch``, keeps the
registry's progress fresh (step, loss, img/s, log upload), turns a cancel request into a
checkpoint-and-stop, and records how the attempt ended. Every backend runs runs through it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from mae_core import storage
from mae_core.checkpoint import Checkpointer
from mae_core.signals import PREEMPT_SIGNALS, PREEMPTED_EXIT_CODE
from orchestrator.registry import Registry, RunState

POLL_S = 2.0
UPLOAD_S = 10.0


def latest_checkpoint_step(registry: Registry, state: RunState) -> int | None:
    url = storage.join(registry.run_url(state.experiment, state.run_id), "checkpoints")
    info = Checkpointer(url, rank=0, world_size=1).latest()
    return info.step if info else None


def progress(registry: Registry, state: RunState) -> dict[str, float]:
    """The newest metrics record the trainer flushed, as state fields."""
    url = storage.join(registry.run_url(state.experiment, state.run_id), "metrics.jsonl")
    try:
        tail = storage.read_bytes(url).decode().rstrip("\n").rsplit("\n", 1)[-1]
        last = json.loads(tail)
    except (FileNotFoundError, ValueError):
        return {}
    return {"step": last["step"], "loss": last.get("loss"), "img_s": last.get("img_s")}


def error_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["the trainer exited without output"])[-1][:300]


def run_attempt(root: str, experiment: str, run_id: str, nproc: int) -> int:
    """Run the trainer once for this run; returns the trainer's exit status."""
    registry = Registry(root)
    state = registry.state(experiment, run_id)
    if registry.cancel_requested(state):
        registry.update(experiment, run_id, status="cancelled", ended=time.time(), message="cancelled before start")
        return 0
    state = registry.update(experiment, run_id, status="running", attempts=state.attempts + 1,
                            started=state.started or time.time(), ended=None, message=None,
                            host=socket.gethostname(), pid=os.getpid())
    resumed_from = latest_checkpoint_step(registry, state)
    registry.event(state, "started", host=state.host, resumed_from_step=resumed_from)

    spec = registry.spec(experiment, run_id)
    work = Path(tempfile.mkdtemp(prefix=f"maestro-{run_id}-"))
    config = work / "train.yaml"
    config.write_text(spec.train_config(output=registry.run_url(experiment, run_id)).to_yaml())
    log_path = work / "train.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mae_core.launch", "--nproc", str(nproc), str(config)],
                                stdout=log, stderr=subprocess.STDOUT)

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, forward)
    cancelling = False
    last_upload = time.monotonic()
    while proc.poll() is None:
        time.sleep(POLL_S)
        if not cancelling and registry.cancel_requested(state):
            cancelling = True
            proc.send_signal(signal.SIGTERM)  # checkpoint at the next step, then exit
        if time.monotonic() - last_upload >= UPLOAD_S:
            state = registry.update(experiment, run_id, **progress(registry, state))
            storage.write_bytes(registry.log_url(state, state.attempts), log_path.read_bytes())
            last_upload = time.monotonic()
    code = proc.returncode

    storage.write_bytes(registry.log_url(state, state.attempts), log_path.read_bytes())
    fields = {**progress(registry, state), "last_checkpoint_step": latest_checkpoint_step(registry, state),
              "pid": None}
    if code == 0:
        state = registry.update(experiment, run_id, status="completed", ended=time.time(), **fields)
    elif code == PREEMPTED_EXIT_CODE and (cancelling or registry.cancel_requested(state)):
        state = registry.update(experiment, run_id, status="cancelled", ended=time.time(),
                                message="cancelled; `maestro resume` continues from the last checkpoint", **fields)
    elif code == PREEMPTED_EXIT_CODE:
        state = registry.update(experiment, run_id, status="preempted", preemptions=state.preemptions + 1, **fields)
    else:
        state = registry.update(experiment, run_id, status="failed", failures=state.failures + 1, ended=time.time(),
                                message=error_line(log_path), **fields)
    registry.event(state, state.status, exit_code=code, step=state.step,
                   last_checkpoint_step=state.last_checkpoint_step)
    return code
