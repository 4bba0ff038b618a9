"""MAE reconstructions from a run's checkpoint (paper Figure 2), computed on one CPU process.

The checkpoint is loaded into a plain, unsharded model (``checkpoint.load_weights``: DCP holds
full logical tensors, so this works whatever world size saved it). The images are the run's
dataset's first ones with the evaluation transform (``data.evaluation``); each gets a mask drawn
from ``seed``. Everything returned is an image in [0, 1], un-normalised with the dataset's mean
and std, so it can be shown as is.

With ``norm_pix_loss`` the model predicts each patch normalised by its own mean and variance;
the prediction is turned back into pixels with the *target* patch's statistics
(``MaskedAutoencoderViT.reconstruct``, same eps as the loss). Without that the patches come out
grey (official MAE issue #12). Note what it implies: a removed patch's reconstruction then holds
its true mean and contrast, and only its structure comes from the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mae_core import storage
from mae_core.checkpoint import Checkpointer, load_weights
from mae_core.config import GRID_MASK_RATIO, MaskStrategy, TrainConfig
from mae_core.contract import CHECKPOINTS_DIR, CheckpointInfo
from mae_core.data.evaluation import NotEnoughImages, display_stats, first_images
from mae_core.masking import num_visible
from mae_core.model import MaskedAutoencoderViT
from mae_core.train import make_model


class ReconstructionError(ValueError):
    """A request that cannot be served (no such checkpoint, a mask ratio the model cannot use, too
    few images); the message names the fix, ``option`` the argument at fault ("step",
    "mask_ratio", "images"; None when it is the run or its data)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class Reconstructions:
    """One row per image; images are (N, 3, S, S) in [0, 1], ``mask`` is (N, L) with 1 = removed."""

    step: int  # the checkpoint's step (-1 when built from a model rather than a checkpoint)
    mask_ratio: float
    mask: torch.Tensor
    removed: torch.Tensor  # (N, 1, S, S) bool: pixels of removed patches
    masked: torch.Tensor  # visible patches; removed ones grey (the dataset mean)
    reconstruction: torch.Tensor  # the model's pixels on removed patches, the original's on visible ones
    prediction: torch.Tensor  # the model's pixels everywhere
    original: torch.Tensor
    inputs: torch.Tensor  # the normalised images the model saw


def checkpoints_url(cfg: TrainConfig) -> str:
    return storage.join(cfg.output, CHECKPOINTS_DIR)


def find_checkpoint(cfg: TrainConfig, step: int | None = None) -> CheckpointInfo:
    """The latest complete checkpoint of the run, or the one at ``step``; incomplete ones (a save
    in progress or cut short) are never used."""
    ckpt = Checkpointer(checkpoints_url(cfg), rank=0, world_size=1)
    complete, incomplete = ckpt.scan()
    if step is None:
        if not complete:
            half = f" ({len(incomplete)} incomplete: being written or cut short)" if incomplete else ""
            raise ReconstructionError(f"the run has no complete checkpoint yet under {ckpt.url}{half}; wait for "
                                      f"its first save (checkpoint.interval_steps={cfg.checkpoint.interval_steps})")
        return complete[-1]
    for info in complete:
        if info.step == step:
            return info
    raise ReconstructionError(f"the run has no complete checkpoint at step {step}; available steps: "
                              f"{available(complete)}", option="step")


def available(complete: list[CheckpointInfo]) -> str:
    return ", ".join(str(c.step) for c in complete) or "none yet"


def load_model(cfg: TrainConfig, step: int | None = None) -> tuple[MaskedAutoencoderViT, CheckpointInfo]:
    """The run's model with a checkpoint's weights, unsharded, on the CPU, in eval mode."""
    info = find_checkpoint(cfg, step)
    saved = info.meta.get("fingerprint")
    if saved is not None and saved != cfg.fingerprint():
        raise ReconstructionError(f"checkpoint {info.url} was written by a different config (fingerprint {saved} "
                                  f"!= {cfg.fingerprint()}); reconstruct with the config that trained it")
    try:
        return load_weights(info, make_model(cfg)).eval(), info
    except Exception as e:  # noqa: BLE001 - DCP wraps whatever went wrong in a CheckpointException
        complete, _ = Checkpointer(checkpoints_url(cfg), rank=0, world_size=1).scan()
        raise ReconstructionError(f"checkpoint {info.url} could not be read ({type(e).__name__}: {e}); pick another "
                                  f"step: {available([c for c in complete if c.step != info.step])}",
                                  option="step") from e


