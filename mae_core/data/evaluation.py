"""A dataset's images with the evaluation transform: its first ones, for looking at what a model
does, and a whole labelled split, for evaluating an encoder (linear probe, fine-tuning).

Training crops at random (``augment``); evaluation takes the centre: the largest centred square
of the image, resized (bicubic) to the model's input size, which is "resize the shorter side,
then centre-crop" in one resampling. Pixels are standardised exactly as in training
(``augment.normalise``). "First" is storage order: the dataset's read units as ``sources.resolve``
lists them, each unit's samples in order, skipping images that do not decode. Synthetic data
(no ``data.url``) gives the first images of the run's own seeded synthetic set.

``ValidationSplit`` reads a split once, in the same storage order, with its class labels: rank
r of w takes the contiguous slice [n*r//w, n*(r+1)//w) of the n samples, so the ranks together
see each sample exactly once, with no shuffle, no fill and no drop-last.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import fsspec
import numpy as np
import torch
from PIL import Image

from mae_core.data import SYNTHETIC_SAMPLES, dataset_size
from mae_core.data.augment import MEAN, STD, UnreadableImage, _decoding, normalise
from mae_core.data.config import SYNTHETIC_HAS_NO_LABELS, DataConfig
from mae_core.data.readers import read_unit
from mae_core.data.sources import Dataset, resolve
from mae_core.data.stream import DataError, check_label_range, check_labelled, unlabelled

log = logging.getLogger(__name__)

# Synthetic images are standardised already (zero mean, unit variance, no colour space); shown
# as if normalised with this mean and std, so +-2 standard deviations span black to white.
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.25, 0.25, 0.25)


class NotEnoughImages(ValueError):
    """The dataset holds fewer readable images than were asked for."""


def center_crop(data: bytes, size: int, fraction: float = 1.0) -> np.ndarray:
    """Encoded image -> (size, size, 3) uint8: its centred square of ``fraction`` of the shorter
    side, resized bicubic; 0.875 is "resize the shorter side to 256, centre-crop 224".

    Raises UnreadableImage when the bytes do not decode."""
    with _decoding():
        img = Image.open(io.BytesIO(data))
        img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    side = min(w, h) * fraction
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


def rank_slice(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the samples, in storage order, that ``rank`` evaluates; may be empty."""
    return total * rank // world_size, total * (rank + 1) // world_size


class ValidationSplit:
    """A labelled split, resolved (listed and checked) once when made: an evaluation reads it every
    epoch, and listing ImageNet's validation folder again each time costs requests and time.
    The data is checked here: it must have labels (``data.labels`` itself is not needed). Each
    image is its centred square of ``crop`` of the shorter side (``center_crop``)."""

    def __init__(self, cfg: DataConfig, crop: float = 1.0) -> None:
        if cfg.url is None:
            raise ValueError(SYNTHETIC_HAS_NO_LABELS)
        self.cfg, self.crop = cfg, crop
        self.dataset = resolve(cfg.url, cfg.files_per_read)
        declared = dataset_size(cfg)
        if declared is not None and declared != self.dataset.samples:
            raise ValueError(f"data.num_samples={declared} but data.url {self.dataset.description} holds "
                             f"{self.dataset.samples} samples; remove data.num_samples or correct it")
        check_labelled(self.dataset)

    @property
    def samples(self) -> int:
        """Samples in the split: its ranks together yield this many, less any that do not decode
        (each logged)."""
        return self.dataset.samples

    def share(self, batch_size: int, rank: int,
              world_size: int) -> tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """The most batches this rank's share can hold (fewer when samples do not decode), known
        before any is read, and the batches themselves, read as they are consumed: this rank's
        share of the split, once, in storage order, as (images, labels), images (B, 3, S, S)
        float32 centre crops normalised like training, labels (B,) int64. Every batch holds
        ``batch_size`` samples but the last, which may be short; a rank with no samples yields
        nothing. Samples that do not decode are skipped and logged, up to
        ``data.max_skip_fraction`` of the rank's share (then DataError)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        start, stop = rank_slice(self.samples, rank, world_size)
        return -(-(stop - start) // batch_size), _validation(self.cfg, self.dataset, self.crop, batch_size, start, stop)


def validation_batches(cfg: DataConfig, batch_size: int, rank: int,
                       world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One rank's batches of the split in ``cfg`` (``ValidationSplit.share``)."""
    return ValidationSplit(cfg).share(batch_size, rank, world_size)[1]


def _validation(cfg: DataConfig, dataset: Dataset, crop_fraction: float, batch_size: int, start: int,
                stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    crops: list[np.ndarray] = []
    labels: list[int] = []
    ids: list[str] = []
    skipped, bad_units = 0, set[str]()

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        out = normalise(np.stack(crops)), torch.tensor(labels, dtype=torch.int64)
        check_label_range(out[1], ids, dataset.num_classes)
        crops.clear()
        labels.clear()
        ids.clear()
        return out

    offset = 0
    for unit in dataset.units:
        first, offset = offset, offset + unit.samples
        wanted = set(range(max(start, first) - first, min(stop, offset) - first))
        if not wanted:
            continue
        fs = fsspec.core.url_to_fs(unit.url)[0]
        # Delivered in storage order; what could not be read comes last, and is skipped.
        for sample in read_unit(unit, fs, wanted, cfg.io_retries, labels=True):
            try:
                if sample.data is None:
                    raise UnreadableImage(sample.error)
                crop = center_crop(sample.data, cfg.input_size, crop_fraction)
            except UnreadableImage as e:
                log.warning("data: skipped %s in %s: %s", sample.id, unit.url, e)
                skipped += 1
                bad_units.add(unit.url)
                if skipped > cfg.max_skip_fraction * (stop - start):
                    raise DataError(f"data: {skipped} of the {stop - start} samples this rank evaluates do not "
                                    f"decode, more than data.max_skip_fraction={cfg.max_skip_fraction} allows; "
                                    f"they are in {', '.join(sorted(bad_units))}; replace or remove those "
                                    "shards, or raise data.max_skip_fraction") from None
                continue
            if sample.label is None:
                raise unlabelled(f"{sample.id} in {unit.url}")
            crops.append(crop)
            labels.append(sample.label)
            ids.append(sample.id)
            if len(crops) == batch_size:
                yield batch()
    if crops:
        yield batch()
