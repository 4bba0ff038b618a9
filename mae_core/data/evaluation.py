"""A dataset's first images with the evaluation transform, for looking at what a model does.

Training crops at random (``augment``); evaluation takes the centre: the largest centred square
of the image, resized (bicubic) to the model's input size, which is "resize the shorter side,
then centre-crop" in one resampling. Pixels are standardised exactly as in training
(``augment.normalise``). "First" is storage order: the dataset's read units as ``sources.resolve``
lists them, each unit's samples in order, skipping images that do not decode. Synthetic data
(no ``data.url``) gives the first images of the run's own seeded synthetic set.
"""

from __future__ import annotations

import io
import logging

import fsspec
import numpy as np
import torch
from PIL import Image

from mae_core.data import SYNTHETIC_SAMPLES, dataset_size
from mae_core.data.augment import MEAN, STD, UnreadableImage, _decoding, normalise
from mae_core.data.config import DataConfig
from mae_core.data.readers import read_unit
from mae_core.data.sources import resolve

log = logging.getLogger(__name__)

# Synthetic images are standardised already (zero mean, unit variance, no colour space); shown
# as if normalised with this mean and std, so +-2 standard deviations span black to white.
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.25, 0.25, 0.25)


class NotEnoughImages(ValueError):
    """The dataset holds fewer readable images than were asked for."""


def center_crop(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> (size, size, 3) uint8: its largest centred square, resized bicubic.

    Raises UnreadableImage when the bytes do not decode."""
    with _decoding():
        img = Image.open(io.BytesIO(data))
        img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(out)


def display_stats(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that turn the model's inputs back into [0, 1] pixels."""
    return (MEAN, STD) if cfg.url is not None else (SYNTHETIC_MEAN, SYNTHETIC_STD)


def first_images(cfg: DataConfig, count: int, seed: int) -> torch.Tensor:
    """The dataset's first ``count`` images as the model sees them: (count, 3, S, S) float32,
    normalised like training. ``seed`` is the run's (it only matters for synthetic data)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    size = cfg.input_size
    if cfg.url is None:
        from mae_core.data.synthetic import synthetic_images

        total = dataset_size(cfg) or SYNTHETIC_SAMPLES
        if count > total:
            raise NotEnoughImages(f"the synthetic dataset holds {total} images, fewer than {count}")
        return synthetic_images(total, size, seed)[:count].clone()
    dataset = resolve(cfg.url, cfg.files_per_read)
    crops: list[np.ndarray] = []
    for unit in dataset.units:
        fs = fsspec.core.url_to_fs(unit.url)[0]
        start = 0
        while start < unit.samples:
            # What is still missing, plus a few in case some do not decode.
            stop = min(unit.samples, start + count - len(crops) + 8)
            for sample in sorted(read_unit(unit, fs, set(range(start, stop)), cfg.io_retries),
                                 key=lambda s: s.ordinal):
                try:
                    if sample.data is None:
                        raise UnreadableImage(sample.error)
                    crops.append(center_crop(sample.data, size))
                except UnreadableImage as e:
                    log.warning("data: skipped %s in %s: %s", sample.id, unit.url, e)
                if len(crops) == count:
                    return normalise(np.stack(crops))
            start = stop
    raise NotEnoughImages(f"data.url {dataset.description} holds only {len(crops)} readable images, fewer than {count}")
