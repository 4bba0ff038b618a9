"""EvalConfig: what one evaluation job (linear probe or fine-tune of a pre-trained encoder) needs.

Loads without torch. The paper's recipe (appendix A.2 fine-tuning, A.3 linear probing, with the
values of the official release's FINETUNE.md per model size) is ``paper_defaults``, which an
experiment spec's ``eval:`` section starts from; a config written by hand states its own values.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from mae_core.config import (
    CheckpointConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    _Section,
)
from mae_core.data.config import EVAL_CROP_SCALE, Augmentation, DataConfig, RandAugmentConfig

EvalJob = Literal["linprobe", "finetune"]
EVAL_JOBS: tuple[str, ...] = ("linprobe", "finetune")


class InitConfig(_Section):
    url: str = Field(description="the pre-training run's output URL; its checkpoints/ hold the encoder")
    step: int | None = Field(
        default=None, ge=0, description="the checkpoint to evaluate; None: the latest complete one; 0: none, a "
        "randomly initialised encoder (the floor a pre-trained encoder must beat)")


class EvalOptimConfig(OptimConfig):
    layer_decay: float = Field(default=0.75, gt=0.0, le=1.0,
                               description="fine-tune: encoder block i learns at lr x layer_decay^(depth - i)")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="linear probe: LARS momentum")


def paper_defaults(job: EvalJob, arch: str) -> dict[str, Any]:
    """The paper's recipe for ``job`` (appendix A.2, A.3) for the encoder's size, as the official
    release runs it: layer decay 0.65 for ViT-B and 0.75 for L/H, drop path 0.1 / 0.2 / 0.3 for
    B / L / H, linear probes of 90 epochs for B and 50 for L/H."""
    huge, large = "huge" in arch, "large" in arch or "huge" in arch
    if job == "linprobe":
        return {"optim": {"epochs": 50 if large else 90, "warmup_epochs": 10, "blr": 0.1, "weight_decay": 0.0,
                          "global_batch": 16384}, "pool": "cls"}
    return {"optim": {"epochs": 50 if large else 100, "warmup_epochs": 5, "blr": 1e-3 if large else 5e-4,
                      "min_lr": 1e-6, "weight_decay": 0.05, "beta2": 0.999, "global_batch": 1024,
                      "layer_decay": 0.75 if large else 0.65},
            "pool": "avg", "drop_path": 0.3 if huge else 0.2 if large else 0.1, "label_smoothing": 0.1,
            "mixup": 0.8, "cutmix": 1.0, "rand_augment": RandAugmentConfig().model_dump(), "random_erase": 0.25}


class EvalConfig(_Section):
    job: EvalJob
    output: str = Field(description="fsspec URL of this job: checkpoints/, metrics/, tb/, progress.json")
    seed: int = 0
    model: ModelConfig = Field(description="the pre-training run's model: architecture and its input size")
    init: InitConfig
    data: DataConfig = Field(description="the labelled training split")
    val: DataConfig = Field(description="the labelled validation split, reported after each epoch")
    num_classes: int | None = Field(default=None, gt=1, description="None: from the training split's manifest")
    optim: EvalOptimConfig = EvalOptimConfig()
    pool: Literal["cls", "avg"] = Field(
        default="cls", description="features: the class token (after the encoder's norm) or the average of the "
        "patch tokens (with its own LayerNorm, the paper's fine-tuning choice)")
    drop_path: float = Field(default=0.0, ge=0.0, lt=1.0, description="fine-tune: stochastic depth of the last block")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    mixup: float = Field(default=0.0, ge=0.0, description="fine-tune: mixup alpha; 0 is off")
    cutmix: float = Field(default=0.0, ge=0.0, description="fine-tune: cutmix alpha; 0 is off")
    rand_augment: RandAugmentConfig | None = Field(
        default=None, description="fine-tune: RandAugment of each training image (the paper's 2 operations at "
        "magnitude 9, spread 0.5); None or layers 0 is off")
    random_erase: float = Field(default=0.0, ge=0.0, le=1.0, description="fine-tune: probability of erasing a "
                                "random box of each training image with noise (the paper's 0.25)")
    crop_scale: tuple[float, float] = Field(
        default=EVAL_CROP_SCALE, description="area range of the random training crops; the official probe and "
        "fine-tune use 0.08-1 (pre-training 0.2-1)")
    val_crop: float = Field(
        default=0.875, gt=0.0, le=1.0, description="side of the validation centre crop as a share of the shorter "
        "side: 0.875 is the paper's resize to 256, then centre-crop 224")
    checkpoint: CheckpointConfig = CheckpointConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    metrics: MetricsConfig = MetricsConfig()
    stop_after_step: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _labelled(self) -> EvalConfig:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale {list(self.crop_scale)} is not an area range: write [low, high] with "
                             "0 < low <= high <= 1")
        if self.job == "linprobe" and (self.drop_path or self.mixup or self.cutmix or self.random_erase
                                       or (self.rand_augment and self.rand_augment.layers)):
            raise ValueError("drop_path, mixup, cutmix, rand_augment and random_erase are fine-tuning settings; a "
                             "linear probe trains its head on frozen features: set them to 0 (or fine-tune)")
        for name in ("data", "val"):
            split: DataConfig = getattr(self, name)
            if split.url is None:
                raise ValueError(f"{name}.url is missing: an evaluation needs a labelled dataset URL (tar shards "
                                 f"with .cls labels or an image folder with class sub-folders)")
        return self

    def augmentation(self) -> Augmentation:
        """What each training image goes through after it is decoded."""
        off = self.rand_augment is None or self.rand_augment.layers == 0
        return Augmentation(crop_scale=self.crop_scale, rand_augment=None if off else self.rand_augment,
                            erase=self.random_erase)

    def fingerprint(self) -> str:
        """Hash of what determines the numbers the job produces; a resume must match it."""
        # Not init.url: a resume loads the job's own checkpoint, and the registry may have moved.
        math_fields = self.model_dump(exclude={"output": True, "checkpoint": True, "metrics": True,
                                               "stop_after_step": True, "runtime": True, "init": {"url"}})
        for split in ("data", "val"):
            for key in ("io_retries", "max_skip_fraction"):
                math_fields[split].pop(key, None)
        math_fields["precision"] = self.runtime.precision
        # Left out while off, so that a job started before these settings existed still resumes.
        for key in ("rand_augment", "random_erase"):
            if not math_fields[key]:
                del math_fields[key]
        return hashlib.sha256(json.dumps(math_fields, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
