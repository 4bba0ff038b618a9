"""The experiment spec: one YAML file, typed by pydantic, that expands into one run or a grid.

The model, data, optim and checkpoint sections are the trainer's own config sections
(``mae_core.config``), so a field means the same thing in a spec and in a TrainConfig.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mae_core import storage
from mae_core.config import CheckpointConfig, ModelConfig, OptimConfig, RuntimeConfig, TrainConfig
from mae_core.data import DataConfig
from mae_core.data.config import SYNTHETIC_SAMPLES
from orchestrator.errors import UserError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourcesSpec(RuntimeConfig):
    nodes: int = Field(default=1, gt=0)
    gpus_per_node: int = Field(default=1, gt=0, description="processes per node: GPUs, or CPU shares on CPU")
    img_s_per_device: float | None = Field(
        default=None, gt=0, description="expected training throughput per device, for the GPU-hour estimate"
    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def runtime(self) -> RuntimeConfig:
        return RuntimeConfig(**self.model_dump(include=set(RuntimeConfig.model_fields)))


class StorageSpec(_Section):
    root: str = Field(default="runs", description="fsspec URL of the run registry and checkpoints")


class RequeueSpec(_Section):
    max_preemptions: int | None = Field(default=None, ge=0, description="None: unlimited")
    max_timeouts: int = Field(default=3, ge=0)
    max_failures: int = Field(default=0, ge=0)


class SweepSpec(_Section):
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="cartesian product over dotted fields")
    zip: dict[str, list[Any]] = Field(default_factory=dict, description="paired values over dotted fields")

    @model_validator(mode="after")
    def _shapes(self) -> SweepSpec:
        for key, values in {**self.grid, **self.zip}.items():
            if not values:
                raise ValueError(f"sweep {key!r} has no values; list at least one")
        lengths = {len(v) for v in self.zip.values()}
        if len(lengths) > 1:
            raise ValueError(f"sweep.zip lists have different lengths {sorted(lengths)}; make them equal")
        overlap = set(self.grid) & set(self.zip)
        if overlap:
            raise ValueError(f"sweep field {sorted(overlap)[0]!r} is in both grid and zip; keep it in one")
        return self


class ExperimentSpec(_Section):
    name: str = Field(description="experiment name: letters, digits, '_', '-', '.'")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    resources: ResourcesSpec = ResourcesSpec()
    storage: StorageSpec = StorageSpec()
    checkpoint: CheckpointConfig = CheckpointConfig()
    requeue: RequeueSpec = RequeueSpec()
    cluster: str = Field(default="cluster_configs/local.yaml", description="cluster profile YAML")
    sweep: SweepSpec = SweepSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_PATTERN.match(v):
            raise ValueError(f"{v!r} is not a valid name; use up to 64 letters, digits, '_', '-', '.'")
        return v

    @model_validator(mode="after")
    def _batch_divides(self) -> ExperimentSpec:
        per_round = self.resources.per_device_batch * self.resources.world_size
        if self.optim.global_batch % per_round:
            raise ValueError(
                f"optim.global_batch={self.optim.global_batch} is not divisible by resources.per_device_batch "
                f"({self.resources.per_device_batch}) x {self.resources.world_size} devices (resources.nodes="
                f"{self.resources.nodes} x resources.gpus_per_node={self.resources.gpus_per_node}); "
                f"change the batch sizes or the device count so it divides")
        return self

    def train_config(self, output: str) -> TrainConfig:
        """The trainer's config for this (already swept) spec, writing under ``output``."""
        return TrainConfig(output=output, seed=self.seed, model=self.model, data=self.data, optim=self.optim,
                           checkpoint=self.checkpoint, runtime=self.resources.runtime())


class Derived(BaseModel):
    """Values computed from a spec, shown by ``plan`` so nothing about a run is implicit."""

    world_size: int
    accum_steps: int
    lr: float
    num_samples: int
    steps_per_epoch: int
    warmup_steps: int
    total_steps: int
    gpu_hours: float | None

    @classmethod
    def of(cls, spec: ExperimentSpec) -> Derived:
        r, o = spec.resources, spec.optim
        num_samples = dataset_size(spec.data)
        steps_per_epoch = num_samples // o.global_batch
        if steps_per_epoch == 0:
            raise UserError(f"data has {num_samples} samples, fewer than optim.global_batch={o.global_batch}; "
                            "lower the batch or add data")
        gpu_hours = (o.epochs * num_samples / r.img_s_per_device / 3600) if r.img_s_per_device else None
        return cls(world_size=r.world_size, accum_steps=o.global_batch // (r.per_device_batch * r.world_size),
                   lr=o.lr(), num_samples=num_samples, steps_per_epoch=steps_per_epoch,
                   warmup_steps=round(o.warmup_epochs * steps_per_epoch),
                   total_steps=o.epochs * steps_per_epoch, gpu_hours=gpu_hours)


def dataset_size(data: DataConfig) -> int:
    """Samples per epoch: ``data.num_samples`` when given (or for synthetic data), else the count
    in the dataset's ``manifest.json``."""
    if data.num_samples is not None:
        return data.num_samples
    if data.url is None:
        return SYNTHETIC_SAMPLES
    if not isinstance(data.url, str):
        raise UserError("data.num_samples is required when data.url is a list of shards; set it")
    manifest = storage.join(data.url, "manifest.json")
    try:
        return int(sum(s["samples"] for s in storage.read_json(manifest)["shards"]))
    except Exception as e:  # noqa: BLE001 - any storage or format error means the same to the user
        raise UserError(f"data.num_samples is not set and {manifest} cannot be read ({type(e).__name__}); "
                        "set data.num_samples or build the dataset's manifest") from None


# Loading ----------------------------------------------------------------------------------------

def apply_overrides(raw: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b=value`` items: each replaces the value at its dotted path (parsed as YAML)."""
    out = copy.deepcopy(raw)
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} is not KEY=VALUE; write e.g. --set optim.epochs=800")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key, value)
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{dotted}: {part} is not a section; check the field path")
        node = child
    node[leaf] = value


def validate(raw: Any, source: str) -> ExperimentSpec:
    """Validate a parsed document, turning the first pydantic error into one actionable line."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a spec is a YAML mapping with at least `name:`; got {type(raw).__name__}")
    try:
        return ExperimentSpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{source}: {describe(e.errors()[0], raw)}") from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"spec {path} does not exist; pass the path of a YAML spec, e.g. jobs/quickstart.yaml")\
            from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if overrides:
        raw = apply_overrides(raw if isinstance(raw, dict) else {}, overrides)
    return validate(raw, str(path))


def describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    field = ".".join(p if p.isprintable() else ascii(p) for p in loc)
    if not field:  # whole-spec checks name their fields in the message
        return err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown field{suggest(loc)}"
    if err["type"] == "missing":
        return f"{field}: required field is missing; add it"
    message = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] != "value_error" and not isinstance(err["input"], dict):
        return f"{field}: {message} (got {json.dumps(err['input'], default=str)[:60]})"
    return f"{field}: {message}"


def suggest(loc: list[str]) -> str:
    """' (did you mean X?)' for the closest valid key of the section that rejected ``loc``."""
    model: type[BaseModel] = ExperimentSpec
    for part in loc[:-1]:
        info = model.model_fields.get(part)
        annotation = info.annotation if info else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "; remove it"
        model = annotation
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid fields: {', '.join(model.model_fields)}"


def schema() -> dict[str, Any]:
    return ExperimentSpec.model_json_schema()
