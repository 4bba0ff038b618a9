"""The evaluation transforms of the official code: training crops covering 0.08-1 of the image (not
pre-training's 0.2-1), and validation as "resize to 256, centre-crop 224"."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from mae_core.data import Augmentation, DataConfig, build_source
from mae_core.data.augment import MEAN, STD
from mae_core.data.config import EVAL_CROP_SCALE
from mae_core.data.evaluation import ValidationSplit, center_crop
from mae_core.evaluate.config import EvalConfig

RED, BLUE = (255, 0, 0), (0, 0, 255)


def framed(side: int, border: int) -> bytes:
    """A blue square inside a red frame ``border`` pixels wide."""
    pixels = np.full((side, side, 3), RED, np.uint8)
    pixels[border:side - border, border:side - border] = BLUE
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def halves(side: int) -> bytes:
    """Left half red, right half blue."""
    pixels = np.full((side, side, 3), RED, np.uint8)
    pixels[:, side // 2:] = BLUE
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_the_validation_crop_leaves_out_the_border_the_paper_crops_away() -> None:
    # 256 -> 224 drops 16 pixels each side: a 12-pixel frame on a 256 image is gone at 0.875, and
    # fills the edge of the largest centred square.
    image = framed(256, 12)
    whole, paper = center_crop(image, 32, 1.0), center_crop(image, 32, 0.875)
    assert (whole[0, :, 0] > 200).all() and (whole[16, 0, 0] > 200)
    assert (paper[..., 2] > 200).all() and (paper[..., 0] < 60).all()


def test_validation_split_crops_as_configured(tmp_path: Path) -> None:
    folder = tmp_path / "val" / "only"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(framed(256, 12))
    cfg = DataConfig(url=str(tmp_path / "val"), input_size=32)
    default = next(iter(ValidationSplit(cfg).share(1, 0, 1)[1]))[0]
    paper = next(iter(ValidationSplit(cfg, 0.875).share(1, 0, 1)[1]))[0]
    red = (1.0 - MEAN[0]) / STD[0]
    assert default[0, 0, 0, :].max() > red - 0.5  # the frame, in the red channel
    assert paper[0, 0].max() < 0.0  # no red anywhere


@pytest.mark.parametrize("workers", [0, 2])
def test_an_evaluation_trains_on_crops_of_its_own_scale(tmp_path: Path, workers: int) -> None:
    # Crops covering 1-2% of a half-red, half-blue image are mostly one colour; crops of the whole
    # image always hold both. The scale must reach the loader's worker processes.
    for i in range(32):
        (tmp_path / f"{i:02d}.png").write_bytes(halves(64))
    cfg = DataConfig(url=str(tmp_path), input_size=16, num_workers=workers)

    def one_coloured(scale: tuple[float, float]) -> float:
        batch = next(iter(build_source(cfg, 32, 0, 1, seed=0, aug=Augmentation(crop_scale=scale))))
        red_pixels = (batch[:, 0] > 0).flatten(1).float().mean(1)
        return float(((red_pixels == 0) | (red_pixels == 1)).float().mean())

    assert one_coloured((1.0, 1.0)) == 0.0
    assert one_coloured((0.01, 0.02)) > 0.5


def test_eval_defaults_are_the_official_transforms_and_a_bad_scale_is_one_line() -> None:
    raw = {"job": "linprobe", "output": "out", "model": {"arch": "mae_vit_micro_patch4"}, "init": {"url": "run"},
           "data": {"url": "train"}, "val": {"url": "val"}}
    cfg = EvalConfig.model_validate(raw)
    assert cfg.crop_scale == EVAL_CROP_SCALE == (0.08, 1.0) and cfg.val_crop == 0.875
    with pytest.raises(ValidationError, match=r"crop_scale \[0.5, 0.2\] is not an area range: write \[low, high\]"):
        EvalConfig.model_validate({**raw, "crop_scale": [0.5, 0.2]})
