"""The one interface between the trainer and its data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch


class BatchSource(Protocol):
    """An endless stream of this rank's micro-batches, resumable from a JSON-able state.

    Every rank yields the same number of batches per epoch (drop-last), a multiple of the
    gradient-accumulation steps, so optimizer steps and epochs line up on every rank.
    """

    batches_per_epoch: int
    num_samples: int  # samples per epoch, the figure the schedule is derived from

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, float]: ...
