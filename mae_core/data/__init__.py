"""Training data: one BatchSource per rank, synthetic or streamed from any fsspec URL."""

from __future__ import annotations

from mae_core.data.base import BatchSource
from mae_core.data.config import SYNTHETIC_SAMPLES, DataConfig
from mae_core.data.synthetic import SyntheticSource


def build_source(cfg: DataConfig, batch_size: int, rank: int, world_size: int, seed: int,
                 batches_multiple: int = 1) -> BatchSource:
    """The trainer's data for this rank; ``batches_multiple`` is the gradient-accumulation count."""
    if cfg.url is None:
        return SyntheticSource(cfg.num_samples or SYNTHETIC_SAMPLES, cfg.input_size, batch_size, rank, world_size, seed,
                               batches_multiple)
    from mae_core.data.stream import StreamingSource

    return StreamingSource(cfg, batch_size, rank, world_size, seed, batches_multiple)


__all__ = ["BatchSource", "DataConfig", "build_source"]
