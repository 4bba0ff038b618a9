"""Ray backend: runs as Ray jobs, trained by Ray Train, queued and budgeted by the registry.

- **A run is a Ray job** (the Jobs API), so its driver runs under Ray's own supervisor and
  outlives the laptop that submitted it. The driver (``run``) loops over attempts: each attempt
  is one ``TorchTrainer.fit()`` of ``nodes x gpus_per_node`` workers, and its outcome goes
  through the runner's ``finish_attempt``, the same budget rules as on SLURM. Ray's own
  ``FailureConfig`` is off (``max_failures=0``), so Ray never retries past, or short of, them.
- **Each worker runs the unchanged trainer** (``python -m mae_core.train``) as a child process.
  Ray Train runs the training function in a thread, where no signal handler can be installed,
  and has already made a process group on MASTER_PORT; the child installs the trainer's own
  handlers and joins a group of its own on a port rank 0 picks. The child dies with its worker
  (PR_SET_PDEATHSIG), so a dead worker never leaves a trainer holding a collective.
- **The queue is in the registry.** Ray jobs have no queue, so one supervisor job per
  experiment (``supervise``) starts the experiment's queued runs, at most
  ``max_concurrent_runs`` at once, the next when one ends, and exits when none is left. If it
  dies, the runs' jobs go on; ``maestro resume EXPERIMENT`` starts a new one.
- **Cancel checkpoints first:** the first rank's worker sees the registry's cancel request and
  sends the trainer SIGTERM (checkpoint at the next step, exit "preempted"); the driver stops
  the job only if that takes longer than ``cancel_grace_s``.
- **Credentials** never enter a job's runtime_env: only the S3 endpoint and region are forwarded;
  the nodes' own credentials are used.

    python -m orchestrator.backends.ray supervise ROOT EXPERIMENT   # a job started by `maestro submit`
    python -m orchestrator.backends.ray run ROOT EXPERIMENT RUN_ID  # a run's driver job
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from mae_core import storage
from mae_core.contract import PREEMPTED_EXIT_CODE, exit_status, rendezvous_env
from orchestrator.backends.base import Ended
from orchestrator.errors import UserError
from orchestrator.profiles import RayProfile
from orchestrator.registry import ACTIVE, Registry, RunState
from orchestrator.runner import (
    POLL_S,
    RESUME_HINT,
    AttemptWatch,
    LogUpload,
    attempt_env,
    begin_attempt,
    error_line,
    finish_attempt,
    train_config_file,
)
from orchestrator.secrets import redact
from orchestrator.spec import ExperimentSpec

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger("maestro.ray")

# Non-secret settings the jobs need to reach the same object store; never a key or a token.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
SUPERVISOR_FILE = ".ray-supervisor.json"
LIVE = {"PENDING", "RUNNING"}
# A driver that just ended may still be writing the run's end into the registry.
RECORDING_S = 20.0
_PR_SET_PDEATHSIG = 1


# Submitting side: the CLI -------------------------------------------------------------------------

class RayBackend:
    name = "ray"

    def __init__(self, profile: RayProfile) -> None:
        self.profile = profile
        self._client: JobSubmissionClient | None = None

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:
            try:
                from ray.job_submission import JobSubmissionClient
            except ImportError:
                raise UserError("the Ray backend needs ray; install it with `pip install -e .[ray]`") from None
            try:
                self._client = JobSubmissionClient(self.profile.address)
            except Exception as e:  # noqa: BLE001 - connection errors come in many types
                raise UserError(f"cannot reach the Ray cluster at {self.profile.address} ({type(e).__name__}); "
                                "check the profile's address and that the head node's dashboard runs") from None
        return self._client

    # What would be submitted, shown by `maestro plan` without any cluster.
    def runtime_env(self) -> dict[str, Any]:
        env = dict(self.profile.runtime_env)
        env["env_vars"] = {**{k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)},
                           **env.get("env_vars", {})}
        return env

    def entrypoint(self, *args: str) -> str:
        return shlex.join([self.profile.python, "-m", "orchestrator.backends.ray", *args])

    def describe(self, spec: ExperimentSpec, root: str) -> str:
        shown = dict(self.runtime_env())
        shown["env_vars"] = redact(shown["env_vars"])
        workers = spec.resources.world_size
        lines = [
            f"Ray cluster {self.profile.address}: at most {self.profile.max_concurrent_runs} run(s) at once",
            f"supervisor job: {self.entrypoint('supervise', root, spec.name)}",
            f"each run's job: {self.entrypoint('run', root, spec.name, '<run_id>')}",
            f"each attempt: TorchTrainer, {workers} worker(s) x {json.dumps(self.profile.resources_per_worker)}, "
            f"{'nccl on GPUs' if self.profile.gpus_per_worker else 'gloo on CPUs'}",
            f"hung after {self.profile.hang_timeout_s:.0f} s without a step; cancel grace "
            f"{self.profile.cancel_grace_s:.0f} s",
            f"runtime_env: {json.dumps(shown, sort_keys=True)}",
        ]
        return "\n".join(lines)

    def submit(self, registry: Registry, runs: list[RunState]) -> list[str]:
        """Queue the runs in the registry and make sure their experiments have a live supervisor;
        the supervisor starts them. Returns each experiment's supervisor job id."""
        ids = []
        registry.clear_cancels(runs)
        registry.update_many({s.key: {"status": "queued", "backend": self.name, "pid": None, "host": None,
                                      "message": None} for s in runs},
                             "queued", {s.key: {"backend": self.name} for s in runs})
        for experiment in sorted({s.experiment for s in runs}):
            supervisor = self.ensure_supervisor(registry, experiment)
            ids += [supervisor for s in runs if s.experiment == experiment]
        return ids

    def supervisor(self, registry: Registry, experiment: str) -> str | None:
        url = storage.join(registry.root, experiment, SUPERVISOR_FILE)
        try:
            return str(storage.read_json(url)["job_id"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def job_status(self, job_id: str) -> str | None:
        try:
            return str(self.client.get_job_status(job_id).value)
        except RuntimeError:  # the Jobs API's answer for an unknown job
            return None

    def job_statuses(self) -> dict[str, str]:
        """Every job the cluster knows, by submission id: its status."""
        return {j.submission_id: str(j.status.value) for j in self.client.list_jobs() if j.submission_id}

    def ensure_supervisor(self, registry: Registry, experiment: str) -> str:
        current = self.supervisor(registry, experiment)
        if current and self.job_status(current) in LIVE:
            return current
        job_id = f"maestro-supervise-{experiment}-{uuid.uuid4().hex[:8]}"
        self.client.submit_job(entrypoint=self.entrypoint("supervise", registry.root, experiment),
                               submission_id=job_id, runtime_env=self.runtime_env(), entrypoint_num_cpus=0)
        storage.write_json(storage.join(registry.root, experiment, SUPERVISOR_FILE),
                           {"job_id": job_id, "address": self.profile.address, "time": time.time()})
        return job_id

    def status(self, registry: Registry, state: RunState) -> Ended | None:
        if state.status not in ACTIVE:
            return None
        job_id = state.job_ids[-1] if state.job_ids else None
        job = self.job_status(job_id) if job_id else None
        if job in LIVE:
            return None
        if state.status == "queued" and not (job_id and job is None):
            supervisor = self.supervisor(registry, state.experiment)
            if supervisor and self.job_status(supervisor) in LIVE:
                return None  # waiting for a slot
            return Ended("failed", f"queued, but the supervisor job that starts the experiment's runs has ended; "
                                   f"{RESUME_HINT}")
        if time.time() - state.updated < RECORDING_S:
            return None  # the driver is recording the end right now
        return Ended("failed", f"Ray job {job_id} ended {job or 'unknown to the cluster'} without the run "
                               f"recording an end; {RESUME_HINT}")

    def cancel(self, registry: Registry, state: RunState) -> None:
        # A training run's first worker sees the request, and the trainer checkpoints and stops;
        # its driver records the end. Until then the run is cancelling. A run that is not
        # training yet just goes.
        registry.request_cancel(state)
        job_id = state.job_ids[-1] if state.job_ids else None
        job = self.job_status(job_id) if job_id else None
        if state.status in ("running", "requeued", "cancelling") and job in LIVE:
            registry.update(state.experiment, state.run_id, owner=state.attempts, status="cancelling")
            return
        if job == "PENDING" and job_id:
            self.client.stop_job(job_id)
        registry.update(state.experiment, state.run_id, status="cancelled", ended=time.time(),
                        message=f"cancelled; {RESUME_HINT}")

    def logs(self, registry: Registry, state: RunState, attempt: int | None = None) -> str:
        """Every rank's trainer log of the attempt, then the driver's log from Ray (or the copy the
        supervisor kept in the registry once the job ended)."""
        text = registry.read_logs(state, attempt or max(1, state.attempts))
        if not state.job_ids:
            return text
        job_id = state.job_ids[-1]
        copy = driver_log_url(registry, state, job_id)
        try:
            driver = self.client.get_job_logs(job_id)
        except Exception:  # noqa: BLE001 - a head node that restarted or is out of reach
            driver = storage.read_bytes(copy).decode(errors="replace") if storage.exists(copy) else ""
        return text + (f"\n--- Ray job {job_id} driver ---\n{driver}" if driver else "")


def driver_log_url(registry: Registry, state: RunState, job_id: str) -> str:
    return storage.join(registry.run_url(state.experiment, state.run_id), "logs", f"ray-driver-{job_id}.log")


# The supervisor job: the experiment's queue ------------------------------------------------------

def supervise(root: str, experiment: str) -> int:
    registry = Registry(root)
    backend: RayBackend | None = None
    copied: set[str] = set()
    while True:
        # The cluster's jobs before the registry's runs: a run's driver records the runs it starts
        # (its evaluations) before it exits, so a driver seen ended here has recorded them by the
        # time the runs are read, and this loop never exits past a run it has not seen.
        jobs = backend.job_statuses() if backend else None
        states = [s for s in registry.runs(experiment) if s.backend == "ray"]
        if backend is None and states:
            profile = registry.profile(experiment, states[0].run_id)
            assert isinstance(profile, RayProfile)
            backend = RayBackend(profile)
        if backend is None:
            return 0
        if jobs is None:  # the first look, before this supervisor has started anything
            jobs = backend.job_statuses()
        live = [s for s in states if s.job_ids and jobs.get(s.job_ids[-1]) in LIVE]
        for s in states:  # keep each ended driver's log past a head-node restart
            for job_id in s.job_ids:
                if job_id not in copied and jobs.get(job_id) not in (None, *LIVE):
                    storage.write_bytes(driver_log_url(registry, s, job_id),
                                        backend.client.get_job_logs(job_id).encode())
                    copied.add(job_id)
        waiting = [s for s in states if s.status == "queued" and s not in live]
        for state in waiting[: max(0, backend.profile.max_concurrent_runs - len(live))]:
            if registry.cancel_requested(state):
                registry.update(experiment, state.run_id, status="cancelled", ended=time.time(),
                                message="cancelled before start")
                continue
            job_id = f"maestro-{state.run_id[:48]}-{uuid.uuid4().hex[:8]}"
            state = registry.update(experiment, state.run_id, job_ids=[*state.job_ids, job_id])
            backend.client.submit_job(entrypoint=backend.entrypoint("run", root, experiment, state.run_id),
                                      submission_id=job_id, runtime_env=backend.runtime_env(), entrypoint_num_cpus=0)
            registry.event(state, "submitted", backend="ray", job_id=job_id)
            live.append(state)
        if not live and not waiting:
            return 0
        time.sleep(POLL_S)


# A run's driver job: its attempts ------------------------------------------------------------------

def drive(root: str, experiment: str, run_id: str) -> int:
    """Run attempts until the run completes, is cancelled or spends a budget."""
    registry = Registry(root)
    profile = registry.profile(experiment, run_id)
    assert isinstance(profile, RayProfile)
    while True:
        state = begin_attempt(registry, experiment, run_id, hang_timeout_s=profile.hang_timeout_s,
                              heartbeat=time.time())
        if state is None:
            return 0
        code, error = fit_attempt(registry, profile, state)
        state = finish_attempt(registry, state, code, error, can_requeue=True,
                               stopped_by=None if code != PREEMPTED_EXIT_CODE else "SIGTERM (not from maestro)")
        if state.status != "requeued":
            return 0 if state.status in ("completed", "cancelled") else 1


def fit_attempt(registry: Registry, profile: RayProfile, state: RunState) -> tuple[int, str]:
    """One TorchTrainer.fit() of the run: (the first rank's trainer exit status, the error line).

    fit() runs in a thread so that this thread can enforce the cancel grace period: past it the
    driver exits, and the worker group (and the trainers with it) goes with it.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = registry.spec(state.experiment, state.run_id)
    scratch = tempfile.mkdtemp(prefix="maestro-ray-")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"root": registry.root, "experiment": state.experiment, "run_id": state.run_id,
                           "attempt": state.attempts, "hang_timeout_s": profile.hang_timeout_s},
        # The workers' own process group only carries rank 0's port choice: gloo suffices.
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=spec.resources.world_size, use_gpu=profile.gpus_per_worker > 0,
                                     resources_per_worker=profile.resources_per_worker),
        run_config=RunConfig(name=f"{state.run_id}-attempt-{state.attempts}", storage_path=scratch,
                             failure_config=FailureConfig(max_failures=0)),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - Ray wraps worker errors and deaths in several types
            outcome["error"] = describe_failure(e)
            return
        # Ray's Result has metrics only for reports with a checkpoint; each rank records its exit
        # status in the registry instead, and the first rank's is the attempt's.
        first = registry.workers(state).get(0, {})
        outcome["code"] = int(first["exit_code"]) if first.get("attempt") == state.attempts else 1

    thread = threading.Thread(target=fit, name="fit", daemon=True)
    thread.start()
    cancelled_at: float | None = None
    while thread.is_alive():
        thread.join(POLL_S)
        if cancelled_at is None and registry.cancel_requested(state):
            cancelled_at = time.monotonic()
        if cancelled_at is not None and time.monotonic() - cancelled_at > profile.cancel_grace_s:
            registry.update(state.experiment, state.run_id, owner=state.attempts, status="cancelled",
                            ended=time.time(), pid=None, message=f"cancelled after {profile.cancel_grace_s:.0f} s "
                            f"without a checkpoint; {RESUME_HINT}")
            registry.event(state, "cancelled", reason="grace period over; stopped without a checkpoint")
            os._exit(1)
    if "code" in outcome:
        return outcome["code"], ""
    return 1, str(outcome.get("error", "the attempt ended without a result"))


def describe_failure(error: BaseException) -> str:
    """One line for the registry: each failed rank's own error (the trainer's error line, a hang)
    or how its worker died."""
    failures: dict[int, BaseException] = getattr(error, "worker_failures", None) or {}
    if not failures:
        return f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"
    parts = []
    for rank, failure in sorted(failures.items()):
        if isinstance(failure, RuntimeError) and str(failure).startswith(f"rank {rank}"):
            parts.append(str(failure))
        else:  # the worker process itself is gone (killed, OOM, node lost)
            parts.append(f"rank {rank}: its Ray worker died ({type(failure).__name__}: "
                         f"{str(failure).splitlines()[0] if str(failure) else ''})")
    return "; ".join(parts)[:600]


# One training worker: the trainer as a child process ----------------------------------------------

def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # A fresh port on rank 0's node: Ray's own process group already listens on MASTER_PORT.
    master = broadcast_from_rank_zero((_node_address(), _free_port()) if rank == 0 else None)
    registry = Registry(config["root"])
    experiment, run_id, attempt = config["experiment"], config["run_id"], int(config["attempt"])
    state = registry.state(experiment, run_id)
    env = attempt_env(state)
    env.update(rendezvous_env(rank, ctx.get_local_rank(), world, ctx.get_local_world_size(), master[0], master[1]))
    with train_config_file(registry, experiment, run_id) as cfg:
        log_path = cfg.parent / "train.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "mae_core.train", str(cfg)], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
            worker = {"attempt": attempt, "worker_pid": os.getpid(), "trainer_pid": proc.pid,
                      "host": socket.gethostname()}
            registry.record_worker(state, rank, worker)
            # The first rank watches for cancel requests and hangs; every rank uploads its own log.
            watch = AttemptWatch(registry, state, log_path, float(config["hang_timeout_s"]), rank) if rank == 0 \
                else None
            while proc.poll() is None:
                try:
                    proc.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    if watch:
                        watch.poll(proc)
        code = exit_status(proc.returncode, [signal.SIGTERM] if watch and watch.cancelling else [])
        LogUpload(registry, state, log_path, rank)()
        last_error = error_line(log_path)
    if watch and watch.hung:
        raise RuntimeError(f"rank {rank}: hung: no training step for {watch.hang_timeout_s:.0f} s; stopped")
    if code not in (0, PREEMPTED_EXIT_CODE):
        raise RuntimeError(f"rank {rank}: the trainer exited {code}: {last_error}")
    registry.record_worker(state, rank, {**worker, "exit_code": code})


def _die_with_parent() -> None:
    """In the trainer child: be killed when the worker that started it dies, whatever killed it."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _node_address() -> str:
    import ray.util

    return str(ray.util.get_node_ip_address())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.backends.ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sup = sub.add_parser("supervise", help="start an experiment's queued runs, at most max_concurrent_runs at once")
    sup.add_argument("root")
    sup.add_argument("experiment")
    run = sub.add_parser("run", help="drive one run's attempts")
    run.add_argument("root")
    run.add_argument("experiment")
    run.add_argument("run_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "supervise":
        return supervise(args.root, args.experiment)
    return drive(args.root, args.experiment, args.run_id)


if __name__ == "__main__":
    sys.exit(main())
