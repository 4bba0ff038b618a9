"""What the trainer and whatever launches it must agree on, importable without torch.

Launchers and backends (local, SLURM, Ray) read exit codes, set the rendezvous environment and
find the latest checkpoint of a run; the trainer writes them. Both sides use this module, so
neither hard-codes the other's conventions and the orchestrator never imports torch for them.
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from mae_core import storage

log = logging.getLogger(__name__)

# Exit status of a trainer that saved a checkpoint because it was asked to stop (EX_TEMPFAIL):
# launchers and backends requeue on it.
PREEMPTED_EXIT_CODE = 75
# Signals that ask the trainer to checkpoint at the next step boundary and exit PREEMPTED_EXIT_CODE.
PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

# The rendezvous: torch.distributed's standard variables, plus ours for a file store, which
# replaces the TCP store where no listening socket is wanted (the local launcher).
RANK_ENV, LOCAL_RANK_ENV, WORLD_SIZE_ENV, LOCAL_WORLD_SIZE_ENV = "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"
MASTER_ADDR_ENV, MASTER_PORT_ENV = "MASTER_ADDR", "MASTER_PORT"
INIT_METHOD_ENV = "MAESTRO_INIT_METHOD"

# Checkpoints: ``<output>/checkpoints/step-NNNNNNNNN/`` with a COMMITTED marker written last.
CHECKPOINTS_DIR = "checkpoints"
MARKER = "COMMITTED"
STEP_DIR = re.compile(r"step-(\d{9})")


def rendezvous_env(rank: int, local_rank: int, world_size: int, local_world_size: int, master_addr: str,
                   master_port: int | None = None, init_method: str | None = None) -> dict[str, str]:
    """The environment a trainer process reads to join its process group."""
    env = {RANK_ENV: str(rank), LOCAL_RANK_ENV: str(local_rank), WORLD_SIZE_ENV: str(world_size),
           LOCAL_WORLD_SIZE_ENV: str(local_world_size), MASTER_ADDR_ENV: master_addr}
    if master_port is not None:
        env[MASTER_PORT_ENV] = str(master_port)
    if init_method is not None:
        env[INIT_METHOD_ENV] = init_method
    return env


def exit_status(code: int, forwarded: Collection[int]) -> int:
    """A launcher's view of a trainer's exit status.

    Only two endings count as preempted: the trainer's own PREEMPTED_EXIT_CODE after its
    checkpoint, and death by exactly a preemption signal the launcher itself forwarded. The
    trainer handles those signals once it has started, so dying of one means it was still
    starting and had trained nothing since its last checkpoint. Any other signal (an OOM kill,
    a segfault), even one arriving during a preemption, is a failure: preemptions are not
    counted against a budget, so guessing wrong could requeue a crashing run forever.
    """
    return PREEMPTED_EXIT_CODE if code < 0 and -code in forwarded and -code in PREEMPT_SIGNALS else code


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


@dataclass(frozen=True)
class CheckpointInfo:
    url: str
    step: int
    epoch: int
    permanent: bool
    world_size: int
    meta: dict[str, Any]


# A marker's fields and their JSON types.
_MARKER_FIELDS: dict[str, type] = {"step": int, "epoch": int, "permanent": bool, "world_size": int,
                                   "meta": dict, "files": dict}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a number here


def _marker_problem(marker: Any) -> str | None:
    """Why a parsed marker cannot be trusted, or None. A crash, a hand edit or another program may
    have left it in any shape, so every field is checked here rather than failing with a KeyError
    in the middle of a resume."""
    if not isinstance(marker, dict):
        return f"it holds a JSON {type(marker).__name__}, not an object"
    for key, kind in _MARKER_FIELDS.items():
        if key not in marker:
            return f"field {key!r} is missing"
        value = marker[key]
        if not (_is_int(value) if kind is int else isinstance(value, kind)):
            return f"field {key!r} is a {type(value).__name__}, not a {kind.__name__}"
    if not all(_is_int(size) for size in marker["files"].values()):
        return "a size in 'files' is not an integer"
    if marker["step"] < 0 or marker["world_size"] < 1:
        return f"step {marker['step']} or world size {marker['world_size']} is out of range"
    return None


def verify_checkpoint(url: str) -> CheckpointInfo | None:
    """The checkpoint at ``url`` if its marker exists, is well formed and every file it lists has
    its recorded size; None for a save that died mid-write or a marker that cannot be trusted
    (logged with the reason)."""
    try:
        marker = storage.read_json(storage.join(url, MARKER))
    except FileNotFoundError:
        return None
    except ValueError as e:  # not JSON, or not UTF-8
        log.warning("checkpoint %s has an unreadable %s marker (%s); skipping it", url, MARKER, e)
        return None
    problem = _marker_problem(marker)
    if problem is not None:
        log.warning("checkpoint %s has an invalid %s marker (%s); skipping it", url, MARKER, problem)
        return None
    sizes = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in storage.listdir(url)}
    for name, size in marker["files"].items():
        if sizes.get(name) != size:
            log.warning("checkpoint %s is damaged: %s has %s bytes, expected %s; skipping it",
                        url, name, sizes.get(name), size)
            return None
    return CheckpointInfo(url=url, step=marker["step"], epoch=marker["epoch"], permanent=marker["permanent"],
                          world_size=marker["world_size"], meta=marker["meta"])


def scan_checkpoints(url: str) -> tuple[list[CheckpointInfo], list[str]]:
    """Complete checkpoints under ``url`` (oldest first) and the URLs of incomplete ones."""
    complete, incomplete = [], []
    for entry in storage.listdir(url):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] != "directory" or not STEP_DIR.fullmatch(name):
            continue
        child = storage.join(url, name)
        info = verify_checkpoint(child)
        if info is None:
            incomplete.append(child)
        else:
            complete.append(info)
    complete.sort(key=lambda c: c.step)
    return complete, incomplete


def latest_checkpoint(url: str) -> CheckpointInfo | None:
    """The newest complete checkpoint under ``url`` (a run's ``checkpoints/`` folder)."""
    complete, _ = scan_checkpoints(url)
    return complete[-1] if complete else None


# One writer per run: the runner claims the run's output for each new attempt before starting
# the trainer, and passes the attempt number in ATTEMPT_ENV. A trainer whose attempt is no longer
# the claimed one (a straggler of a cancelled or requeued attempt) must not commit checkpoints.
OWNER_FILE = "attempt.json"
ATTEMPT_ENV = "MAESTRO_ATTEMPT"


class StaleAttemptError(RuntimeError):
    """This process belongs to an attempt that a newer attempt of the run has replaced."""


def claim_output(output: str, attempt: int) -> None:
    storage.write_json(storage.join(output, OWNER_FILE), {"attempt": attempt})


def check_owner(output: str, attempt: int | None) -> None:
    """Raise StaleAttemptError when a newer attempt has claimed ``output``. Outside maestro
    (no attempt number, no claim) there is nothing to check."""
    if attempt is None:
        return
    try:
        claimed = storage.read_json(storage.join(output, OWNER_FILE)).get("attempt")
    except (FileNotFoundError, ValueError, AttributeError):
        return
    if isinstance(claimed, int) and claimed != attempt:
        raise StaleAttemptError(f"attempt {attempt} is stale: attempt {claimed} now owns {output}; "
                                "stopping without writing a checkpoint")
