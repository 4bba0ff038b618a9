"""SLURM backend, through submitit.

A run is one sbatch job of ``nodes x gpus_per_node`` tasks; a grid is one job array. Every task
runs ``SlurmRun``: it takes its rank from SLURM and runs the trainer. On USR2 (preemption, or the
time-limit warning) the trainer on every rank checkpoints at the next step boundary and exits;
only then does the first task hand submitit the resubmission, so the job requeues under the same
id and resumes from that checkpoint. The requeue budgets of the spec decide whether it may.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import submitit

from mae_core.contract import PREEMPTED_EXIT_CODE, rendezvous_env
from orchestrator.backends.base import Ended
from orchestrator.errors import UserError
from orchestrator.profiles import SlurmProfile
from orchestrator.registry import ACTIVE, Registry, RunState
from orchestrator.runner import RESUME_HINT, StopReason, run_attempt, run_trainer, train_config_file
from orchestrator.spec import ExperimentSpec

# Our budgets decide about requeues; submitit's own timeout count must never refuse one.
SUBMITIT_MAX_TIMEOUTS = 1_000_000
# A USR2 this close to the time limit (beyond signal_delay_s) is the time-limit warning.
TIMEOUT_SLACK_S = 60
# What squeue's %L means by UNLIMITED, as seconds: a job without a limit cannot time out.
UNLIMITED_S = 10**9
# SLURM states after which no task runs any more.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Without a heartbeat for this long, an ended SLURM job's run is taken to have died.
HEARTBEAT_STALE_S = 30.0
# sbatch options the backend sets itself; a profile's extra_sbatch may not change them.
RESERVED_OPTIONS = {"array", "output", "error", "signal", "open-mode", "job-name", "nodes", "ntasks-per-node",
                    "time", "partition", "account", "qos", "constraint", "mem", "cpus-per-task", "gpus-per-node",
                    "hold", "wrap"}


class SlurmRun(submitit.helpers.Checkpointable):
    """What every task of a run's job executes; pickled by submitit and resubmitted on requeue."""

    def __call__(self, root: str, experiment: str, run_id: str) -> str:
        requeue = submitit_requeue_handler()
        job = submitit.JobEnvironment()
        registry = Registry(root)
        profile = registry.profile(experiment, run_id)
        assert isinstance(profile, SlurmProfile)
        env = rank_env(job, profile)
        if job.global_rank != 0:
            with train_config_file(registry, experiment, run_id) as config:
                code, _ = run_trainer(trainer_command(config), env=env)
            if code not in (0, PREEMPTED_EXIT_CODE):
                raise RuntimeError(f"rank {job.global_rank}: the trainer exited {code}")
            return "done"
        state = run_attempt(root, experiment, run_id, trainer_command, env=env, can_requeue=True,
                            stop_reason=lambda: stop_reason(profile))
        if state.status == "requeued":
            requeue(signal.SIGUSR2, None)  # calls self.checkpoint(), then scontrol requeue, then exits
        if state.status == "failed":
            # A non-zero exit makes srun (--kill-on-bad-exit) stop the other ranks' tasks.
            raise RuntimeError(state.message)
        return state.status


def trainer_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "mae_core.train", str(config)]


def rank_env(job: submitit.JobEnvironment, profile: SlurmProfile) -> dict[str, str]:
    """torch.distributed's environment for this task, from SLURM's."""
    job_id = os.environ.get("SLURM_JOB_ID", job.job_id)  # an array task's own id
    init_method = None
    if profile.rendezvous == "file":
        directory = Path(profile.folder).expanduser() / "rendezvous"
        directory.mkdir(parents=True, exist_ok=True)
        attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
        init_method = f"file://{directory}/{job_id}-{attempt}"
    env = dict(os.environ)
    env.update(rendezvous_env(job.global_rank, job.local_rank, job.num_tasks, job.num_tasks // job.num_nodes,
                              node_address(job.hostnames[0]), master_port(job_id), init_method))
    env.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    return env


def master_port(job_id: str) -> int:
    """The same port for every task of a job (and its requeues), spread over 20000-39999."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def node_address(node: str) -> str:
    """A node's address as SLURM knows it: node names need not resolve in DNS."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    found = re.search(r"\bNodeAddr=(\S+)", out)
    return found.group(1) if found else node


