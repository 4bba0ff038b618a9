"""Training augmentation with Pillow alone: RandomResizedCrop (bicubic; pre-training's scale 0.2-1), flip,
for fine-tuning RandAugment and random erasing, then normalise.

Randomness comes from a per-sample generator seeded by (seed, epoch, sample id), so a sample is
augmented the same way whichever rank or worker reads it, and on a resumed run.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mae_core.data.config import MEAN, STD, Augmentation
from mae_core.data.randaugment import rand_augment

RATIO = (3 / 4, 4 / 3)
# What Pillow raises on bad image bytes: OSError for unidentified, truncated and corrupt data, the
# others from plugins on malformed headers and tiles. Caught only around the calls that decode, so
# the same types raised by a bug anywhere else still stop the run.
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)


class UnreadableImage(Exception):
    """A sample's bytes are not an image Pillow can decode: a bad file, to skip, not a bug."""


@contextmanager
def _decoding() -> Iterator[None]:
    try:
        yield
    except UnidentifiedImageError as e:  # its message holds only a buffer's address
        raise UnreadableImage("not an image Pillow can read") from e
    except DECODE_ERRORS as e:
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e


PRETRAINING = Augmentation()


def sample_rng(seed: int, epoch: int, sample_id: str) -> random.Random:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{sample_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = PRETRAINING.crop_scale,
             ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random crop covering ``scale`` of the area at an aspect in ``ratio``.

    Ten tries at a random area and log-uniform aspect; if none fits, the centre crop at the
    nearest allowed aspect (the torchvision definition of RandomResizedCrop).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def erase_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int] | None:
    """(left, top, width, height) of a random-erasing box (Zhong et al. 2020, timm's settings): 2%
    to a third of the area at a log-uniform aspect in 0.3-3.3, ten tries; None when none fits."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if w < width and h < height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    return None


def erased(arr: np.ndarray, box: tuple[int, int, int, int], rng: random.Random) -> np.ndarray:
    """A copy of the image with ``box`` filled with per-pixel noise that standardises to N(0, 1)
    (timm's "pixel" mode, drawn here before standardising, so clipped to 0-255)."""
    left, top, w, h = box
    noise = np.random.default_rng(rng.getrandbits(64)).standard_normal((h, w, 3))
    out = arr.copy()
    out[top:top + h, left:left + w] = np.clip(np.rint(255 * (np.array(MEAN) + np.array(STD) * noise)), 0, 255)
    return out


def augment(data: bytes, size: int, rng: random.Random, draft: bool = True,
            aug: Augmentation = PRETRAINING) -> np.ndarray:
    """Encoded image -> (size, size, 3) uint8 crop covering ``aug.crop_scale`` of its area, through
    RandAugment (fine-tuning), flipped at random, then randomly erased (fine-tuning). timm flips
    before RandAugment; colour operations commute with a flip and rotations, shears and
    translations come in both signs, so the order barely changes what the model sees.

    Raises UnreadableImage when the bytes do not decode; any other exception is a bug.
    """
    with _decoding():
        img = Image.open(io.BytesIO(data))
    full_w, full_h = img.size
    left, top, w, h = crop_box(full_w, full_h, rng, aug.crop_scale)
    flip = rng.random() < 0.5
    with _decoding():
        if draft:
            # JPEG DCT scaling decodes at 1/2, 1/4 or 1/8 size for a fraction of the cost; ask only for
            # a reduction that keeps the crop at least ``size`` pixels wide and high, so bicubic still
            # downsamples. Other formats ignore the request.
            img.draft("RGB", (math.ceil(full_w * size / w), math.ceil(full_h * size / h)))
        img.load()  # decode here, so nothing after it can fail on the file's bytes
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    out = img.resize((size, size), Image.Resampling.BICUBIC,
                     box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    if out.mode != "RGB":
        out = out.convert("RGB")
    if aug.rand_augment is not None:
        out = rand_augment(out, aug.rand_augment, rng)
    arr = np.asarray(out)
    arr = arr[:, ::-1] if flip else arr
    if aug.erase and rng.random() < aug.erase and (box := erase_box(size, size, rng)) is not None:
        arr = erased(arr, box, rng)
    return arr


def normalise(images: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 standardised with the ImageNet mean and std."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    out = torch.empty(batch.shape, dtype=torch.float32).copy_(batch).div_(255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return out.sub_(mean).div_(std)
