"""One attempt of one run, wherever it executes: the bridge between a backend and the trainer.

``run_attempt`` (the run's first rank) marks the run running, runs the trainer, keeps the
registry's progress fresh (step, loss, img/s, log upload), turns a cancel request into a
checkpoint-and-stop, and records how the attempt ended, counting it against the spec's requeue
budgets. ``run_trainer`` is the part every rank does: run the trainer and pass preemption signals
on. Every backend runs runs through these two.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

from mae_core import storage
from mae_core.contract import CHECKPOINTS_DIR, PREEMPT_SIGNALS, PREEMPTED_EXIT_CODE, exit_status, latest_checkpoint
from orchestrator.registry import Registry, RunState

POLL_S = 2.0
UPLOAD_S = 10.0
StopReason = Literal["preempted", "timeout"]
RESUME_HINT = "`maestro resume` continues from the last checkpoint"


def latest_checkpoint_step(registry: Registry, state: RunState) -> int | None:
    info = latest_checkpoint(storage.join(registry.run_url(state.experiment, state.run_id), CHECKPOINTS_DIR))
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


@contextmanager
def train_config_file(registry: Registry, experiment: str, run_id: str) -> Iterator[Path]:
    """The trainer's config for this run, in a local temp dir (each rank writes its own) that is
    removed with everything else the attempt put there."""
    spec = registry.spec(experiment, run_id)
    with tempfile.TemporaryDirectory(prefix=f"maestro-{run_id}-") as work:
        config = Path(work) / "train.yaml"
        config.write_text(spec.train_config(output=registry.run_url(experiment, run_id)).to_yaml())
        yield config


def run_trainer(argv: list[str], log: IO[bytes] | None = None, env: dict[str, str] | None = None,
                poll: Callable[[subprocess.Popen[bytes]], None] | None = None) -> tuple[int, list[int]]:
    """Run the trainer, forwarding preemption signals to it; returns its exit status (as
    ``contract.exit_status`` reads it) and the signals it was sent."""
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT if log else None, env=env)
    signalled: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        signalled.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in PREEMPT_SIGNALS}
    try:
        while True:
            try:
                proc.wait(timeout=POLL_S)  # returns as soon as the trainer exits
                break
            except subprocess.TimeoutExpired:
                if poll:
                    poll(proc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_status(proc.returncode, bool(signalled)), signalled


def begin_attempt(registry: Registry, experiment: str, run_id: str, **fields: Any) -> RunState | None:
    """Mark a new attempt of the run running; None, with the run cancelled, if a cancel came first."""
    state = registry.state(experiment, run_id)
    if registry.cancel_requested(state):
        registry.update(experiment, run_id, status="cancelled", ended=time.time(), message="cancelled before start")
        return None
    state = registry.update(experiment, run_id, status="running", attempts=state.attempts + 1,
                            started=state.started or time.time(), ended=None, message=None,
                            host=socket.gethostname(), pid=os.getpid(), **fields)
    registry.event(state, "started", attempt=state.attempts, host=state.host,
                   resumed_from_step=latest_checkpoint_step(registry, state),
                   job_id=state.job_ids[-1] if state.job_ids else None,
                   restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    return state


def finish_attempt(registry: Registry, state: RunState, code: int, last_error: str, can_requeue: bool,
                   stop_reason: Callable[[], StopReason] = lambda: "preempted",
                   stopped_by: str | None = None) -> RunState:
    """Record how an attempt ended and count it against the spec's requeue budgets.

    ``code`` is the trainer's exit status: 0 done, PREEMPTED_EXIT_CODE checkpointed on request,
    anything else a failure. A cancel request wins over the status; ``stopped_by`` names an
    outside stop (a signal nobody asked maestro for), which ends the run cancelled. With
    ``can_requeue`` the backend starts the run again after a preemption, timeout or failure within
    the budgets, so the state ends ``requeued``; past a budget it ends ``failed``, naming it.
    """
    experiment, run_id = state.experiment, state.run_id
    state = registry.state(experiment, run_id)
    fields = {**progress(registry, state), "last_checkpoint_step": latest_checkpoint_step(registry, state),
              "pid": None}
    budgets = registry.spec(experiment, run_id).requeue
    if code == 0:
        state = registry.update(experiment, run_id, status="completed", ended=time.time(), **fields)
    elif registry.cancel_requested(state):
        state = registry.update(experiment, run_id, status="cancelled", ended=time.time(),
                                message=f"cancelled; {RESUME_HINT}", **fields)
    elif code == PREEMPTED_EXIT_CODE and stopped_by:
        state = registry.update(experiment, run_id, status="cancelled", ended=time.time(),
                                message=f"stopped by {stopped_by}; {RESUME_HINT}", **fields)
    elif code == PREEMPTED_EXIT_CODE:
        reason = stop_reason()
        if reason == "timeout":
            count, budget, budget_name = state.timeouts + 1, budgets.max_timeouts, "max_timeouts"
            fields["timeouts"] = count
        else:
            count, budget, budget_name = state.preemptions + 1, budgets.max_preemptions, "max_preemptions"
            fields["preemptions"] = count
        if budget is not None and count > budget:
            state = registry.update(experiment, run_id, status="failed", ended=time.time(), **fields,
                                    message=f"{reason} {count} times, over the budget requeue.{budget_name}="
                                    f"{budget}; {RESUME_HINT}, or raise the budget")
        else:
            state = registry.update(experiment, run_id, status="requeued" if can_requeue else "preempted",
                                    message=reason, **fields)
    else:
        failures = state.failures + 1
        requeue = can_requeue and failures <= budgets.max_failures
        message = last_error if requeue or not can_requeue else \
            f"{last_error} (failed {failures} times, over the budget requeue.max_failures={budgets.max_failures})"
        state = registry.update(experiment, run_id, status="requeued" if requeue else "failed",
                                failures=failures, ended=None if requeue else time.time(),
                                message=message, **fields)
    registry.event(state, state.status, exit_code=code, step=state.step, reason=state.message,
                   last_checkpoint_step=state.last_checkpoint_step)
    return state


def run_attempt(root: str, experiment: str, run_id: str, command: Callable[[Path], list[str]],
                env: dict[str, str] | None = None, can_requeue: bool = False,
                stop_reason: Callable[[], StopReason] = lambda: "preempted") -> RunState:
    """Run the trainer once for this run (as its first rank) and record the outcome.

    ``command`` maps the trainer config to the argv to run. The runner keeps the registry's
    progress fresh, turns a cancel request into checkpoint-and-stop, and uploads the log.
    """
    registry = Registry(root)
    begun = begin_attempt(registry, experiment, run_id)
    if begun is None:
        return registry.state(experiment, run_id)
    state = begun
    cancelling = False
    last_upload = time.monotonic()
    with train_config_file(registry, experiment, run_id) as config:
        log_path = config.parent / "train.log"

        def poll(proc: subprocess.Popen[bytes]) -> None:
            nonlocal cancelling, last_upload, state
            if not cancelling and registry.cancel_requested(state):
                cancelling = True
                proc.send_signal(signal.SIGTERM)  # checkpoint at the next step, then exit
            if time.monotonic() - last_upload >= UPLOAD_S:
                state = registry.update(experiment, run_id, **progress(registry, state))
                storage.write_bytes(registry.log_url(state, state.attempts), log_path.read_bytes())
                last_upload = time.monotonic()

        with log_path.open("wb") as log:
            code, signals = run_trainer(command(config), log=log, env=env, poll=poll)
        storage.write_bytes(registry.log_url(state, state.attempts), log_path.read_bytes())
        last_error = error_line(log_path)
    # Preemption and the time limit send USR2 first; a bare TERM nobody asked for is someone's scancel.
    outside = can_requeue and not cancelling and signal.SIGUSR2 not in signals
    stopped_by = f"{', '.join(signal.Signals(s).name for s in signals) or 'a signal'} (an external scancel?)" \
        if outside else None
    return finish_attempt(registry, state, code, last_error, can_requeue, stop_reason, stopped_by)


def local_command(nproc: int) -> Callable[[Path], list[str]]:
    """N trainer processes on this machine through ``mae_core.launch``."""
    return lambda config: [sys.executable, "-m", "mae_core.launch", "--nproc", str(nproc), str(config)]