def stop_reason(profile: SlurmProfile, attempts: int = 3) -> StopReason | None:
    """Why SLURM signalled the job: the time limit when little of it is left, else preemption.
    None when SLURM cannot be asked (after retries): the runner then counts a failure rather
    than guess an unlimited preemption."""
    job_id = os.environ.get("SLURM_JOB_ID", "")
    for attempt in range(attempts):
        left = time_left_s(job_id)
        if left is not None:
            return "timeout" if left <= profile.signal_delay_s + TIMEOUT_SLACK_S else "preempted"
        time.sleep(2.0 * (attempt + 1))
    return None


def time_left_s(job_id: str) -> int | None:
    """Seconds left of the job's time limit (a large number for UNLIMITED); None if squeue fails."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if out == "UNLIMITED":
        return UNLIMITED_S
    return parse_duration(out)


def parse_duration(text: str) -> int | None:
    """Seconds in SLURM's [days-][hours:]minutes:seconds; None for UNLIMITED and the like."""
    found = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if not found:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in found.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def slurm_state(job_id: str) -> str | None:
    """The job's state: squeue while it is queued or running (no lag), then accounting."""
    for argv in (["squeue", "-h", "-j", job_id, "-o", "%T"],
                 ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]):
        try:
            lines = subprocess.run(argv, capture_output=True, text=True, timeout=15).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            continue
        if lines:
            return lines[-1].split()[0].rstrip("+")  # "CANCELLED by 0" -> CANCELLED
    return None


# submitit's internals, in one place: tested with the submitit version pinned in pyproject.toml.
def submitit_requeue_handler() -> Callable[[int, FrameType | None], None]:
    """submitit's USR2 handler, installed before our callable runs: calling it runs
    ``checkpoint()``, then ``scontrol requeue``, then exits. We call it ourselves once every rank
    has checkpointed, instead of letting the signal call it at once."""
    handler = signal.getsignal(signal.SIGUSR2)
    if not callable(handler):
        raise RuntimeError(f"submitit installed no USR2 handler (found {handler!r}); pin submitit==1.5.4")
    return handler


def sbatch_text(executor: submitit.SlurmExecutor) -> str:
    """The sbatch script ``executor.submit`` would write, without submitting: submitit has no
    public call for it."""
    return executor._make_submission_file_text(executor._submitit_command_str, uid="plan")


