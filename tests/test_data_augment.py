"""RandomResizedCrop, flip and normalisation with Pillow, seeded per sample."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from mae_core.data.augment import MEAN, STD, UnreadableImage, augment, crop_box, normalise, sample_rng


def encoded(width: int, height: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, fmt)
    return out.getvalue()


@given(st.integers(1, 2000), st.integers(1, 2000), st.integers(0, 10**6))
def test_crop_box_lies_inside_the_image(width: int, height: int, seed: int) -> None:
    left, top, w, h = crop_box(width, height, random.Random(seed))
    assert 0 <= left and 0 <= top and 0 < w and 0 < h
    assert left + w <= width and top + h <= height


def test_crop_box_follows_the_scale_and_ratio_ranges() -> None:
    rng = random.Random(0)
    boxes = [crop_box(500, 375, rng) for _ in range(2000)]
    fractions = [w * h / (500 * 375) for _, _, w, h in boxes]
    aspects = [w / h for _, _, w, h in boxes]
    assert min(fractions) >= 0.19 and max(fractions) <= 1.0
    assert min(aspects) >= 3 / 4 - 0.02 and max(aspects) <= 4 / 3 + 0.02
    # large crops that do not fit the image are redrawn, so small ones are over-represented
    assert min(fractions) < 0.25 and max(fractions) > 0.95


@pytest.mark.parametrize(("fmt", "mode"), [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGBA"), ("PNG", "P"),
                                           ("WEBP", "RGB")])
def test_augment_gives_rgb_crops_of_any_input(fmt: str, mode: str) -> None:
    out = augment(encoded(120, 90, fmt, mode), 32, random.Random(1))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_augment_is_a_function_of_seed_epoch_and_sample() -> None:
    data = encoded(200, 150)
    first = augment(data, 48, sample_rng(7, 0, "shard-0.tar/a"))
    assert np.array_equal(first, augment(data, 48, sample_rng(7, 0, "shard-0.tar/a")))
    assert not np.array_equal(first, augment(data, 48, sample_rng(7, 1, "shard-0.tar/a")))
    assert not np.array_equal(first, augment(data, 48, sample_rng(7, 0, "shard-0.tar/b")))


def test_jpeg_draft_stays_close_to_a_full_decode() -> None:
    data = encoded(1024, 768)
    for seed in range(10):
        fast = augment(data, 64, random.Random(seed)).astype(np.float32)
        exact = augment(data, 64, random.Random(seed), draft=False).astype(np.float32)
        assert np.abs(fast - exact).mean() < 4.0  # of 255: below visible differences


def test_corrupt_data_raises_unreadable_image() -> None:
    data = encoded(64, 64)
    with pytest.raises(UnreadableImage, match="not an image Pillow can read"):
        augment(b"not an image", 32, random.Random(0))
    with pytest.raises(UnreadableImage, match="OSError: image file is truncated") as info:
        augment(data[: len(data) // 2], 32, random.Random(0))
    assert isinstance(info.value.__cause__, OSError)


def test_normalise_uses_the_imagenet_statistics() -> None:
    pixels = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    out = normalise(pixels)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32 and out.is_contiguous()
    assert out[0, 0, 0, 0].item() == pytest.approx((1 - MEAN[0]) / STD[0])
    assert out[1, 2, 3, 3].item() == pytest.approx(-MEAN[2] / STD[2])
    assert not math.isnan(out.sum().item())
