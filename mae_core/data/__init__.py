"""Training data: one BatchSource per rank, synthetic or streamed from any fsspec URL.

Importing the package stays light (configs only): the sources, which need torch, load when
``build_source`` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mae_core.data.config import SYNTHETIC_SAMPLES, DataConfig

if TYPE_CHECKING:
    from mae_core.data.base import BatchSource


def build_source(cfg: DataConfig, batch_size: int, rank: int, world_size: int, seed: int,
                 batches_multiple: int = 1) -> BatchSource:
    """The trainer's data for this rank; ``batches_multiple`` is the gradient-accumulation count."""
    if cfg.url is None:
        from mae_core.data.synthetic import SyntheticSource

        return SyntheticSource(cfg.num_samples or SYNTHETIC_SAMPLES, cfg.input_size, batch_size, rank, world_size,
                               seed, batches_multiple)
    from mae_core.data.stream import StreamingSource

    return StreamingSource(cfg, batch_size, rank, world_size, seed, batches_multiple)


__all__ = ["DataConfig", "build_source"]
