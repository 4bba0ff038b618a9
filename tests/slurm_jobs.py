"""Callables that tests/test_local_slurm.py submits with submitit.

They live in a module of their own because submitit pickles them by reference: the job imports
this module again, through the PYTHONPATH that the tests set in the job's setup lines.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import submitit


def add(a: int, b: int) -> int:
    return a + b


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


class PreemptibleSleeper(submitit.helpers.Checkpointable):
    """Sleeps until preempted on its first run; once resumed from its checkpoint, returns at once.

    Each run touches ``running-<SLURM_RESTART_COUNT>`` in ``marker_dir`` so the test can see it start.
    """

    def __init__(self) -> None:
        self.checkpointed_at_restart: int | None = None

    def __call__(self, marker_dir: str) -> dict[str, int | None]:
        Path(marker_dir, f"running-{restart_count()}").touch()
        if self.checkpointed_at_restart is None:
            # Far longer than the test waits: only preemption ends this run.
            time.sleep(600)
        return {"restart_count": restart_count(), "checkpointed_at_restart": self.checkpointed_at_restart}

    def checkpoint(self, marker_dir: str) -> submitit.helpers.DelayedSubmission:
        # Carried to the next run inside the pickled self: proof that checkpoint() ran.
        self.checkpointed_at_restart = restart_count()
        return super().checkpoint(marker_dir)
