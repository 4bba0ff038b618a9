"""A seeded in-memory image dataset for tests and smoke runs: no files, same pixels everywhere."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch


def synthetic_images(num: int, size: int, seed: int) -> torch.Tensor:
    """Smooth colour patterns (a few random plane waves per image), roughly unit variance,
    so a masked patch is predictable from its neighbours and the loss can fall."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack(torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size),
                                        indexing="ij"))  # (2, S, S)
    waves = 4
    freq = torch.rand(num, 3, waves, 2, generator=g) * 6 * math.pi
    phase = torch.rand(num, 3, waves, 1, 1, generator=g) * 2 * math.pi
    amp = torch.rand(num, 3, waves, 1, 1, generator=g)
    arg = torch.einsum("ncwk,kxy->ncwxy", freq, coords) + phase
    imgs = (amp * torch.sin(arg)).sum(dim=2)
    return (imgs - imgs.mean()) / imgs.std()


class SyntheticSource:
    """Rank r's k-th micro-batch of an epoch is slice (k * world + r) of the epoch's permutation,
    counted from the sample offset the epoch was resumed at. A global batch of a step is thus the
    same set of samples at any (world size, accumulation) split, and a resume at another world
    size continues the epoch with no sample repeated or skipped."""

    def __init__(self, num_samples: int, input_size: int, batch_size: int, rank: int, world_size: int,
                 seed: int, batches_multiple: int = 1) -> None:
        self.num_samples = num_samples
        self.images = synthetic_images(num_samples, input_size, seed)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        per_round = batch_size * world_size
        self.batches_per_epoch = (num_samples // per_round) // batches_multiple * batches_multiple
        if self.batches_per_epoch == 0:
            raise ValueError(f"data.num_samples={num_samples} is smaller than one global batch "
                             f"({per_round * batches_multiple}); add samples or lower the batch")
        self.epoch_samples = self.batches_per_epoch * per_round
        self.epoch, self.offset, self.taken = 0, 0, 0

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.images), generator=g)[: self.epoch_samples]

    def consumed(self) -> int:
        """Samples of the current epoch consumed by all ranks together."""
        return self.offset + self.taken * self.batch_size * self.world_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            perm = self._permutation()
            while self.consumed() + self.batch_size * self.world_size <= self.epoch_samples:
                start = self.offset + (self.taken * self.world_size + self.rank) * self.batch_size
                self.taken += 1
                yield self.images[perm[start : start + self.batch_size]]
            self.epoch, self.offset, self.taken = self.epoch + 1, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset, self.taken = int(state["epoch"]), int(state["consumed"]), 0

    def metrics(self) -> dict[str, float]:
        return {}
