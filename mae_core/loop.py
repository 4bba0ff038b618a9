"""The training loop every job shares (pre-training, linear probe, fine-tune). Reads top to bottom:
resume, steps, votes, records, checkpoints, exit.

A job brings its model, optimizer, data, schedule and the loss of one micro-batch (``Job``);
the loop owns everything that makes a run survive: the exact resume, the save policy, the
preemption signal, the owner check, metrics and the goodput clock. So an evaluation job resumes
bit-exactly and requeues like pre-training, with no second copy of any of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mae_core import storage
from mae_core.checkpoint import Checkpointer, CheckpointError, SavePolicy, TrainState, rng_state, set_rng_state
from mae_core.config import CheckpointConfig, MetricsConfig
from mae_core.contract import CHECKPOINTS_DIR, check_owner
from mae_core.data.base import BatchSource
from mae_core.distributed import DistEnv, StepVotes
from mae_core.goodput import AttemptClock
from mae_core.metrics import MetricsWriter
from mae_core.optim import set_lr
from mae_core.schedule import Schedule
from mae_core.signals import PreemptionFlag

log = logging.getLogger("mae_core.train")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainResult:
    status: Literal["completed", "stopped", "preempted"]
    step: int


@dataclass
class Job:
    """What a job brings to the loop."""

    model: nn.Module  # parallelized
    optimizer: torch.optim.Optimizer
    source: BatchSource
    sched: Schedule
    # The loss of one micro-batch: (batch, step, which slice of the global batch) -> scalar.
    micro_loss: Callable[[Any, int, int], torch.Tensor]
    fingerprint: str  # what determines the numbers: a resume must match it
    global_batch: int
    # Called after the last step of each epoch (every rank); its scalars join that step's record.
    epoch_end: Callable[[int], dict[str, float]] | None = None
    # Called after every optimizer step (every rank), before any save.
    after_step: Callable[[], None] | None = None


@dataclass(frozen=True)
class LoopSettings:
    """The parts of a job's config the loop reads."""

    output: str
    checkpoint: CheckpointConfig
    metrics: MetricsConfig
    stop_after_step: int | None


def run(job: Job, settings: LoopSettings, env: DistEnv, attempt: int | None) -> TrainResult:
    model, optimizer, source, sched = job.model, job.optimizer, job.source, job.sched
    state = TrainState(model, optimizer)
    ckpt = Checkpointer(storage.join(settings.output, CHECKPOINTS_DIR), env.rank, env.world_size,
                        keep_last=settings.checkpoint.keep_last, async_save=settings.checkpoint.async_save)
    policy = SavePolicy(settings.checkpoint, sched.steps_per_epoch, sched.total_steps)

    step = 0
    latest = ckpt.latest()
    if latest is not None:
        if latest.meta.get("fingerprint") != job.fingerprint:
            raise CheckpointError(
                f"checkpoint {latest.url} was written by a different config (fingerprint "
                f"{latest.meta.get('fingerprint')} != {job.fingerprint}); use a new output URL to start over")
        rank_state = ckpt.load(latest, state)
        source.load_state_dict(rank_state["data"])
        if latest.world_size == env.world_size:
            set_rng_state(rank_state["rng"])
        step = latest.step
        if env.is_main:
            log.info("resumed from %s at step %d", latest.url, step)
    clock = AttemptClock(attempt)
    metrics = MetricsWriter(settings.output, enabled=env.is_main, flush_s=settings.metrics.flush_s, resume_step=step,
                            clock=clock, checkpoint_step=lambda: ckpt.committed_step)
    first_step = step + 1
    if env.is_main:
        log.info("world %d, accumulation %d, lr %.3g, %d steps/epoch, %d steps total", env.world_size,
                 sched.accum_steps, sched.lr, sched.steps_per_epoch, sched.total_steps)

    def save(at_step: int, permanent: bool) -> None:
        check_owner(settings.output, attempt)  # a replaced attempt must not commit over its successor
        rank_state = {"data": source.state_dict(), "rng": rng_state()}
        meta = {"fingerprint": job.fingerprint, "global_batch": job.global_batch}
        began = time.perf_counter()
        ckpt.save(state, at_step, at_step // sched.steps_per_epoch, meta, rank_state, permanent)
        clock.saved(at_step, time.perf_counter() - began)
        metrics.flush(force=True)

    flag = PreemptionFlag().install()
    batches = iter(source)
    params = [p for p in model.parameters() if p.requires_grad]
    status: Literal["completed", "stopped", "preempted"] = "completed"
    span_s, span_steps = 0.0, 0  # time and steps since the last record, for its img/s
    model.train()
    while step < sched.total_steps:
        clock.step_began()
        t0 = time.perf_counter()
        lr = sched.lr_at(step)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=env.device)
        for micro in range(sched.accum_steps):
            model.set_requires_gradient_sync(micro == sched.accum_steps - 1)  # type: ignore[operator]
            loss = job.micro_loss(next(batches), step, micro * env.world_size + env.rank)
            (loss / sched.accum_steps).backward()
            loss_sum += loss.detach().float()

        # Rank 0's clock decides timed saves: clocks differ, and every rank must take part.
        votes = StepVotes.all_reduce(loss_sum / sched.accum_steps, stop=flag.raised,
                                     save_due=env.is_main and policy.time_due(), env=env)
        if votes.nonfinite:
            raise NonFiniteLossError(
                f"loss is not finite at step {step + 1}; stopped before the update, the last checkpoint "
                f"is intact. Lower optim.blr or use precision=fp32, then resume")
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if job.after_step is not None:
            job.after_step()
        step += 1

        step_s = time.perf_counter() - t0
        clock.step_ended(step_s)
        span_s, span_steps = span_s + step_s, span_steps + 1
        evaluated: dict[str, float] = {}
        if job.epoch_end is not None and step % sched.steps_per_epoch == 0:
            evaluated = job.epoch_end(step)
            model.train()
        stop = settings.stop_after_step is not None and step >= settings.stop_after_step
        due = policy.decide(step, requested=votes.stop or stop, time_due=votes.save_due)
        # A checkpoint step is always recorded: the curve and progress.json reach the step a
        # resume starts from, whatever the interval. So is an attempt's first step, flushed at once:
        # its clock tells the runner when training began (restart overhead). And an evaluation.
        if (step % settings.metrics.log_interval == 0 or step in (first_step, sched.total_steps) or due is not None
                or evaluated):
            record = {"loss": votes.loss, "lr": lr, "grad_norm": grad_norm.item(),
                      "img_s": job.global_batch * span_steps / span_s, "epoch": sched.epoch_of(step),
                      **source.metrics(), **evaluated}
            span_s, span_steps = 0.0, 0
            metrics.log(step, record)
            if env.is_main:
                log.info("step %d/%d loss %.4f lr %.3g %.1f img/s%s", step, sched.total_steps, record["loss"], lr,
                         record["img_s"], "".join(f" {k} {v:.4g}" for k, v in evaluated.items()))
            if step == first_step:
                metrics.flush()
        if due is not None:
            save(step, due.permanent)
        if votes.stop:
            status = "preempted"
            if env.is_main:
                log.info("preempted (signal %s): checkpoint at step %d saved", flag.signum, step)
            break
        if stop and step < sched.total_steps:
            status = "stopped"
            break
    began = time.perf_counter()
    ckpt.wait()
    clock.blocked(time.perf_counter() - began)
    metrics.close()
    return TrainResult(status=status, step=step)
