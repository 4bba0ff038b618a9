"""One attempt of one run, wherever it executes: the bridge between a backend and the trainer.

``run_attempt`` (the run's first rank) marks the run running, runs the trainer, keeps the
registry's progress fresh (step, loss, img/s, log upload), turns a cancel request into a
checkpoint-and-stop, and records how the attempt ended, counting it against the spec's requeue
budgets. ``run_trainer`` is the part every rank does: run the trainer and pass preemption signals
on. Every backend runs runs through these two.
"""

from __future__ import annotations

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
from mae_core.contract import (
    ATTEMPT_ENV,
    CHECKPOINTS_DIR,
    PREEMPT_SIGNALS,
    PREEMPTED_EXIT_CODE,
    claim_output,
    exit_status,
    latest_checkpoint,
)
from mae_core.goodput import attempt_goodput
from mae_core.progress import read_progress
from orchestrator.registry import Registry, RunState, StaleAttempt, progress_fields

# How often the trainer's exit is checked: local, free.
POLL_S = 2.0
# An attempt lasts days and a run weeks, and each look at the registry is a request to the
# bucket: at these defaults an attempt makes ~30 requests an hour for cancel requests and ~24 for
# its log and hang check. Local and SLURM cancels also arrive as a signal at once; the poll is the
# fallback (and Ray's only path). MAESTRO_POLL_S shortens both, for tests and demos.
POLL_ENV = "MAESTRO_POLL_S"
REGISTRY_POLL_S = float(os.environ.get(POLL_ENV, "120"))
UPLOAD_S = 2.5 * REGISTRY_POLL_S
StopReason = Literal["preempted", "timeout"]
RESUME_HINT = "`maestro resume` continues from the last checkpoint"


def latest_checkpoint_step(registry: Registry, state: RunState) -> int | None:
    info = latest_checkpoint(storage.join(registry.run_url(state.experiment, state.run_id), CHECKPOINTS_DIR))
    return info.step if info else None


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
    return exit_status(proc.returncode, signalled), signalled