def check_mask_ratio(strategy: MaskStrategy, mask_ratio: float, num_patches: int) -> None:
    if not 0.0 < mask_ratio < 1.0:
        raise ReconstructionError(f"mask_ratio {mask_ratio} is not between 0 and 1 (exclusive); use e.g. 0.75",
                                  option="mask_ratio")
    if strategy == "grid":
        if mask_ratio != GRID_MASK_RATIO:
            raise ReconstructionError(f"mask_ratio {mask_ratio} has no effect with mask_strategy grid, which always "
                                      f"removes {GRID_MASK_RATIO:.0%} (one patch kept per 2x2 cell); use "
                                      f"{GRID_MASK_RATIO} or leave it at the run's own", option="mask_ratio")
        return
    visible = num_visible(num_patches, mask_ratio)
    if not 0 < visible < num_patches:
        raise ReconstructionError(f"mask_ratio {mask_ratio} leaves {visible} of {num_patches} patches visible; "
                                  "pick a ratio that removes some patches and keeps some", option="mask_ratio")


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, images: torch.Tensor, mask_ratio: float, seed: int,
                mean: Sequence[float], std: Sequence[float], step: int = -1) -> Reconstructions:
    """Mask ``images`` (normalised, (N, 3, S, S)) with masks drawn from ``seed`` and reconstruct them."""
    check_mask_ratio(model.mask_strategy, mask_ratio, model.num_patches)
    generator = torch.Generator().manual_seed(seed)
    _, pred, mask = model(images, mask_ratio=mask_ratio, generator=generator)
    p, c = model.patch_size, model.in_chans
    # (N, L) -> (N, C, H, W): 1 on every pixel of a removed patch.
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * c).to(images.dtype))
    predicted = model.reconstruct(images, pred.float())
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)

    def shown(x: torch.Tensor) -> torch.Tensor:
        return (x * s + m).clamp(0.0, 1.0)

    return Reconstructions(
        step=step, mask_ratio=mask_ratio, mask=mask, removed=removed[:, :1] > 0.5,
        masked=shown(images * (1 - removed)),
        reconstruction=shown(images * (1 - removed) + predicted * removed),
        prediction=shown(predicted), original=shown(images), inputs=images,
    )


def reconstruct_run(cfg: TrainConfig, images: int, step: int | None = None, mask_ratio: float | None = None,
                    seed: int = 0) -> Reconstructions:
    """Reconstructions of the run's first ``images`` images from its latest checkpoint (or ``step``'s).
    ``mask_ratio`` defaults to the run's own."""
    if images < 1:
        raise ReconstructionError(f"images must be at least 1, not {images}", option="images")
    ratio = cfg.model.mask_ratio if mask_ratio is None else mask_ratio
    model, info = load_model(cfg, step)
    check_mask_ratio(model.mask_strategy, ratio, model.num_patches)
    try:
        batch = first_images(cfg.data, images, cfg.seed)
    except NotEnoughImages as e:
        raise ReconstructionError(f"{e}; ask for fewer images", option="images") from None
    except (OSError, ValueError) as e:
        hint = ""
        if isinstance(cfg.data.url, str) and "://" not in cfg.data.url and not cfg.data.url.startswith("/"):
            hint = " (a relative data.url is read from the current directory: run where the run was submitted)"
        raise ReconstructionError(f"the run's data cannot be read: {e}{hint}") from None
    mean, std = display_stats(cfg.data)
    return reconstruct(model, batch, ratio, seed, mean, std, step=info.step)
