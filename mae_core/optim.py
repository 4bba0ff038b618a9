"""AdamW with the MAE parameter groups; the schedule it follows is ``mae_core.schedule``."""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "mask_token", "enc_mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on weight matrices only: not on biases, norms or the learned tokens.
    (Position embeddings are fixed buffers, so they are not parameters at all.)"""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    # The fused kernel makes the optimizer ~4x cheaper on CPU, where it is a large share of a step.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=0.0, betas=betas, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
