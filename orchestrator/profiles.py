"""Cluster profiles: where runs execute. Written as YAML under cluster_configs/, typed here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from orchestrator.errors import UserError
from orchestrator.secrets import secret_path

# Values that end up on an sbatch line: a conservative character set, no shell metacharacters.
# Every pattern here is used with fullmatch: `$` alone would let a trailing newline through.
SLURM_TOKEN = re.compile(r"[A-Za-z0-9_.,:@%+=/-]{1,128}")
SBATCH_OPTION = re.compile(r"[a-z][a-z0-9-]{0,40}")
RAY_ADDRESS = re.compile(r"https?://[A-Za-z0-9.-]{1,253}(?::[0-9]{1,5})?/?")
COMMAND_PATH = re.compile(r"[A-Za-z0-9_.+/-]{1,256}")
RESOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_:.-]{0,63}")
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
# runtime_env fields maestro passes on as they are; others (conda, container, ...) are the cluster's business.
RUNTIME_ENV_KEYS = frozenset({"env_vars", "working_dir", "py_modules", "pip", "uv", "excludes", "config"})


class _Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, raw: Any) -> Any:
        """Every value, before the fields' own checks: those may quote a bad value, this one must not."""
        where = secret_path(raw, "")
        if where is not None:
            raise ValueError(f"{where} carries a credential; remove it: the nodes use their own (environment or "
                             "instance role), and sbatch scripts and Ray runtime_envs are readable by other users")
        return raw


class LocalProfile(_Profile):
    backend: Literal["local"] = "local"
    max_concurrent_runs: int = Field(default=1, gt=0, description="runs of a grid that execute at once")


class SlurmProfile(_Profile):
    backend: Literal["slurm"] = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = Field(default=8, ge=0)
    cpus_per_task: int = Field(default=10, gt=0)
    mem: str | None = Field(default=None, description="per node, e.g. 480G")
    time_min: int = Field(default=4320, gt=0, description="job time limit in minutes")
    signal_delay_s: int = Field(default=120, gt=0, description="USR2 this long before the time limit")
    array_parallelism: int = Field(default=16, gt=0, description="array tasks (grid runs) running at once")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the job, as written")
    extra_sbatch: dict[str, str] = Field(default_factory=dict, description="more #SBATCH options")
    folder: str = Field(default="~/.cache/maestro/slurm",
                        description="job scripts, pickles and task logs; must be visible from the compute nodes")
    rendezvous: Literal["tcp", "file"] = Field(
        default="tcp", description="tcp: the first node's address and a port derived from the job id; "
        "file: a file in `folder`, where nodes share it and no port should be opened")

    @field_validator("setup")
    @classmethod
    def _lines(cls, v: list[str]) -> list[str]:
        for line in v:
            if "\n" in line or "\r" in line or "\0" in line:
                raise ValueError(f"setup line {line!r} spans several lines; give one command per list item")
        return v

    @field_validator("partition", "account", "qos", "constraint", "mem")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        if v is not None and not SLURM_TOKEN.fullmatch(v):
            raise ValueError(f"{v!r} contains characters not allowed on an sbatch line; "
                             "use letters, digits and _.,:@%+=/-")
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _options(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not SBATCH_OPTION.fullmatch(key) or not SLURM_TOKEN.fullmatch(value):
                raise ValueError(f"option {key}={value!r} is not a plain sbatch option; "
                                 "use lower-case names and values of letters, digits and _.,:@%+=/-")
        return v


class RayProfile(_Profile):
    backend: Literal["ray"] = "ray"
    address: str = Field(description="the cluster's dashboard HTTP address (the Jobs API), e.g. http://head:8265")
    max_concurrent_runs: int = Field(default=4, gt=0, description="runs of the experiment training at once")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0}, description="Ray resources of each training worker; GPU > 0 trains "
        "on GPUs (nccl), else on CPUs (gloo)")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env of every job; no credentials: the nodes' own are used")
    python: str = Field(default="python3", description="interpreter on the cluster's nodes that has maestro installed")
    hang_timeout_s: float = Field(
        default=1800.0, gt=0, description="a run with no new training step for this long is hung: it is stopped "
        "and restarted as a failure; keep it well above start-up plus one checkpoint")
    cancel_grace_s: float = Field(
        default=300.0, gt=0, description="after `maestro cancel`, how long a run may take to checkpoint before "
        "its job is stopped without one")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not RAY_ADDRESS.fullmatch(v):
            raise ValueError(f"{v!r} is not a dashboard HTTP address; write e.g. http://head-node:8265 "
                             "(the Jobs API needs it; 'auto' only works on a cluster node)")
        return v.rstrip("/")

    @field_validator("python")
    @classmethod
    def _python(cls, v: str) -> str:
        if not COMMAND_PATH.fullmatch(v):
            raise ValueError(f"{v!r} is not an interpreter path; use letters, digits and _.+/-")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if not RESOURCE_NAME.fullmatch(name) or amount < 0:
                raise ValueError(f"{name}: {amount} is not a Ray resource amount; use a name such as CPU or GPU "
                                 "and a non-negative number")
        return v

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - RUNTIME_ENV_KEYS)
        if unknown:
            raise ValueError(f"runtime_env key {unknown[0]!r} is not supported; use "
                             f"{', '.join(sorted(RUNTIME_ENV_KEYS))}")
        env_vars = v.get("env_vars", {})
        if not isinstance(env_vars, dict):
            raise ValueError("runtime_env.env_vars must be a mapping of NAME: value")
        for name, value in env_vars.items():
            if not isinstance(name, str) or not ENV_NAME.fullmatch(name) or not isinstance(value, str):
                raise ValueError(f"runtime_env.env_vars: {name!r} must be an upper-case NAME with a string value")
        return v

    @property
    def gpus_per_worker(self) -> float:
        return self.resources_per_worker.get("GPU", 0.0)


Profile = LocalProfile | SlurmProfile | RayProfile
_ADAPTER: TypeAdapter[Profile] = TypeAdapter(Annotated[Profile, Field(discriminator="backend")])


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"cluster profile {path} does not exist; pass one of cluster_configs/*.yaml") from None
    except yaml.YAMLError as e:
        raise UserError(f"cluster profile {path} is not valid YAML ({e}); fix the syntax") from None
    return parse_profile(raw, str(path))


def parse_profile(raw: object, source: str) -> Profile:
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as e:
        err = e.errors()[0]
        # Whole-profile checks (a value_error at the top) name their fields in the message.
        field = ".".join(str(p) for p in err["loc"][1:]) or ("" if err["type"] == "value_error" else "backend")
        message = err["msg"].removeprefix("Value error, ")
        # Nor do messages that name a field inside this one (runtime_env.env_vars: ...) need a prefix.
        raise UserError(f"{source}: {message if message.startswith(field) else f'{field}: {message}'}") from None
