"""Training data: one BatchSource per rank, synthetic or streamed from any fsspec URL.

Importing the package stays light (configs only): the sources, which need torch, load when
``build_source`` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mae_core.data.config import SYNTHETIC_HAS_NO_LABELS, SYNTHETIC_SAMPLES, Augmentation, DataConfig

if TYPE_CHECKING:
    from mae_core.data.base import BatchSource


def build_source(cfg: DataConfig, batch_size: int, rank: int, world_size: int, seed: int,
                 batches_multiple: int = 1, aug: Augmentation | None = None) -> BatchSource:
    """The trainer's data for this rank; ``batches_multiple`` is the gradient-accumulation count.
    With ``data.labels`` it yields (images, labels) batches (tar shards or image folders only).
    ``aug``: what the random crops go through, pre-training's unless given."""
    if cfg.url is None:
        if cfg.labels:
            raise ValueError(SYNTHETIC_HAS_NO_LABELS)
        from mae_core.data.synthetic import SyntheticSource

        return SyntheticSource(dataset_size(cfg) or SYNTHETIC_SAMPLES, cfg.input_size, batch_size, rank, world_size,
                               seed, batches_multiple)
    from mae_core.data.augment import PRETRAINING
    from mae_core.data.stream import StreamingSource

    return StreamingSource(cfg, batch_size, rank, world_size, seed, batches_multiple, aug or PRETRAINING)


def dataset_size(cfg: DataConfig) -> int | None:
    """Samples per epoch, as ``maestro plan`` shows them and the trainer uses them:
    ``data.num_samples``, else the count in the dataset's ``manifest.json``, else (synthetic data)
    the synthetic default. None when only reading the data could tell (a pattern, a list or an
    image folder without a manifest). The streaming source refuses data that holds another count."""
    if cfg.num_samples is not None:
        return cfg.num_samples
    if cfg.url is None:
        return SYNTHETIC_SAMPLES
    if not isinstance(cfg.url, str) or "{" in cfg.url:
        return None
    from mae_core.data.sources import manifest_samples

    return manifest_samples(cfg.url)


def class_names(cfg: DataConfig) -> list[str] | None:
    """The dataset's class names in label order (label i is ``class_names(cfg)[i]``): the
    ``classes`` of its manifest.json, or an image folder's class sub-folders, sorted. None when it
    names none (synthetic data, no classes, shards without a manifest, or a manifest that only
    counts them). Reads the manifest, or lists the whole image folder."""
    if cfg.url is None:
        return None
    from mae_core.data.sources import dataset_classes

    names = dataset_classes(cfg.url)[0]
    return list(names) if names else None


def num_classes(cfg: DataConfig) -> int | None:
    """Classes the labels index (labels run 0..num_classes-1): the manifest's ``num_classes`` (or
    the count of its class names), or an image folder's class sub-folders. None when the data
    holds no labels (synthetic data, a flat folder) or only reading every sample could tell (shards
    named by a pattern or a list, or without a manifest)."""
    if cfg.url is None:
        return None
    from mae_core.data.sources import dataset_classes

    return dataset_classes(cfg.url)[1] or None


__all__ = ["Augmentation", "DataConfig", "build_source", "class_names", "dataset_size", "num_classes"]
