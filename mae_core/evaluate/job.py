"""Linear probe and fine-tune as jobs of the shared loop (``mae_core.loop``): the encoder of a
pre-training checkpoint (any world size), a labelled training split, a head, and top-1/top-5 on the
validation split after every epoch, recorded with the training scalars.

    python -m mae_core.train EVAL.yaml     # a config with ``job: linprobe`` or ``job: finetune``
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mae_core import storage
from mae_core.checkpoint import Checkpointer, CheckpointError, load_weights
from mae_core.contract import CHECKPOINTS_DIR, CheckpointInfo
from mae_core.data import DataConfig, build_source, class_names, num_classes
from mae_core.data.evaluation import ValidationSplit
from mae_core.distributed import DistEnv, parallelize
from mae_core.evaluate.classifier import EncoderClassifier
from mae_core.evaluate.config import EvalConfig
from mae_core.evaluate.mix import mix, soft_targets
from mae_core.loop import Job, LoopSettings, TrainResult, run
from mae_core.optim import LARS, layer_decay_groups
from mae_core.schedule import Schedule, accumulation_steps
from mae_core.train import build_mae, mask_generator, seed_everything, set_up

log = logging.getLogger("mae_core.train")


def pretrained_checkpoint(cfg: EvalConfig) -> CheckpointInfo | None:
    """The pre-training checkpoint to start from: ``init.step`` (0: none, a random encoder) or the latest."""
    if cfg.init.step == 0:
        return None
    url = storage.join(cfg.init.url, CHECKPOINTS_DIR)
    complete, _ = Checkpointer(url, rank=0, world_size=1).scan()
    found = [c for c in complete if cfg.init.step in (None, c.step)]
    if not found:
        steps = ", ".join(str(c.step) for c in complete) or "none"
        raise CheckpointError(f"init.step={cfg.init.step}: no such complete checkpoint under {url} (complete: "
                              f"{steps}); choose one of them, or 0 for a random-init encoder")
    return found[-1]


def build_classifier(cfg: EvalConfig, classes: int, load: bool) -> EncoderClassifier:
    """The classifier on one process, unsharded; with ``load``, its encoder from the pre-training checkpoint."""
    seed_everything(cfg.seed)  # the same head (and random encoder) on every rank
    mae = build_mae(cfg.model, cfg.data.input_size)
    info = pretrained_checkpoint(cfg) if load else None
    if info is not None:
        load_weights(info, mae)
    return EncoderClassifier(mae, classes, cfg.job, cfg.pool, cfg.drop_path)


def make_optimizer(cfg: EvalConfig, model: EncoderClassifier) -> torch.optim.Optimizer:
    """LARS on the head for a linear probe (A.3); AdamW with layer-wise lr decay to fine-tune (A.2)."""
    if cfg.job == "linprobe":
        return LARS([p for p in model.parameters() if p.requires_grad], weight_decay=cfg.optim.weight_decay,
                    momentum=cfg.optim.momentum)
    groups = layer_decay_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay, len(model.blocks))
    return torch.optim.AdamW(groups, lr=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=True)


def sync_batchnorm_stats(model: nn.Module, env: DistEnv) -> None:
    """Average BatchNorm running statistics over ranks: FSDP leaves buffers per rank, and the
    probe's statistics must be one model's, the same whichever rank saves or evaluates."""
    if env.world_size == 1:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            for stat in (module.running_mean, module.running_var):
                dist.all_reduce(stat)
                stat /= env.world_size


def evaluate(cfg: EvalConfig, env: DistEnv) -> TrainResult:
    attempt = set_up(cfg.runtime.threads)
    data = cfg.data.model_copy(update={"labels": True})
    val = cfg.val.model_copy(update={"labels": True})
    classes = cfg.num_classes or num_classes(data)
    if classes is None:
        raise ValueError("num_classes is unknown: the training split names no classes (an image folder needs "
                         "class sub-folders, shards a manifest.json with num_classes or classes)")
    check_same_classes(data, val, classes)
    split = ValidationSplit(val, cfg.val_crop)
    resuming = Checkpointer(storage.join(cfg.output, CHECKPOINTS_DIR), 0, 1).latest() is not None
    # The pre-trained weights only matter on the first start: a resume loads the job's own checkpoint.
    model = parallelize(build_classifier(cfg, classes, load=not resuming).to(env.device), env, cfg.runtime)
    optimizer = make_optimizer(cfg, model)
    seed_everything(cfg.seed + env.rank)

    accum = accumulation_steps(cfg.optim.global_batch, cfg.runtime.per_device_batch, env.world_size)
    source = build_source(data, cfg.runtime.per_device_batch, env.rank, env.world_size, cfg.seed,
                          batches_multiple=accum, aug=cfg.augmentation())
    sched = Schedule.derive(cfg.optim, cfg.runtime.per_device_batch, env.world_size, source.num_samples)

    def micro_loss(batch: tuple[torch.Tensor, torch.Tensor], step: int, slice_index: int) -> torch.Tensor:
        imgs, labels = batch[0].to(env.device), batch[1].to(env.device)
        # Mixing depends only on (seed, step, slice): the same after a resume and at any world size.
        imgs, targets = mix(imgs, soft_targets(labels, classes), cfg.mixup, cfg.cutmix,
                            np.random.default_rng([cfg.seed, step, slice_index]))
        # So is drop path, drawn from the global generator: seeded here per micro-batch, since
        # anything else that draws from it (a DataLoader iterator started on resume) would shift it.
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            torch.manual_seed(mask_generator(cfg.seed, step, slice_index).initial_seed())
            logits = model(imgs)
        return F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)

    def after_step() -> None:
        sync_batchnorm_stats(model, env)

    def epoch_end(step: int) -> dict[str, float]:
        return top_k(model, split.share(cfg.runtime.per_device_batch, env.rank, env.world_size), env)

    job = Job(model=model, optimizer=optimizer, source=source, sched=sched, micro_loss=micro_loss,
              fingerprint=cfg.fingerprint(), global_batch=cfg.optim.global_batch, epoch_end=epoch_end,
              after_step=after_step)
    return run(job, LoopSettings(cfg.output, cfg.checkpoint, cfg.metrics, cfg.stop_after_step), env, attempt)


def check_same_classes(train: DataConfig, val: DataConfig, classes: int) -> None:
    """A label must name the same class in both splits: image-folder labels are each folder's own
    sorted class sub-folders, so a validation folder missing one class would shift every label after it."""
    train_names, val_names = class_names(train), class_names(val)
    if train_names is not None and val_names is not None and train_names != val_names:
        differ = sorted(set(train_names) ^ set(val_names)) or ["the same names in another order"]
        raise ValueError(f"the validation split's classes are not the training split's ({len(val_names)} vs "
                         f"{len(train_names)}; differing: {', '.join(differ[:5])}); give eval.val_url the training "
                         "split's classes")
    val_count = num_classes(val)
    if val_count is not None and val_count != classes:
        raise ValueError(f"the validation split has {val_count} classes, the training split {classes}; give "
                         "eval.val_url the training split's classes")


@torch.no_grad()
def top_k(model: nn.Module, share: tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor]]],
          env: DistEnv) -> dict[str, float]:
    """Top-1 (and, with more than 5 classes, top-5) accuracy in % and the mean loss over the whole
    split, every rank its share (``ValidationSplit.share``), read as it goes: only a batch at a time is
    in memory.

    The forward passes are collective under FSDP (each gathers parameters), so every rank runs as
    many as the most any rank may have: one that has run out repeats an input and counts nothing.
    A rank whose data fails goes on the same way and raises once all have finished, so the
    others are not left waiting in a collective.
    """
    model.eval()
    planned, batches = share
    most = torch.tensor([planned], device=env.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    # top-1, top-5, samples, loss sum, ranks whose data failed
    counts = torch.zeros(5, dtype=torch.float64, device=env.device)
    spare: torch.Tensor | None = None
    failed: Exception | None = None
    classes = 0
    for _ in range(int(most.item())):
        batch = None
        if failed is None:
            try:
                batch = next(batches, None)
            except Exception as e:  # re-raised below, after the collectives, with its traceback
                failed = e
                counts[4] = 1
        if batch is None:
            classes = model(spare if spare is not None else first_input(model, env)).shape[-1]
            continue
        imgs, labels = batch[0].to(env.device), batch[1].to(env.device)
        spare = imgs[:1]
        logits = model(imgs)
        classes = logits.shape[-1]
        hits = logits.topk(min(5, classes), dim=-1).indices == labels[:, None]
        counts[:4] += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=-1).sum().item(), len(labels),
                                    F.cross_entropy(logits.float(), labels, reduction="sum").item()],
                                   dtype=torch.float64, device=env.device)
    dist.all_reduce(counts)
    top1, top5, n, loss, failures = counts.tolist()
    if failed is not None:
        raise failed
    if failures:
        raise RuntimeError(f"validation failed on {int(failures)} other rank(s); their logs say why")
    if n == 0:
        raise ValueError("the validation split is empty; check val.url")
    scores = {"val_top1": 100.0 * top1 / n, "val_loss": loss / n}
    if classes > 5:  # with 5 classes or fewer, every label is in the top 5
        scores["val_top5"] = 100.0 * top5 / n
    return scores


def first_input(model: nn.Module, env: DistEnv) -> torch.Tensor:
    """A one-image input of the model's shape, for a rank with no validation batch at all."""
    embed = model.patch_embed
    side = round((model.pos_embed.shape[1] - 1) ** 0.5) * embed.kernel_size[0]
    return torch.zeros(1, embed.in_channels, side, side, device=env.device)