def begin_attempt(registry: Registry, experiment: str, run_id: str, **fields: Any) -> RunState | None:
    """Mark a new attempt of the run running and claim the run's output for it (older attempts'
    trainers then refuse to commit checkpoints); None, with the run cancelled, if a cancel came first."""
    state = registry.state(experiment, run_id)
    if registry.cancel_requested(state):
        registry.update(experiment, run_id, status="cancelled", ended=time.time(), message="cancelled before start")
        return None
    now = time.time()
    state = registry.update(experiment, run_id, status="running", attempts=state.attempts + 1,
                            started=state.started or now, attempt_started=now, ended=None, message=None,
                            host=socket.gethostname(), pid=os.getpid(), **fields)
    claim_output(registry.run_url(experiment, run_id), state.attempts)
    registry.event(state, "started", attempt=state.attempts, host=state.host,
                   resumed_from_step=latest_checkpoint_step(registry, state),
                   job_id=state.job_ids[-1] if state.job_ids else None,
                   restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    return state


def attempt_env(state: RunState, env: dict[str, str] | None = None) -> dict[str, str]:
    """The trainer's environment for this attempt: it carries the attempt number the trainer
    checks against the run's claim before each checkpoint."""
    return {**(os.environ if env is None else env), ATTEMPT_ENV: str(state.attempts)}


def finish_attempt(registry: Registry, state: RunState, code: int, last_error: str, can_requeue: bool,
                   stop_reason: Callable[[], StopReason | None] = lambda: "preempted",
                   stopped_by: str | None = None) -> RunState:
    """Record how an attempt ended and count it against the spec's requeue budgets.

    ``code`` is the trainer's exit status: 0 done, PREEMPTED_EXIT_CODE checkpointed on request,
    anything else a failure. A cancel request wins over the status; ``stopped_by`` names an
    outside stop (a signal nobody asked maestro for), which ends the run cancelled. With
    ``can_requeue`` the backend starts the run again after a preemption, timeout or failure within
    the budgets, so the state ends ``requeued``; past a budget it ends ``failed``, naming it.
    ``stop_reason`` tells a preemption from a time limit; None (the scheduler could not say) is
    counted as a failure, never as an unlimited preemption.

    An attempt that a newer one has replaced changes nothing: its write is refused and logged.
    """
    try:
        return _record_end(registry, state, code, last_error, can_requeue, stop_reason, stopped_by)
    except StaleAttempt as e:
        print(f"maestro: {e}", file=sys.stderr, flush=True)
        return registry.state(state.experiment, state.run_id)


def _record_end(registry: Registry, state: RunState, code: int, last_error: str, can_requeue: bool,
                stop_reason: Callable[[], StopReason | None], stopped_by: str | None) -> RunState:
    experiment, run_id, attempt = state.experiment, state.run_id, state.attempts
    state = registry.state(experiment, run_id)
    last = read_progress(registry.run_url(experiment, run_id))
    # The trainer's clock report counts only if this attempt's trainer wrote it.
    clock = (last or {}).get("goodput")
    clock = clock if isinstance(clock, dict) and clock.get("attempt") == attempt else None
    goodput = attempt_goodput(state.attempt_started or time.time(), time.time(), code, clock)
    fields = {**progress_fields(last), "last_checkpoint_step": latest_checkpoint_step(registry, state),
              "pid": None, "goodput": state.goodput + goodput}
    budgets = registry.spec(experiment, run_id).requeue

    def end(status: str, **changes: Any) -> RunState:
        ended = None if status == "requeued" else time.time()
        return registry.update(experiment, run_id, owner=attempt, status=status, ended=ended, **fields, **changes)

    reason = stop_reason() if code == PREEMPTED_EXIT_CODE and not stopped_by else None
    if code == 0:
        # Its evaluations are recorded before the run is marked completed: whoever sees it completed
        # (`maestro watch`, waiting for every run to finish) already sees the runs it continues with.
        _evaluate(registry, state.model_copy(update=fields))
        state = end("completed")
    elif registry.cancel_requested(state):
        state = end("cancelled", message=f"cancelled; {RESUME_HINT}")
    elif code == PREEMPTED_EXIT_CODE and stopped_by:
        state = end("cancelled", message=f"stopped by {stopped_by}; {RESUME_HINT}")
    elif code == PREEMPTED_EXIT_CODE and reason is not None:
        if reason == "timeout":
            count, budget, budget_name = state.timeouts + 1, budgets.max_timeouts, "max_timeouts"
            fields["timeouts"] = count
        else:
            count, budget, budget_name = state.preemptions + 1, budgets.max_preemptions, "max_preemptions"
            fields["preemptions"] = count
        if budget is not None and count > budget:
            state = end("failed", message=f"{reason} {count} times, over the budget requeue.{budget_name}="
                                          f"{budget}; {RESUME_HINT}, or raise the budget")
        else:
            state = end("requeued" if can_requeue else "preempted", message=reason)
    else:
        if code == PREEMPTED_EXIT_CODE:  # checkpointed, but nobody could say why it was stopped
            last_error = "stopped by a signal, and the scheduler could not say whether it was a preemption " \
                         "or the time limit; counted as a failure"
        failures = state.failures + 1
        requeue = can_requeue and failures <= budgets.max_failures
        message = last_error if requeue or not can_requeue else \
            f"{last_error} (failed {failures} times, over the budget requeue.max_failures={budgets.max_failures})"
        state = end("requeued" if requeue else "failed", failures=failures, message=message)
    ended_by = "completed" if code == 0 else "cancelled" if state.status == "cancelled" else \
        reason if reason is not None else "failure"
    registry.event(state, state.status, exit_code=code, step=state.step, reason=state.message, ended_by=ended_by,
                   last_checkpoint_step=state.last_checkpoint_step, goodput=goodput.model_dump())
    return state


def _evaluate(registry: Registry, state: RunState) -> None:
    """A completed pre-training run continues with its spec's evaluations, as runs of their own.
    Starting them must not change how this run ended: a failure is recorded and can be retried
    with `maestro eval`."""
    from orchestrator.evaluation import start_evaluations  # it submits through the backends, which import us

    try:
        start_evaluations(registry, state)
    except Exception as e:  # the run itself completed: say why its evaluations did not start, and go on
        print(f"maestro: evaluations of {state.key} did not start: {e}", file=sys.stderr, flush=True)
        registry.event(state, "evaluation_failed", reason=f"{type(e).__name__}: {e}")


class LogUpload:
    """Copies a growing local log to the registry in parts of at most PART_BYTES: each upload
    rewrites only the newest part, so its cost does not grow with the attempt's length."""

    PART_BYTES = 1 << 20

    def __init__(self, registry: Registry, state: RunState, log_path: Path, rank: int = 0) -> None:
        self.registry, self.state, self.log_path, self.rank = registry, state, log_path, rank
        self.part, self.offset = 0, 0  # the part being written and where it starts in the log

    def __call__(self) -> None:
        with self.log_path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        while True:
            url = self.registry.log_url(self.state, self.state.attempts, self.rank, self.part)
            if len(data) <= self.PART_BYTES:
                storage.write_bytes(url, data)
                return
            storage.write_bytes(url, data[:self.PART_BYTES])  # this part is full: never written again
            data, self.offset, self.part = data[self.PART_BYTES:], self.offset + self.PART_BYTES, self.part + 1


class AttemptWatch:
    """The first rank's eyes on its trainer, for every backend: a cancel request in the registry
    becomes SIGTERM (checkpoint at the next step, then exit), the log's new bytes go to the
    registry, and a trainer whose progress stops advancing for ``hang_timeout_s`` is killed."""

    def __init__(self, registry: Registry, state: RunState, log_path: Path, hang_timeout_s: float | None = None,
                 rank: int = 0) -> None:
        self.registry, self.state, self.hang_timeout_s = registry, state, hang_timeout_s
        self.upload = LogUpload(registry, state, log_path, rank)
        self.cancelling = self.hung = False
        now = time.monotonic()
        self.last_upload = self.last_change = now
        self.last_poll = now - REGISTRY_POLL_S  # the first poll looks at once: a cancel may already wait
        self.last_step: int | None = None

    def poll(self, proc: subprocess.Popen[bytes]) -> None:
        now = time.monotonic()
        if not self.cancelling and now - self.last_poll >= REGISTRY_POLL_S:
            self.last_poll = now
            if self.registry.cancel_requested(self.state):
                self.cancelling = True
                proc.send_signal(signal.SIGTERM)
        if now - self.last_upload >= UPLOAD_S:
            self.last_upload = now
            self.upload()
            self._check_hang(proc, now)

    def _check_hang(self, proc: subprocess.Popen[bytes], now: float) -> None:
        last = read_progress(self.registry.run_url(self.state.experiment, self.state.run_id))
        step = last["step"] if last else None
        if step != self.last_step:
            self.last_step, self.last_change = step, now
        if self.hang_timeout_s is not None and not self.hung and now - self.last_change > self.hang_timeout_s:
            self.hung = True
            self.registry.event(self.state, "hung", step=step, timeout_s=self.hang_timeout_s)
            proc.kill()


def run_attempt(root: str, experiment: str, run_id: str, command: Callable[[Path], list[str]],
                env: dict[str, str] | None = None, can_requeue: bool = False,
                stop_reason: Callable[[], StopReason | None] = lambda: "preempted") -> RunState:
    """Run the trainer once for this run (as its first rank) and record the outcome.

    ``command`` maps the trainer config to the argv to run. The runner turns a cancel request
    into checkpoint-and-stop and uploads the log; the trainer keeps ``progress.json`` fresh.
    """
    registry = Registry(root)
    begun = begin_attempt(registry, experiment, run_id)
    if begun is None:
        return registry.state(experiment, run_id)
    state = begun
    with train_config_file(registry, experiment, run_id) as config:
        log_path = config.parent / "train.log"
        with log_path.open("wb") as log:
            watch = AttemptWatch(registry, state, log_path, state.hang_timeout_s)
            code, signals = run_trainer(command(config), log=log, env=attempt_env(state, env), poll=watch.poll)
        watch.upload()
        last_error = error_line(log_path)
    if watch.hung:
        last_error = f"hung: no training step for {watch.hang_timeout_s:.0f} s; killed"
    # Preemption and the time limit send USR2 first; a bare TERM nobody asked for is someone's scancel.
    asked = watch.cancelling or registry.cancel_requested(state)
    outside = can_requeue and not asked and signal.SIGUSR2 not in signals
    stopped_by = f"{', '.join(signal.Signals(s).name for s in signals) or 'a signal'} (an external scancel?)" \
        if outside else None
    return finish_attempt(registry, state, code, last_error, can_requeue, stop_reason, stopped_by)


def local_command(nproc: int) -> Callable[[Path], list[str]]:
    """N trainer processes on this machine through ``mae_core.launch``."""
    return lambda config: [sys.executable, "-m", "mae_core.launch", "--nproc", str(nproc), str(config)]