class _PlanExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor that only renders scripts. The real one refuses to exist where ``srun`` is
    not on the PATH (its ``affinity`` probe); a plan is made on laptops, without SLURM, and needs
    only the parameter checks and the rendering, which this keeps unchanged."""

    @classmethod
    def affinity(cls) -> int:
        return 1


class SlurmBackend:
    name = "slurm"

    def __init__(self, profile: SlurmProfile) -> None:
        bad = sorted(RESERVED_OPTIONS & set(profile.extra_sbatch))
        if bad:
            raise UserError(f"extra_sbatch sets {', '.join(bad)}, which maestro sets from the profile and spec; "
                            "use the profile's own fields")
        self.profile = profile
        self.folder = Path(profile.folder).expanduser().resolve()

    def parameters(self, spec: ExperimentSpec) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters for a run of this spec."""
        r, p = spec.resources, self.profile
        if p.gpus_per_node and r.gpus_per_node > p.gpus_per_node:
            raise UserError(f"resources.gpus_per_node={r.gpus_per_node} exceeds the cluster's gpus_per_node="
                            f"{p.gpus_per_node}; lower it or add nodes")
        params: dict[str, Any] = {
            "job_name": spec.name, "partition": p.partition, "account": p.account, "qos": p.qos,
            "constraint": p.constraint, "mem": p.mem, "time": p.time_min, "nodes": r.nodes,
            "ntasks_per_node": r.gpus_per_node, "cpus_per_task": p.cpus_per_task,
            "gpus_per_node": p.gpus_per_node or None, "signal_delay_s": p.signal_delay_s, "setup": p.setup,
            "array_parallelism": p.array_parallelism, "srun_args": ["--kill-on-bad-exit=1"],
            # Held until the registry records the job id: the job must not start before that.
            "additional_parameters": {**p.extra_sbatch, "hold": True},
        }
        return {k: v for k, v in params.items() if v is not None}

    def executor(self, spec: ExperimentSpec,
                 kind: type[submitit.SlurmExecutor] = submitit.SlurmExecutor) -> submitit.SlurmExecutor:
        executor = kind(folder=self.folder / "%j", max_num_timeout=SUBMITIT_MAX_TIMEOUTS)
        executor.update_parameters(**self.parameters(spec))
        return executor

    def sbatch_script(self, spec: ExperimentSpec) -> str:
        """The script ``submit`` would hand to sbatch for one run of this spec; on any machine."""
        return sbatch_text(self.executor(spec, _PlanExecutor))

    def submit(self, registry: Registry, runs: list[RunState]) -> list[str]:
        groups: dict[str, list[tuple[RunState, ExperimentSpec]]] = {}
        specs = registry.specs(runs)
        for state in runs:
            spec = specs[state.key]
            key = json.dumps(self.parameters(spec), sort_keys=True)
            groups.setdefault(key, []).append((state, spec))
        ids: dict[str, str] = {}
        for group in groups.values():
            executor = self.executor(group[0][1])
            states = [state for state, _ in group]
            if len(states) == 1:
                jobs = [executor.submit(SlurmRun(), registry.root, states[0].experiment, states[0].run_id)]
            else:  # one array for the grid
                jobs = executor.map_array(SlurmRun(), [registry.root] * len(states),
                                          [s.experiment for s in states], [s.run_id for s in states])
            # Recorded while the jobs are held: no runner writes these states before they are released.
            for state, job in zip(states, jobs, strict=True):
                ids[state.key] = job.job_id
            array_id = jobs[0].job_id.split("_")[0]
            try:
                registry.update_many({s.key: {"status": "queued", "backend": self.name,
                                              "job_ids": [*s.job_ids, ids[s.key]], "pid": None, "host": None}
                                      for s in states},
                                     "submitted", {s.key: {"backend": self.name, "job_id": ids[s.key]} for s in states})
            except BaseException:
                # Unrecorded jobs would run where no registry knows them; held, they have not started.
                subprocess.run(["scancel", array_id], capture_output=True, timeout=60, check=False)
                raise
            subprocess.run(["scontrol", "release", array_id], check=True, capture_output=True, timeout=60)
        return [ids[s.key] for s in runs]

    def status(self, registry: Registry, state: RunState) -> Ended | None:
        if state.status not in ACTIVE or not state.job_ids or time.time() - state.updated < HEARTBEAT_STALE_S:
            return None
        job_id = state.job_ids[-1]
        slurm = slurm_state(job_id)
        if slurm not in ENDED:
            return None
        return Ended("cancelled" if slurm == "CANCELLED" else "failed",
                     f"SLURM job {job_id} ended {slurm} without the trainer recording an end; {RESUME_HINT}")

    def cancel(self, registry: Registry, state: RunState) -> None:
        registry.request_cancel(state)
        job_id = state.job_ids[-1] if state.job_ids else None
        if job_id and slurm_state(job_id) == "RUNNING" and state.status in ("running", "cancelling"):
            # Checkpoint and stop: cancelling until the attempt's runner records the end, so a
            # resume cannot start a second attempt beside it. Marked before the signal, so the
            # runner's own end is always the later write.
            registry.update(state.experiment, state.run_id, owner=state.attempts, status="cancelling")
            subprocess.run(["scancel", "--signal=TERM", job_id], capture_output=True, timeout=60, check=False)
            return
        if job_id:  # queued, or between attempts: nothing trains, so it just goes
            subprocess.run(["scancel", job_id], capture_output=True, timeout=60, check=False)
        registry.update(state.experiment, state.run_id, status="cancelled", ended=time.time(),
                        message=f"cancelled; {RESUME_HINT}")

    def logs(self, registry: Registry, state: RunState, attempt: int | None = None) -> str:
        """The trainer's log of the attempt, then the SLURM task's own stdout and stderr."""
        text = registry.read_logs(state, attempt or max(1, state.attempts))
        if state.job_ids:
            job = submitit.SlurmJob(folder=self.folder / "%j", job_id=state.job_ids[-1])
            for name, path in (("stdout", job.paths.stdout), ("stderr", job.paths.stderr)):
                if path.exists():
                    text += f"\n--- SLURM job {job.job_id} task 0 {name} ({path}) ---\n"
                    text += path.read_text(errors="replace")
        return text


