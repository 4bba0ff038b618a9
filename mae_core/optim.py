"""Optimizers and their parameter groups: AdamW with the MAE groups for pre-training; for the
evaluations (paper appendix A), layer-wise lr decay groups (fine-tuning) and LARS (linear probing).
The schedule they follow is ``mae_core.schedule``; ``set_lr`` applies it to every group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

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
    """The schedule's lr, scaled per group where a group carries ``lr_scale`` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


_BLOCK = re.compile(r"blocks\.(\d+)\.")
# Before the first block: what turns pixels into tokens.
_EMBEDDING_NAMES = ("cls_token", "pos_embed", "patch_embed", "enc_mask_token")


def layer_id(name: str, depth: int) -> int:
    """A parameter's layer for lr decay: 0 for the embeddings, i + 1 for encoder block i, and
    depth + 1 for everything after the last block (final norm, head)."""
    found = _BLOCK.match(name)
    if found:
        return int(found.group(1)) + 1
    if name.split(".")[0] in _EMBEDDING_NAMES:
        return 0
    return depth + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                       depth: int) -> list[dict[str, object]]:
    """Fine-tuning groups (paper A.2, after BEiT): the lr of layer ``l`` is scaled by
    ``layer_decay ** (depth + 1 - l)``, so encoder block i learns at base × decay^(depth − i) and
    the head at the base lr. Weight decay as in ``param_groups``."""
    groups: dict[tuple[int, bool], dict[str, object]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_id(name, depth)
        decays = not (p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES)
        group = groups.setdefault((layer, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0, "layer": layer,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)  # type: ignore[attr-defined]
    return [groups[k] for k in sorted(groups)]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), the linear-probe
    optimizer of the MAE paper (A.3). Matrices get weight decay and a trust ratio
    ``trust × ‖w‖ / ‖update‖``; biases and norms (1-D) take the plain momentum step."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, object]], lr: float = 0.0,
                 weight_decay: float = 0.0, momentum: float = 0.9, trust: float = 0.001) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "trust": trust})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), group["trust"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
