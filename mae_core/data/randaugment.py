"""RandAugment (Cubuk et al. 2020) with Pillow's operations, as the official MAE fine-tune runs
it through timm (``rand-m9-mstd0.5-inc1``): the "increasing" variants, whose effect grows with the
magnitude, two operations drawn per image, each applied with probability 0.5.

Every draw comes from the sample's own generator, so an image is augmented the same way on a
resumed job and at any world size.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from PIL import Image, ImageEnhance, ImageOps

from mae_core.data.config import MEAN, RandAugmentConfig

# What geometric operations uncover is filled with the dataset's mean colour, as timm does.
FILL = tuple(round(255 * m) for m in MEAN)
APPLY_PROBABILITY = 0.5


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR,
                         fillcolor=FILL)


def _solarize_add(img: Image.Image, level: float) -> Image.Image:
    """Pixels below 128 brightened by up to 110."""
    add = int(110 * level)
    return img.point([min(255, v + add) if v < 128 else v for v in range(256)] * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Each channel cut to its top ``bits`` bits; at magnitude 10 that is none, a black image (what
    older Pillow gave for 0 bits; Pillow 11 refuses 0)."""
    return ImageOps.posterize(img, bits) if bits else Image.new(img.mode, img.size)


def _enhance(kind: type[ImageEnhance._Enhance]) -> Callable[[Image.Image, float, random.Random], Image.Image]:
    return lambda img, level, rng: kind(img).enhance(1.0 + _signed(0.9 * level, rng))


# Each operation at ``level`` in [0, 1] (the magnitude over 10); the ranges are timm's.
OPERATIONS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "auto_contrast": lambda img, level, rng: ImageOps.autocontrast(img),
    "equalize": lambda img, level, rng: ImageOps.equalize(img),
    "invert": lambda img, level, rng: ImageOps.invert(img),
    "rotate": lambda img, level, rng: img.rotate(_signed(30 * level, rng), resample=Image.Resampling.BILINEAR,
                                                 fillcolor=FILL),
    "posterize": lambda img, level, rng: _posterize(img, 4 - int(4 * level)),
    "solarize": lambda img, level, rng: ImageOps.solarize(img, 256 - int(256 * level)),
    "solarize_add": lambda img, level, rng: _solarize_add(img, level),
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": lambda img, level, rng: _affine(img, (1, _signed(0.3 * level, rng), 0, 0, 1, 0)),
    "shear_y": lambda img, level, rng: _affine(img, (1, 0, 0, _signed(0.3 * level, rng), 1, 0)),
    "translate_x": lambda img, level, rng: _affine(img, (1, 0, _signed(0.45 * level, rng) * img.width, 0, 1, 0)),
    "translate_y": lambda img, level, rng: _affine(img, (1, 0, 0, 0, 1, _signed(0.45 * level, rng) * img.height)),
}
NAMES = tuple(OPERATIONS)


def rand_augment(img: Image.Image, cfg: RandAugmentConfig, rng: random.Random) -> Image.Image:
    """An RGB image through ``cfg.layers`` operations (none: 0) drawn with replacement, each applied with
    probability 0.5 at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10]."""
    for _ in range(cfg.layers):
        name = rng.choice(NAMES)
        if rng.random() >= APPLY_PROBABILITY:
            continue
        magnitude = rng.gauss(cfg.magnitude, cfg.magnitude_std) if cfg.magnitude_std else cfg.magnitude
        img = OPERATIONS[name](img, min(10.0, max(0.0, magnitude)) / 10.0, rng)
    return img
