"""Which patches the encoder sees: the masking strategies of MAE paper Table 1f.

Every strategy is expressed the same way the official code expresses random masking:
a per-sample score over the L patches, argsorted, with the first ``len_keep`` kept. Block and
grid masks only change the score, so one gather path serves all three and counts are exact.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import get_args

import torch

from mae_core.config import MaskStrategy

MASK_STRATEGIES: tuple[str, ...] = get_args(MaskStrategy)


@dataclass(frozen=True)
class Mask:
    ids_keep: torch.Tensor  # (N, len_keep) indices of visible patches, in shuffled order
    ids_restore: torch.Tensor  # (N, L) inverse permutation of the shuffle
    mask: torch.Tensor  # (N, L) float, 0 = visible, 1 = removed (official convention)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible tokens per sample, as the paper defines it: int(L * (1 - r))."""
    return int(num_patches * (1 - mask_ratio))


def sample_mask(
    strategy: MaskStrategy,
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Mask:
    """Draw one mask per sample. A seeded ``generator`` makes the draw reproducible."""
    h, w = grid
    num_patches = h * w
    if strategy == "random":
        score = torch.rand(batch, num_patches, generator=generator)
        len_keep = num_visible(num_patches, mask_ratio)
    elif strategy == "block":
        score = _block_score(batch, grid, mask_ratio, generator)
        len_keep = num_visible(num_patches, mask_ratio)
    elif strategy == "grid":
        score = _grid_score(batch, grid)
        len_keep = math.ceil(h / 2) * math.ceil(w / 2)
    else:
        raise ValueError(f"mask_strategy {strategy!r} is unknown; use one of {', '.join(MASK_STRATEGIES)}")
    score = score.to(device)
    ids_shuffle = torch.argsort(score, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Mask(ids_keep=ids_shuffle[:, :len_keep], ids_restore=ids_restore, mask=mask)


def _block_score(
    batch: int, grid: tuple[int, int], mask_ratio: float, generator: torch.Generator | None
) -> torch.Tensor:
    """BEiT blockwise masking: rectangles of random area and aspect ratio until the budget is met.

    Patches inside blocks score in [1, 2), others in [0, 1), so the removed set is the blocks,
    topped up or trimmed at random to the exact count.
    """
    h, w = grid
    target = h * w - num_visible(h * w, mask_ratio)
    min_area = min(4, target) if target else 0
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    rng = random.Random(seed)
    flags = torch.zeros(batch, h, w)
    for n in range(batch):
        covered = 0
        for _ in range(10 * h * w):
            if covered >= target:
                break
            area = rng.uniform(min_area, max(min_area, target - covered))
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            bh = max(1, min(h, round(math.sqrt(area * aspect))))
            bw = max(1, min(w, round(math.sqrt(area / aspect))))
            top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
            block = flags[n, top : top + bh, left : left + bw]
            covered += int((block == 0).sum())
            block.fill_(1)
    jitter = torch.rand(batch, h * w, generator=generator)
    return flags.view(batch, h * w) + jitter


def _grid_score(batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Keep one patch of every 2x2 cell (the top-left one): 75% removed on even grids."""
    h, w = grid
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    removed = ((rows % 2) + (cols % 2) > 0).float().reshape(1, h * w)
    return removed.expand(batch, h * w).clone()
