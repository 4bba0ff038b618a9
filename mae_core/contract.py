"""What the trainer and whatever launches it must agree on, importable without torch.

Launchers and backends (local, SLURM, Ray) read exit codes, set the rendezvous environment and
find the latest checkpoint of a run; the trainer writes them. Both sides use this module, so
neither hard-codes the other's conventions and the orchestrator never imports torch for them.
"""

from __future__ import annotations

import logging
import re
import signal
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


def exit_status(code: int, forwarded_signal: bool) -> int:
    """A launcher's view of a trainer's exit status.

    A trainer signalled before it installed its handler dies of the signal (a negative status).
    It had trained nothing since its last checkpoint, so when the launcher itself forwarded a
    preemption signal that counts as the preempted exit, not a failure.
    """
    return PREEMPTED_EXIT_CODE if forwarded_signal and code < 0 else code


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


def verify_checkpoint(url: str) -> CheckpointInfo | None:
    """The checkpoint at ``url`` if its marker exists and every file it lists has its recorded
    size; None for a save that died mid-write."""
    try:
        marker = storage.read_json(storage.join(url, MARKER))
    except (FileNotFoundError, ValueError):
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
