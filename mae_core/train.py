"""The MAE pre-training loop. Reads top to bottom: set-up, resume, steps, checkpoints, exit.

    python -m mae_core.train CONFIG.yaml                       # one process
    python -m mae_core.launch --nproc 2 CONFIG.yaml            # N local processes (gloo on CPU)
    torchrun --nproc_per_node 8 -m mae_core.train CONFIG.yaml  # any launcher that sets RANK etc.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import ValidationError

from mae_core import storage
from mae_core.checkpoint import Checkpointer, CheckpointError, SavePolicy, TrainState, rng_state, set_rng_state
from mae_core.config import TrainConfig
from mae_core.contract import ATTEMPT_ENV, CHECKPOINTS_DIR, PREEMPTED_EXIT_CODE, StaleAttemptError, check_owner
from mae_core.data import build_source
from mae_core.data.stream import DataError
from mae_core.distributed import DistEnv, StepVotes, init_distributed, parallelize, shutdown
from mae_core.goodput import AttemptClock
from mae_core.metrics import MetricsWriter
from mae_core.model import MaskedAutoencoderViT, build_model
from mae_core.optim import build_optimizer, set_lr
from mae_core.schedule import Schedule, accumulation_steps
from mae_core.signals import PreemptionFlag

log = logging.getLogger("mae_core.train")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainResult:
    status: Literal["completed", "stopped", "preempted"]
    step: int


def make_model(cfg: TrainConfig) -> MaskedAutoencoderViT:
    m = cfg.model
    overrides = {k: v for k, v in {
        "decoder_embed_dim": m.decoder_embed_dim, "decoder_depth": m.decoder_depth,
        "decoder_num_heads": m.decoder_num_heads}.items() if v is not None}
    return build_model(m.arch, img_size=cfg.data.input_size, norm_pix_loss=m.norm_pix_loss,
                       mask_strategy=m.mask_strategy, mask_tokens_in_encoder=m.mask_tokens_in_encoder,
                       **overrides)


def mask_generator(seed: int, step: int, slice_index: int) -> torch.Generator:
    """Masks depend only on (seed, step, which slice of the global batch): the same at any world
    size and accumulation split, and reproduced exactly after a resume."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + step * 1_000_003 + slice_index) % 2**63)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def train(cfg: TrainConfig) -> TrainResult:
    env = init_distributed()
    try:
        return _train(cfg, env)
    finally:
        shutdown()


def _train(cfg: TrainConfig, env: DistEnv) -> TrainResult:
    # Set by maestro's runner: the attempt this process belongs to (contract.check_owner).
    attempt = int(os.environ[ATTEMPT_ENV]) if os.environ.get(ATTEMPT_ENV, "").isdigit() else None
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = parallelize(make_model(cfg).to(env.device), env, cfg.runtime)
    optimizer = build_optimizer(model, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2))
    seed_everything(cfg.seed + env.rank)

    accum = accumulation_steps(cfg.optim.global_batch, cfg.runtime.per_device_batch, env.world_size)
    source = build_source(cfg.data, cfg.runtime.per_device_batch, env.rank, env.world_size, cfg.seed,
                          batches_multiple=accum)
    sched = Schedule.derive(cfg.optim, cfg.runtime.per_device_batch, env.world_size, source.num_samples)
    state = TrainState(model, optimizer)
    ckpt = Checkpointer(storage.join(cfg.output, CHECKPOINTS_DIR), env.rank, env.world_size,
                        keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save)
    policy = SavePolicy(cfg.checkpoint, sched.steps_per_epoch, sched.total_steps)

    step = 0
    latest = ckpt.latest()
    if latest is not None:
        if latest.meta.get("fingerprint") != cfg.fingerprint():
            raise CheckpointError(
                f"checkpoint {latest.url} was written by a different config (fingerprint "
                f"{latest.meta.get('fingerprint')} != {cfg.fingerprint()}); use a new output URL to start over")
        rank_state = ckpt.load(latest, state)
        source.load_state_dict(rank_state["data"])
        if latest.world_size == env.world_size:
            set_rng_state(rank_state["rng"])
        step = latest.step
        if env.is_main:
            log.info("resumed from %s at step %d", latest.url, step)
    clock = AttemptClock(attempt)
    metrics = MetricsWriter(cfg.output, enabled=env.is_main, flush_s=cfg.metrics.flush_s, resume_step=step,
                            clock=clock)
    first_step = step + 1
    if env.is_main:
        log.info("world %d, accumulation %d, lr %.3g, %d steps/epoch, %d steps total", env.world_size,
                 sched.accum_steps, sched.lr, sched.steps_per_epoch, sched.total_steps)

    def save(at_step: int, permanent: bool) -> None:
        check_owner(cfg.output, attempt)  # a replaced attempt must not commit over its successor
        rank_state = {"data": source.state_dict(), "rng": rng_state()}
        meta = {"fingerprint": cfg.fingerprint(), "global_batch": cfg.optim.global_batch}
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
            imgs = next(batches).to(env.device, non_blocking=True)
            model.set_requires_gradient_sync(micro == sched.accum_steps - 1)
            gen = mask_generator(cfg.seed, step, micro * env.world_size + env.rank)
            loss, _, _ = model(imgs, mask_ratio=cfg.model.mask_ratio, generator=gen)
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
        step += 1

        step_s = time.perf_counter() - t0
        clock.step_ended(step_s)
        span_s, span_steps = span_s + step_s, span_steps + 1
        stop = cfg.stop_after_step is not None and step >= cfg.stop_after_step
        due = policy.decide(step, requested=votes.stop or stop, time_due=votes.save_due)
        # A checkpoint step is always recorded: the curve and progress.json reach the step a
        # resume starts from, whatever the interval. So is an attempt's first step, flushed at once:
        # its clock tells the runner when training began (restart overhead).
        if step % cfg.metrics.log_interval == 0 or step in (first_step, sched.total_steps) or due is not None:
            record = {"loss": votes.loss, "lr": lr, "grad_norm": grad_norm.item(),
                      "img_s": cfg.optim.global_batch * span_steps / span_s, "epoch": sched.epoch_of(step),
                      **source.metrics()}
            span_s, span_steps = 0.0, 0
            metrics.log(step, record)
            if env.is_main:
                log.info("step %d/%d loss %.4f lr %.3g %.1f img/s", step, sched.total_steps,
                         record["loss"], lr, record["img_s"])
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if len(args) != 1:
        print("usage: python -m mae_core.train CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig.from_yaml(args[0])
    except ValidationError as e:
        err = e.errors()[0]
        print(f"error: {args[0]}: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: cannot read config {args[0]}: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except (NonFiniteLossError, CheckpointError, StaleAttemptError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        # Most are set-up problems with one clear line, but a ValueError from inside the loop may
        # be a bug: keep its traceback in the log, and the line last, where the runner reads it.
        traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    return PREEMPTED_EXIT_CODE if result.status == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
