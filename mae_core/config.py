"""TrainConfig: everything one training run needs, typed, loadable from YAML.

The global batch is the invariant: gradient accumulation is derived from it and the world size
at start-up, so the learning rate does not change when a run moves to fewer devices.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mae_core.data.config import DataConfig
from mae_core.schedule import accumulation_steps

# Paper Table 1f; implemented in mae_core.masking. Defined here so configs load without torch.
MaskStrategy = Literal["random", "block", "grid"]
# Grid masking keeps one patch of every 2x2 cell: its ratio is fixed, not chosen by mask_ratio.
GRID_MASK_RATIO = 0.75


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    arch: str = Field(default="mae_vit_tiny_patch4", description="registered model name, see mae_core.model.MODELS")
    mask_ratio: float = Field(default=0.75, gt=0.0, lt=1.0)
    mask_strategy: MaskStrategy = "random"
    norm_pix_loss: bool = True
    decoder_embed_dim: int | None = Field(default=None, gt=0, description="None keeps the arch default")
    decoder_depth: int | None = Field(default=None, ge=0)
    decoder_num_heads: int | None = Field(default=None, gt=0)
    mask_tokens_in_encoder: bool = Field(default=False, description="paper Table 1c baseline, for ablations")

    @model_validator(mode="after")
    def _grid_ratio(self) -> ModelConfig:
        # Refused rather than ignored: a sweep over mask_ratio would train identical runs under different names.
        if self.mask_strategy == "grid" and self.mask_ratio != GRID_MASK_RATIO:
            raise ValueError(f"model.mask_ratio={self.mask_ratio} has no effect with model.mask_strategy=grid, which "
                             f"always removes {GRID_MASK_RATIO:.0%} (one patch kept per 2x2 cell); set "
                             f"model.mask_ratio: {GRID_MASK_RATIO} or use mask_strategy random or block")
        return self


class OptimConfig(_Section):
    epochs: int = Field(default=1, gt=0)
    warmup_epochs: float = Field(default=0.0, ge=0.0)
    blr: float = Field(default=1.5e-4, gt=0.0, description="base lr; lr = blr * global_batch / 256")
    min_lr: float = Field(default=0.0, ge=0.0)
    weight_decay: float = Field(default=0.05, ge=0.0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    global_batch: int = Field(default=64, gt=0, description="images per optimizer step over all devices")


class CheckpointConfig(_Section):
    interval_steps: int | None = Field(default=100, gt=0, description="save every N optimizer steps")
    interval_minutes: float | None = Field(default=None, gt=0, description="also save every N minutes")
    keep_last: int = Field(default=2, gt=0)
    keep_every_epochs: int | None = Field(default=None, gt=0, description="keep one checkpoint every N epochs")
    async_save: bool = False


class ComputeConfig(_Section):
    """How one process computes (``mae_core.distributed.parallelize``); none of it changes the
    numbers except precision."""

    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="bf16: FSDP2 computes with bf16 copies of fp32 parameters, reduces in fp32")
    activation_checkpointing: bool = Field(default=False, description="recompute block activations in backward")
    compile: bool = Field(default=False, description="torch.compile each transformer block")
    threads: int | None = Field(default=None, gt=0, description="torch intra-op threads per process")


class RuntimeConfig(ComputeConfig):
    per_device_batch: int = Field(default=32, gt=0, description="images per device per micro-step")


class MetricsConfig(_Section):
    """How often rank 0 records and uploads training scalars (``mae_core.metrics``). The defaults
    suit a run of ~500k steps over weeks whose run directory is in object storage."""

    log_interval: int = Field(
        default=20, gt=0, description="optimizer steps between metric records; 20 keeps ~25k points (~5 MB) of a "
        "500k-step run, finer than any plot shows. Checkpoint steps and the last step are always recorded")
    flush_s: float = Field(
        default=600.0, gt=0, description="seconds between uploads of new records: each is 3 PUTs (metrics segment, "
        "TensorBoard, progress.json), so 600 s costs 18 requests per run-hour, leaving the runner's polls under "
        "~100 requests per run-hour in all; progress shown by `maestro ls` is this old at most, so keep it well "
        "below the profile's hang_timeout_s. Checkpoints flush too, so a resume never loses records")


class TrainConfig(_Section):
    output: str = Field(default="runs/default", description="fsspec URL: checkpoints/, metrics/, tb/, progress.json")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    metrics: MetricsConfig = MetricsConfig()
    stop_after_step: int | None = Field(
        default=None, gt=0, description="checkpoint and exit at this step; the schedule is unchanged"
    )

    @model_validator(mode="after")
    def _divides(self) -> TrainConfig:
        accumulation_steps(self.optim.global_batch, self.runtime.per_device_batch, world_size=1)
        return self

    def fingerprint(self) -> str:
        """Hash of what determines the numbers a run produces; a resume must match it."""
        # How hard to retry reads and how many bad images to tolerate do not change the numbers;
        # raising them must not stop a run from resuming.
        math_fields = self.model_dump(include={"seed", "model", "data", "optim"},
                                      exclude={"data": {"io_retries", "max_skip_fraction"}})
        math_fields["precision"] = self.runtime.precision
        return hashlib.sha256(json.dumps(math_fields, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
