"""The batch arithmetic and learning-rate schedule of a run, as pure functions of its config.

The global batch is the invariant: gradient accumulation follows from it, the per-device batch
and the world size, so moving a run to fewer devices changes neither the learning rate nor the
number of steps. ``maestro plan`` and the trainer both call ``Schedule.derive``, so what a plan
shows is what the trainer does. No torch here: the orchestrator imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports this module for its batch rule
    from mae_core.config import OptimConfig


class ScheduleError(ValueError):
    """A batch or dataset size the schedule cannot be built from; the message names the fix."""


def accumulation_steps(global_batch: int, per_device_batch: int, world_size: int) -> int:
    per_round = per_device_batch * world_size
    if global_batch % per_round:
        raise ScheduleError(
            f"optim.global_batch={global_batch} is not divisible by per_device_batch ({per_device_batch}) x "
            f"{world_size} devices; change the batch sizes or the device count so it divides")
    return global_batch // per_round


@dataclass(frozen=True)
class Schedule:
    world_size: int
    accum_steps: int
    num_samples: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float
    min_lr: float

    @classmethod
    def derive(cls, optim: OptimConfig, per_device_batch: int, world_size: int, num_samples: int) -> Schedule:
        """Every epoch drops its last partial global batch, the same at any world size."""
        accum = accumulation_steps(optim.global_batch, per_device_batch, world_size)
        steps_per_epoch = num_samples // optim.global_batch
        if steps_per_epoch == 0:
            raise ScheduleError(f"data has {num_samples} samples, fewer than optim.global_batch="
                                f"{optim.global_batch}; lower the batch or add data")
        return cls(world_size=world_size, accum_steps=accum, num_samples=num_samples,
                   steps_per_epoch=steps_per_epoch, total_steps=optim.epochs * steps_per_epoch,
                   warmup_steps=round(optim.warmup_epochs * steps_per_epoch),
                   lr=optim.blr * optim.global_batch / 256, min_lr=optim.min_lr)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup_steps, self.total_steps)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then half-cycle cosine to ``min_lr``; set every iteration."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
