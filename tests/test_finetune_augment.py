"""The fine-tune's augmentation of the official code (timm's ``rand-m9-mstd0.5-inc1`` RandAugment
and random erasing with probability 0.25), a function of the sample like pre-training's."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_core.data import Augmentation, DataConfig, build_source
from mae_core.data import randaugment as ra
from mae_core.data.augment import MEAN, STD, augment, erase_box, sample_rng
from mae_core.data.config import RandAugmentConfig
from mae_core.evaluate.config import EvalConfig

FINETUNE = Augmentation(crop_scale=(0.08, 1.0), rand_augment=RandAugmentConfig(), erase=0.25)


def noise_image(side: int = 32, seed: int = 0) -> Image.Image:
    """Colourful noise in 50-200: every operation has something to change (contrast to stretch,
    edges to sharpen, a histogram to equalise)."""
    return Image.fromarray(np.random.default_rng(seed).integers(50, 200, (side, side, 3), dtype=np.uint8))


def encoded(seed: int) -> bytes:
    out = io.BytesIO()
    noise_image(64, seed).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("name", ra.NAMES)
def test_each_operation_keeps_the_image_shape_and_changes_it_at_full_strength(name: str) -> None:
    img = noise_image()
    out = ra.OPERATIONS[name](img, 1.0, random.Random(0))
    assert (out.size, out.mode) == (img.size, "RGB")
    assert not np.array_equal(np.asarray(out), np.asarray(img))


def test_operations_are_drawn_per_layer_applied_half_the_time_at_the_drawn_magnitude(
        monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[tuple[str, float]] = []
    monkeypatch.setattr(ra, "OPERATIONS", {name: (lambda img, level, rng, name=name: applied.append((name, level))
                                                  or img) for name in ra.NAMES})
    rng = random.Random(0)
    for _ in range(2000):
        ra.rand_augment(noise_image(4), RandAugmentConfig(layers=2, magnitude=9, magnitude_std=0.5), rng)
    levels = np.array([level for _, level in applied])
    assert abs(len(applied) / 4000 - 0.5) < 0.03  # two layers each, probability 0.5
    assert {name for name, _ in applied} == set(ra.NAMES)
    assert levels.max() <= 1.0 and abs(levels.mean() - 0.9) < 0.01 and 0.04 < levels.std() < 0.06
    applied.clear()
    ra.rand_augment(noise_image(4), RandAugmentConfig(layers=0), rng)
    assert applied == []


def test_fine_tune_augmentation_is_a_function_of_the_sample_() -> None:
    data = encoded(0)
    first = augment(data, 32, sample_rng(7, 0, "a"), aug=FINETUNE)
    assert np.array_equal(first, augment(data, 32, sample_rng(7, 0, "a"), aug=FINETUNE))
    assert not np.array_equal(first, augment(data, 32, sample_rng(7, 1, "a"), aug=FINETUNE))
    # Same crop and flip (drawn first), then RandAugment: most samples come out different.
    crops_only = Augmentation(crop_scale=(0.08, 1.0))
    randaug = Augmentation(crop_scale=(0.08, 1.0), rand_augment=RandAugmentConfig())
    changed = sum(not np.array_equal(augment(data, 32, sample_rng(7, 0, f"s{i}"), aug=crops_only),
                                     augment(data, 32, sample_rng(7, 0, f"s{i}"), aug=randaug)) for i in range(40))
    assert 20 <= changed < 40  # 3/4 expected: a quarter draw no operation in either layer


def test_random_erasing_fills_one_box_of_the_paper_size_with_standard_noise() -> None:
    data = encoded(1)
    crops_only, erasing = Augmentation(crop_scale=FINETUNE.crop_scale), Augmentation(crop_scale=FINETUNE.crop_scale,
                                                                                      erase=1.0)
    erased_values = []
    for i in range(60):
        plain = augment(data, 32, sample_rng(0, 0, f"s{i}"), aug=crops_only).astype(np.int16)
        out = augment(data, 32, sample_rng(0, 0, f"s{i}"), aug=erasing)
        rows, cols = np.nonzero((out != plain).any(-1))
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        box_area = (bottom - top) * (right - left)
        assert 0.015 * 32 * 32 <= box_area <= 32 * 32 / 3 + 32  # 2% to a third, rounding aside
        assert len(rows) > 0.9 * box_area  # a filled box, not scattered pixels
        erased_values.append(((out[top:bottom, left:right] / 255 - np.array(MEAN)) / np.array(STD)).reshape(-1))
    standardised = np.concatenate(erased_values)
    assert abs(standardised.mean()) < 0.1 and 0.75 < standardised.std() < 1.05  # N(0, 1), clipped to 0-255
    # At the paper's 0.25, about a quarter of the images are erased.
    no_randaug = FINETUNE.model_copy(update={"rand_augment": None})
    share = np.mean([not np.array_equal(augment(data, 32, sample_rng(1, 0, f"s{i}"), aug=crops_only),
                                        augment(data, 32, sample_rng(1, 0, f"s{i}"), aug=no_randaug))
                     for i in range(400)])
    assert 0.18 < share < 0.32


def test_erase_boxes_cover_two_percent_to_a_third_at_bounded_aspects() -> None:
    rng = random.Random(0)
    for _ in range(500):
        box = erase_box(224, 224, rng)
        assert box is not None
        left, top, w, h = box
        assert 0 <= left <= 224 - w and 0 <= top <= 224 - h
        assert 0.019 <= w * h / 224**2 <= 0.34 and 0.29 <= h / w <= 3.5


def test_the_loader_workers_augment_as_the_main_process_does(tmp_path: Path) -> None:
    for i in range(16):
        (tmp_path / f"{i:02d}.png").write_bytes(encoded(i))
    batches = [next(iter(build_source(DataConfig(url=str(tmp_path), input_size=16, num_workers=workers), 16, 0, 1,
                                      seed=0, aug=FINETUNE))) for workers in (0, 2)]
    assert np.array_equal(batches[0].numpy(), batches[1].numpy())
    plain = next(iter(build_source(DataConfig(url=str(tmp_path), input_size=16), 16, 0, 1, seed=0,
                                   aug=Augmentation(crop_scale=(0.08, 1.0)))))
    assert not np.array_equal(plain.numpy(), batches[0].numpy())


def test_a_resume_refuses_a_changed_augmentation_and_accepts_a_config_from_before_it() -> None:
    raw = {"job": "finetune", "output": "out", "model": {"arch": "mae_vit_micro_patch4"}, "init": {"url": "run"},
           "data": {"url": "train"}, "val": {"url": "val"}}
    before = EvalConfig.model_validate(raw)
    assert before.augmentation() == Augmentation(crop_scale=(0.08, 1.0))
    # This config's fingerprint before RandAugment and erasing existed (a job started then resumes).
    assert before.fingerprint() == "71f660be64e34d9a"
    on = EvalConfig.model_validate({**raw, "rand_augment": {}, "random_erase": 0.25})
    assert on.augmentation() == FINETUNE
    assert on.fingerprint() != before.fingerprint()
    off = EvalConfig.model_validate({**raw, "rand_augment": {"layers": 0}})
    assert off.augmentation() == before.augmentation()
