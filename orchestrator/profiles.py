"""Cluster profiles: where runs execute. Written as YAML under cluster_configs/, typed here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from orchestrator.errors import UserError

# Values that end up on an sbatch line: a conservative character set, no shell metacharacters.
SLURM_TOKEN = re.compile(r"^[A-Za-z0-9_.,:@%+=/-]{1,128}$")


class _Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
        if v is not None and not SLURM_TOKEN.match(v):
            raise ValueError(f"{v!r} contains characters not allowed on an sbatch line; "
                             "use letters, digits and _.,:@%+=/-")
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _options(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not re.match(r"^[a-z][a-z0-9-]{0,40}$", key) or not SLURM_TOKEN.match(value):
                raise ValueError(f"option {key}={value!r} is not a plain sbatch option; "
                                 "use lower-case names and values of letters, digits and _.,:@%+=/-")
        return v


class RayProfile(_Profile):
    backend: Literal["ray"] = "ray"
    address: str = Field(default="auto", description="Ray cluster address, e.g. ray://head:10001 or auto")
    runtime_env: dict[str, object] = Field(default_factory=dict)
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    max_concurrent_runs: int = Field(default=4, gt=0)


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
        field = ".".join(str(p) for p in err["loc"][1:]) or "backend"
        raise UserError(f"{source}: {field}: {err['msg'].removeprefix('Value error, ')}") from None
