"""Mixup and CutMix for fine-tuning (paper A.2), as pure functions of a seeded generator, so a
resumed job mixes exactly as an uninterrupted one would."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def soft_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float()


def mix(imgs: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float,
        rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each batch mixed with itself reversed: by mixup (alpha ``mixup``) or by pasting a box of it
    (cutmix, alpha ``cutmix``); with both on, one of the two at random per batch. ``targets`` are
    class probabilities, mixed in the proportion of the pixels."""
    if not mixup and not cutmix:
        return imgs, targets
    use_cutmix = bool(cutmix) and (not mixup or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    flipped = imgs.flip(0)
    if use_cutmix:
        h, w = imgs.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        imgs = imgs.clone()
        imgs[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the share of pixels actually kept
    else:
        imgs = imgs * lam + flipped * (1.0 - lam)
    return imgs, targets * lam + targets.flip(0) * (1.0 - lam)
