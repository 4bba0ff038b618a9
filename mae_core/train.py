"""MAE pre-training: the model, its data and its loss, run by the shared loop (``mae_core.loop``);
and the entry point of every job (an evaluation config runs ``mae_core.evaluate``).

    python -m mae_core.train CONFIG.yaml                       # one process
    python -m mae_core.launch --nproc 2 CONFIG.yaml            # N local processes (gloo on CPU)
    torchrun --nproc_per_node 8 -m mae_core.train CONFIG.yaml  # any launcher that sets RANK etc.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import ValidationError

from mae_core.checkpoint import CheckpointError
from mae_core.config import ModelConfig, TrainConfig
from mae_core.contract import ATTEMPT_ENV, PREEMPTED_EXIT_CODE, StaleAttemptError
from mae_core.data import build_source
from mae_core.data.stream import DataError
from mae_core.distributed import DistEnv, init_distributed, parallelize, shutdown
from mae_core.evaluate.config import EvalConfig
from mae_core.loop import Job, LoopSettings, NonFiniteLossError, TrainResult, run
from mae_core.model import MaskedAutoencoderViT, build_model
from mae_core.optim import build_optimizer
from mae_core.schedule import Schedule, accumulation_steps


def make_model(cfg: TrainConfig) -> MaskedAutoencoderViT:
    return build_mae(cfg.model, cfg.data.input_size)


def build_mae(m: ModelConfig, input_size: int) -> MaskedAutoencoderViT:
    """The MAE a model section describes, for images of ``input_size``."""
    overrides = {k: v for k, v in {
        "decoder_embed_dim": m.decoder_embed_dim, "decoder_depth": m.decoder_depth,
        "decoder_num_heads": m.decoder_num_heads}.items() if v is not None}
    return build_model(m.arch, img_size=input_size, norm_pix_loss=m.norm_pix_loss,
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


def train(cfg: TrainConfig | EvalConfig) -> TrainResult:
    """Run a job: pre-training, or (an EvalConfig) a linear probe or fine-tune of its encoder."""
    env = init_distributed()
    try:
        if isinstance(cfg, EvalConfig):
            from mae_core.evaluate.job import evaluate  # it builds on this module

            return evaluate(cfg, env)
        return _train(cfg, env)
    finally:
        shutdown()


def load_config(path: str | Path) -> TrainConfig | EvalConfig:
    """A job's config: an evaluation when it names one (``job: linprobe|finetune``), else pre-training."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(raw, dict) and "job" in raw:
        return EvalConfig.model_validate(raw)
    return TrainConfig.model_validate(raw)


def _train(cfg: TrainConfig, env: DistEnv) -> TrainResult:
    attempt = set_up(cfg.runtime.threads)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = parallelize(make_model(cfg).to(env.device), env, cfg.runtime)
    optimizer = build_optimizer(model, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2))
    seed_everything(cfg.seed + env.rank)

    accum = accumulation_steps(cfg.optim.global_batch, cfg.runtime.per_device_batch, env.world_size)
    # Pre-training reads images only, even from a labelled dataset (the labels are the evaluations').
    data = cfg.data.model_copy(update={"labels": False})
    source = build_source(data, cfg.runtime.per_device_batch, env.rank, env.world_size, cfg.seed,
                          batches_multiple=accum)
    sched = Schedule.derive(cfg.optim, cfg.runtime.per_device_batch, env.world_size, source.num_samples)

    def micro_loss(imgs: torch.Tensor, step: int, slice_index: int) -> torch.Tensor:
        gen = mask_generator(cfg.seed, step, slice_index)
        loss, _, _ = model(imgs.to(env.device, non_blocking=True), mask_ratio=cfg.model.mask_ratio, generator=gen)
        return loss

    job = Job(model=model, optimizer=optimizer, source=source, sched=sched, micro_loss=micro_loss,
              fingerprint=cfg.fingerprint(), global_batch=cfg.optim.global_batch)
    return run(job, LoopSettings(cfg.output, cfg.checkpoint, cfg.metrics, cfg.stop_after_step), env, attempt)


def set_up(threads: int | None) -> int | None:
    """Process-wide settings of every job; returns the attempt this process belongs to (set by
    maestro's runner, checked before each save: contract.check_owner)."""
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return int(os.environ[ATTEMPT_ENV]) if os.environ.get(ATTEMPT_ENV, "").isdigit() else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if len(args) != 1:
        print("usage: python -m mae_core.train CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args[0])
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
