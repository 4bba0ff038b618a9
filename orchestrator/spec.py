"""The experiment spec: one YAML file, typed by pydantic, that expands into one run or a grid.

The model, data, optim and checkpoint sections are the trainer's own config sections
(``mae_core.config``), so a field means the same thing in a spec and in a TrainConfig.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mae_core.config import (
    CheckpointConfig,
    ComputeConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
)
from mae_core.data import DataConfig, dataset_size
from mae_core.data.config import RandAugmentConfig
from mae_core.evaluate.config import EVAL_JOBS, EvalConfig, EvalJob, paper_defaults
from mae_core.schedule import Schedule, ScheduleError, accumulation_steps
from orchestrator.errors import UserError
from orchestrator.secrets import secret_path

# Used with fullmatch: `$` alone would accept a trailing newline.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourcesSpec(_Section):
    nodes: int = Field(default=1, gt=0)
    gpus_per_node: int = Field(default=1, gt=0, description="processes per node: GPUs, or CPU shares on CPU")
    per_device_batch: int = Field(default=32, gt=0, description="images per device per micro-step")
    img_s_per_device: float | None = Field(
        default=None, gt=0, description="expected training throughput per device, for the GPU-hour estimate"
    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


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


class EvalJobSpec(_Section):
    """One evaluation job of every run; unset fields follow the paper (appendix A.2, A.3)."""

    epochs: int | None = Field(default=None, gt=0)
    warmup_epochs: float | None = Field(default=None, ge=0)
    blr: float | None = Field(default=None, gt=0, description="base lr; lr = blr * global_batch / 256")
    global_batch: int | None = Field(default=None, gt=0)
    per_device_batch: int | None = Field(default=None, gt=0, description="default: the pre-training's")
    weight_decay: float | None = Field(default=None, ge=0)
    layer_decay: float | None = Field(default=None, gt=0, le=1, description="fine-tune only")
    pool: Literal["cls", "avg"] | None = None
    drop_path: float | None = Field(default=None, ge=0, lt=1)
    label_smoothing: float | None = Field(default=None, ge=0, lt=1)
    mixup: float | None = Field(default=None, ge=0)
    cutmix: float | None = Field(default=None, ge=0)
    rand_augment: RandAugmentConfig | None = Field(default=None, description="fine-tune only; {layers: 0} is off")
    random_erase: float | None = Field(default=None, ge=0, le=1, description="fine-tune only")


class EvalSpec(_Section):
    """Evaluations that follow pre-training: each run continues, once it completes, with these
    jobs as runs of their own (``<run_id>.linprobe``, ``<run_id>.finetune``)."""

    val_url: str | list[str] = Field(description="the labelled validation split (shards with .cls, or class folders)")
    train_url: str | list[str] | None = Field(
        default=None, description="the labelled training split; default: the pre-training data.url")
    linprobe: EvalJobSpec | None = None
    finetune: EvalJobSpec | None = None

    def jobs(self) -> list[EvalJob]:
        return [job for job in EVAL_JOBS if getattr(self, job) is not None]  # type: ignore[misc]


class EvaluationOf(_Section):
    """Set by maestro on an evaluation run: which job, of which run of the experiment, from which step."""

    job: EvalJob
    run_id: str
    step: int | None = Field(default=None, ge=0, description="None: the run's latest checkpoint; 0: random init")


class ExperimentSpec(_Section):
    name: str = Field(description="experiment name: letters, digits, '_', '-', '.'")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    resources: ResourcesSpec = ResourcesSpec()
    runtime: ComputeConfig = Field(default_factory=ComputeConfig, description="how each process computes")
    storage: StorageSpec = StorageSpec()
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    requeue: RequeueSpec = RequeueSpec()
    cluster: str = Field(default="cluster_configs/local.yaml", description="cluster profile YAML")
    sweep: SweepSpec = SweepSpec()
    eval: EvalSpec | None = Field(default=None, description="linear probe and/or fine-tune after pre-training")
    evaluation: EvaluationOf | None = Field(default=None, description="set by maestro on evaluation runs")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_PATTERN.fullmatch(v):
            raise ValueError(f"{v!r} is not a valid name; use up to 64 letters, digits, '_', '-', '.'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, raw: Any) -> Any:
        """No credential in any value (data.url, storage.root, sweep values): the spec is stored in
        the registry and shown by `plan`. Judged by value only: field names such as
        model.mask_tokens_in_encoder are not credentials. Before the fields' own checks, which may
        quote a bad value."""
        where = secret_path(raw, "", by_name=False)
        if where is not None:
            raise ValueError(f"{where} carries a credential (a password, token or signed URL); remove it: "
                             "credentials come from the environment (AWS_*), never from a spec")
        return raw

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        """Keys that moved from ``resources`` to ``runtime``: still read, with a deprecation note."""
        resources = raw.get("resources") if isinstance(raw, dict) else None
        if not isinstance(resources, dict) or not set(resources) & set(ComputeConfig.model_fields):
            return raw
        raw, resources = dict(raw), dict(resources)
        runtime = raw.get("runtime")
        runtime = dict(runtime) if isinstance(runtime, dict) else {}
        for key in sorted(set(resources) & set(ComputeConfig.model_fields)):
            warnings.warn(f"resources.{key} is deprecated; write it as runtime.{key}", MaestroDeprecation,
                          stacklevel=2)
            runtime.setdefault(key, resources.pop(key))
        raw["resources"], raw["runtime"] = resources, runtime
        return raw

    @model_validator(mode="after")
    def _batch_divides(self) -> ExperimentSpec:
        r = self.resources
        try:
            accumulation_steps(self.optim.global_batch, r.per_device_batch, r.world_size)
        except ScheduleError:
            raise ValueError(
                f"optim.global_batch={self.optim.global_batch} is not divisible by resources.per_device_batch "
                f"({r.per_device_batch}) x {r.world_size} devices (resources.nodes={r.nodes} x "
                f"resources.gpus_per_node={r.gpus_per_node}); change the batch sizes or the device count so it "
                "divides") from None
        return self

    @model_validator(mode="after")
    def _evaluations(self) -> ExperimentSpec:
        """Each job of ``eval:`` must make a valid evaluation config: said when the spec is read,
        not when pre-training completes."""
        if self.eval is None:
            return self
        if self.eval.train_url is None and self.data.url is None:
            raise ValueError("eval needs a labelled training split: set data.url or eval.train_url")
        runtime = RuntimeConfig(per_device_batch=self.resources.per_device_batch)
        for job in self.eval.jobs():
            try:
                cfg = self.eval_config("runs/x/y", runtime, EvaluationOf(job=job, run_id="y"))
                accumulation_steps(cfg.optim.global_batch, cfg.runtime.per_device_batch, self.resources.world_size)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(map(str, err["loc"][1:] if err["loc"][:1] == ("optim",) else err["loc"]))
                raise ValueError(f"eval.{job}{'.' + where if where else ''}: "
                                 f"{err['msg'].removeprefix('Value error, ')}") from None
            except ScheduleError as e:  # it names optim.global_batch: here, the job's own
                raise ValueError(str(e).replace("optim.", f"eval.{job}.")) from None
        return self

    def train_config(self, output: str) -> TrainConfig | EvalConfig:
        """The trainer's config for this (already swept) spec, writing under ``output``: pre-training,
        or for an evaluation run its job on the encoder of the run next to it in the registry."""
        runtime = RuntimeConfig(**self.runtime.model_dump(), per_device_batch=self.resources.per_device_batch)
        if self.evaluation is None:
            return TrainConfig(output=output, seed=self.seed, model=self.model, data=self.data, optim=self.optim,
                               checkpoint=self.checkpoint, runtime=runtime, metrics=self.metrics)
        return self.eval_config(output, runtime, self.evaluation)

    def eval_config(self, output: str, runtime: RuntimeConfig, of: EvaluationOf) -> EvalConfig:
        """The config of evaluation ``of``: the paper's recipe for it, with what ``eval.<job>`` sets."""
        spec = self.eval
        assert spec is not None, "an evaluation run's spec has its eval section"
        job = getattr(spec, of.job) or EvalJobSpec()
        chosen = job.model_dump(exclude_none=True)
        recipe = paper_defaults(of.job, self.model.arch)
        optim_keys = {"epochs", "warmup_epochs", "blr", "global_batch", "weight_decay", "layer_decay"}
        optim = {**recipe.pop("optim"), **{k: v for k, v in chosen.items() if k in optim_keys}}
        head = {**recipe, **{k: v for k, v in chosen.items() if k not in optim_keys | {"per_device_batch"}}}
        if "per_device_batch" in chosen:
            runtime = runtime.model_copy(update={"per_device_batch": chosen["per_device_batch"]})
        train = self.data.model_copy(update={"url": spec.train_url or self.data.url, "num_samples": None})
        run_url = output.rstrip("/").rsplit("/", 1)[0] + "/" + of.run_id
        return EvalConfig(job=of.job, output=output, seed=self.seed, model=self.model,
                          init={"url": run_url, "step": of.step}, data=train,
                          val=self.data.model_copy(update={"url": spec.val_url, "num_samples": None}),
                          optim=optim, checkpoint=self.checkpoint, runtime=runtime, metrics=self.metrics, **head)


