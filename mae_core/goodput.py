"""Goodput: how much of an attempt's allocated time trained the model. Importable without torch.

The trainer keeps an ``AttemptClock`` and reports it in ``progress.json`` (rank 0, on every
flush, and at once after its first step and after every checkpoint). When the attempt ends, its
runner turns that report and the attempt's own start and end into ``Goodput`` terms with
``attempt_goodput``; the registry keeps the sum over attempts. The terms are disjoint spans of the
attempt, so ``allocated >= productive + lost + overhead + checkpoint``; the rest ("other") is
metrics flushes and the time from the trainer's exit to the runner recording it.

- allocated: the attempt's start to its end, as its runner saw them;
- overhead: the attempt's start to its first step (process start-up, checkpoint load, data set-up);
- checkpoint: time the training loop was blocked saving checkpoints;
- productive: step time whose result was kept (saved by a checkpoint, or the run completed);
- lost: step time computed and then thrown away: work after the attempt's last checkpoint, when the
  attempt died without saving it. A trainer that checkpoints on its stop signal loses nothing.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel

from mae_core.contract import PREEMPTED_EXIT_CODE


class Goodput(BaseModel):
    """Seconds of each term, for one attempt or summed over a run's attempts."""

    allocated_s: float = 0.0
    productive_s: float = 0.0
    lost_s: float = 0.0
    overhead_s: float = 0.0
    checkpoint_s: float = 0.0

    @property
    def ratio(self) -> float | None:
        """Productive over allocated; None before any attempt has ended."""
        return self.productive_s / self.allocated_s if self.allocated_s > 0 else None

    def __add__(self, other: Goodput) -> Goodput:
        return Goodput(**{k: getattr(self, k) + getattr(other, k) for k in Goodput.model_fields})


class AttemptClock:
    """The trainer's side: when its first step began, and step and checkpoint time since, in the
    shape ``attempt_goodput`` reads. Constant size, whatever the attempt's length."""

    def __init__(self, attempt: int | None) -> None:
        self.attempt = attempt
        self.first_step_at: float | None = None  # wall clock: compared with the runner's
        self.step_s = 0.0
        self.checkpoint_s = 0.0
        self.saved_step: int | None = None
        self.saved_at: float | None = None
        self.step_s_at_save = 0.0

    def step_began(self) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def step_ended(self, seconds: float) -> None:
        self.step_s += seconds

    def saved(self, step: int, blocked_s: float) -> None:
        self.checkpoint_s += blocked_s
        self.saved_step, self.saved_at, self.step_s_at_save = step, time.time(), self.step_s

    def blocked(self, seconds: float) -> None:
        """Checkpoint time outside a save: waiting for an async save to commit."""
        self.checkpoint_s += seconds

    def report(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "first_step_at": self.first_step_at, "step_s": self.step_s,
                "checkpoint_s": self.checkpoint_s, "saved_step": self.saved_step, "saved_at": self.saved_at,
                "step_s_at_save": self.step_s_at_save, "pid": os.getpid()}


def attempt_goodput(started: float, ended: float, code: int, report: dict[str, Any] | None) -> Goodput:
    """One attempt's terms from its start and end (runner's clock), the trainer's exit status and
    its last clock report (None if it left none for this attempt).

    A completed attempt kept every step. One that saved on its stop signal kept its steps up to that
    save. Any other end kept only steps up to its last checkpoint, and everything from that
    checkpoint (or from its first step) until the end is lost: the report may be up to one flush old,
    but the trainer was computing steps until it died.
    """
    allocated = max(0.0, ended - started)
    if not report or report.get("first_step_at") is None:
        return Goodput(allocated_s=allocated, overhead_s=allocated)  # never reached a step
    overhead = min(allocated, max(0.0, report["first_step_at"] - started))
    terms = {"allocated_s": allocated, "overhead_s": overhead, "checkpoint_s": report["checkpoint_s"]}
    if code == 0:
        return Goodput(**terms, productive_s=report["step_s"])
    if code == PREEMPTED_EXIT_CODE:  # it saved on its stop signal
        kept = report["step_s_at_save"] if report.get("saved_at") is not None else 0.0
        return Goodput(**terms, productive_s=kept, lost_s=report["step_s"] - kept)
    since = report["saved_at"] if report.get("saved_at") is not None else report["first_step_at"]
    kept = report["step_s_at_save"] if report.get("saved_at") is not None else 0.0
    return Goodput(**terms, productive_s=kept, lost_s=max(0.0, ended - since))
