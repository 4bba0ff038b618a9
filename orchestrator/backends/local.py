"""Local backend: each run is a detached process tree on this machine that outlives the CLI.

A run's supervisor (this module's ``__main__``) waits for one of ``max_concurrent_runs`` slots,
a file lock that the OS releases if the process dies, then runs one attempt through the runner.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO

from orchestrator.backends.base import Ended
from orchestrator.profiles import LocalProfile
from orchestrator.registry import ACTIVE, Registry, RunState
from orchestrator.runner import RESUME_HINT, local_command, run_attempt

STATE_DIR_ENV = "MAESTRO_STATE_DIR"


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, Path.home() / ".cache" / "maestro"))


class LocalBackend:
    name = "local"

    def __init__(self, profile: LocalProfile) -> None:
        self.profile = profile

    def submit(self, registry: Registry, runs: list[RunState]) -> list[str]:
        specs = registry.specs(runs)
        ids = {s.key: f"local-{uuid.uuid4().hex[:8]}" for s in runs}
        # Written before the supervisors start: from then on each is the only writer of its state.
        registry.update_many({s.key: {"status": "queued", "backend": self.name, "job_ids": [*s.job_ids, ids[s.key]],
                                      "pid": None, "host": os.uname().nodename} for s in runs},
                             "submitted", {s.key: {"backend": self.name, "job_id": ids[s.key]} for s in runs})
        for state in runs:
            nproc = specs[state.key].resources.world_size
            subprocess.Popen(
                [sys.executable, "-m", "orchestrator.backends.local", registry.root, state.experiment, state.run_id,
                 str(nproc), str(self.profile.max_concurrent_runs)],
                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        return [ids[s.key] for s in runs]

    def status(self, registry: Registry, state: RunState) -> Ended | None:
        if state.status in ACTIVE and state.pid and state.host in (None, os.uname().nodename) \
                and not _alive(state.pid) and time.time() - state.updated > 5:
            return Ended("failed", f"the run's process died without recording an end; {RESUME_HINT}")
        return None

    def cancel(self, registry: Registry, state: RunState) -> None:
        registry.request_cancel(state)
        here = state.host in (None, os.uname().nodename)
        if state.status in ("running", "cancelling") and state.pid and here and _alive(state.pid):
            # The runner forwards TERM to the trainer, which checkpoints and stops; the runner then
            # records the run cancelled. Until then it is cancelling, so no resume starts beside it.
            registry.update(state.experiment, state.run_id, owner=state.attempts, status="cancelling")
            os.kill(state.pid, signal.SIGTERM)
        elif state.status in ("pending", "preempted") or not (state.pid and here and _alive(state.pid)):
            registry.update(state.experiment, state.run_id, status="cancelled", ended=time.time(),
                            message=f"cancelled; {RESUME_HINT}")
        # else: queued for a slot; its supervisor sees the request and records the run cancelled.

    def logs(self, registry: Registry, state: RunState, attempt: int | None = None) -> str:
        return registry.read_logs(state, attempt or max(1, state.attempts))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def acquire_slot(slots: int, registry: Registry, state: RunState) -> IO[str] | None:
    """Block until one of ``slots`` machine-wide slots is free; None if cancelled while waiting."""
    directory = state_dir() / "slots"
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(slots):
            handle = (directory / f"slot-{i}.lock").open("w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                handle.close()
        if registry.cancel_requested(state):
            return None
        time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description="supervise one local run (started by `maestro submit`)")
    parser.add_argument("root")
    parser.add_argument("experiment")
    parser.add_argument("run_id")
    parser.add_argument("nproc", type=int)
    parser.add_argument("slots", type=int)
    args = parser.parse_args()
    # A cancel's TERM (``LocalBackend.cancel``) may come before the runner forwards it to the
    # trainer; the registry's cancel request then stops the run, and this process must not die
    # leaving its run without an end.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    registry = Registry(args.root)
    state = registry.update(args.experiment, args.run_id, pid=os.getpid())
    slot = acquire_slot(args.slots, registry, state)
    if slot is None:
        registry.update(args.experiment, args.run_id, status="cancelled", ended=time.time(), pid=None)
        return 0
    with slot:
        state = run_attempt(args.root, args.experiment, args.run_id, local_command(args.nproc))
    return 0 if state.status in ("completed", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