class MaestroDeprecation(FutureWarning):
    """A spec key that still works but has a new name; the CLI prints it as one line."""


class Derived(BaseModel):
    """Values computed from a spec, shown by ``plan`` so nothing about a run is implicit: the
    trainer's own ``Schedule`` at the spec's world size, plus the GPU-hour estimate."""

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
        r, o, data = spec.resources, spec.optim, spec.data
        per_device_batch = r.per_device_batch
        if spec.evaluation is not None:  # an evaluation run: its own data, batch and epochs
            job = spec.eval_config("", RuntimeConfig(per_device_batch=r.per_device_batch), spec.evaluation)
            o, data, per_device_batch = job.optim, job.data, job.runtime.per_device_batch
        try:
            num_samples = dataset_size(data)
        except (OSError, ValueError) as e:
            raise UserError(f"data: {e}") from None
        if num_samples is None:
            raise UserError(f"data.num_samples is not set and {data.url} has no manifest.json to count; "
                            "set data.num_samples or build the dataset with `python -m mae_core.data shard`")
        try:
            sched = Schedule.derive(o, per_device_batch, r.world_size, num_samples)
        except ScheduleError as e:
            raise UserError(str(e)) from None
        gpu_hours = (o.epochs * num_samples / r.img_s_per_device / 3600) if r.img_s_per_device else None
        return cls(world_size=sched.world_size, accum_steps=sched.accum_steps, lr=sched.lr, num_samples=num_samples,
                   steps_per_epoch=sched.steps_per_epoch, warmup_steps=sched.warmup_steps,
                   total_steps=sched.total_steps, gpu_hours=gpu_hours)


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
    # A section's own checks name their fields (model: model.mask_ratio=...): no prefix twice.
    return message if message.startswith(f"{field}.") else f"{field}: {message}"


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
