"""The run registry: the source of truth, kept in object storage so any laptop with bucket access
can read it, and no database or shared filesystem is needed.

    <root>/<experiment>/<run_id>/
        spec.yaml        the fully resolved spec of this run
        cluster.yaml     the cluster profile it was submitted with
        state.json       status, attempts, job ids, progress, timestamps
        events.jsonl     what happened, in order
        cancel           present once a cancel was requested
        metrics.jsonl    tb/    checkpoints/    logs/     (written by the trainer and the runner)
    <root>/<experiment>/.states/<run_id>.json    a copy of each state.json, for listing
    <root>/<experiment>/.index.json              states as last read by `ls`, keyed by version

Every object is replaced whole by one atomic write (``mae_core.storage``), so a reader polling
while a run writes sees the previous version or the next, never a torn one. After a run starts,
its runner is the only writer of ``state.json``; the CLI asks for a cancel through ``cancel``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from mae_core import storage
from orchestrator.errors import UserError
from orchestrator.profiles import Profile, parse_profile
from orchestrator.spec import ExperimentSpec
from orchestrator.sweep import PlannedRun

Status = Literal["pending", "queued", "running", "preempted", "requeued", "completed", "failed", "cancelled"]
ACTIVE: frozenset[str] = frozenset({"pending", "queued", "running", "preempted", "requeued"})
FINISHED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
ROOT_ENV = "MAESTRO_ROOT"
# Per experiment: a copy of every run's state.json in one folder, so a single listing request
# returns every run's version; and a reader-maintained cache of those states keyed by version.
STATES = ".states"
INDEX = ".index.json"
# libyaml where installed: every run has YAML files, and the pure-Python codec dominated
# submitting a 1,000-run grid.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class RunState(BaseModel):
    experiment: str
    run_id: str
    status: Status = "pending"
    backend: str = "local"
    attempts: int = 0
    job_ids: list[str] = Field(default_factory=list)
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    img_s: float | None = None
    last_checkpoint_step: int | None = None
    preemptions: int = 0
    timeouts: int = 0
    failures: int = 0
    message: str | None = None
    created: float = Field(default_factory=time.time)
    started: float | None = None
    updated: float = Field(default_factory=time.time)
    ended: float | None = None
    host: str | None = None
    pid: int | None = None
    heartbeat: float | None = Field(default=None, description="when the training step last advanced")
    hang_timeout_s: float | None = Field(default=None, description="no new step for this long: hung")

    @property
    def hung(self) -> bool:
        return (self.status == "running" and self.heartbeat is not None and self.hang_timeout_s is not None
                and time.time() - self.heartbeat > self.hang_timeout_s)

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.run_id}"


def _version(entry: dict[str, Any]) -> str:
    """What changes whenever an object is rewritten: the ETag on object stores."""
    return str(entry.get("ETag") or entry.get("etag") or f"{entry.get('mtime')}:{entry.get('size')}")


def default_root() -> str:
    return os.environ.get(ROOT_ENV, "runs")


class Registry:
    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def run_url(self, experiment: str, run_id: str) -> str:
        return storage.join(self.root, experiment, run_id)

    def _url(self, experiment: str, run_id: str, name: str) -> str:
        return storage.join(self.run_url(experiment, run_id), name)

    # Creating and reading ----------------------------------------------------------------------
    def create(self, run: PlannedRun, profile: Profile, total_steps: int) -> bool:
        """Record a planned run; False when it already exists (re-submitting never duplicates)."""
        if storage.exists(self._url(run.experiment, run.run_id, "state.json")):
            return False
        for name, model in (("spec.yaml", run.spec), ("cluster.yaml", profile)):
            text = yaml.dump(model.model_dump(mode="json"), Dumper=_DUMPER, sort_keys=False)
            storage.write_bytes(self._url(run.experiment, run.run_id, name), text.encode())
        state = RunState(experiment=run.experiment, run_id=run.run_id, backend=profile.backend,
                         total_steps=total_steps)
        self.write_state(state)
        self.event(state, "created", swept=run.swept)
        return True

    def spec(self, experiment: str, run_id: str) -> ExperimentSpec:
        raw = yaml.load(storage.read_bytes(self._url(experiment, run_id, "spec.yaml")), Loader=_LOADER)
        return ExperimentSpec.model_validate(raw)

    def profile(self, experiment: str, run_id: str) -> Profile:
        raw = yaml.load(storage.read_bytes(self._url(experiment, run_id, "cluster.yaml")), Loader=_LOADER)
        return parse_profile(raw, f"{experiment}/{run_id}/cluster.yaml")

    def state(self, experiment: str, run_id: str) -> RunState:
        try:
            return RunState.model_validate_json(storage.read_bytes(self._url(experiment, run_id, "state.json")))
        except FileNotFoundError:
            raise UserError(f"run {experiment}/{run_id} is not in the registry at {self.root}; "
                            "check `maestro ls` or --root") from None

    def write_state(self, state: RunState) -> None:
        state.updated = time.time()
        data = state.model_dump_json().encode()
        storage.write_bytes(self._url(state.experiment, state.run_id, "state.json"), data)
        storage.write_bytes(storage.join(self._states_url(state.experiment), f"{state.run_id}.json"), data)

    def _states_url(self, experiment: str) -> str:
        return storage.join(self.root, experiment, STATES)

    def update(self, experiment: str, run_id: str, **changes: Any) -> RunState:
        state = self.state(experiment, run_id).model_copy(update=changes)
        self.write_state(state)
        return state

    def experiments(self) -> list[str]:
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in storage.listdir(self.root)
                      if e["type"] == "directory")

    def runs(self, experiment: str | None = None) -> list[RunState]:
        """Every run's state (or one experiment's), oldest first."""
        states: list[RunState] = []
        for exp in [experiment] if experiment else self.experiments():
            states += self._experiment_states(exp)
        return sorted(states, key=lambda s: (s.experiment, s.created, s.run_id))

    def _experiment_states(self, experiment: str) -> list[RunState]:
        """The states of one experiment from its listing mirror: one listing gives every run's
        version, and on object stores only the states that changed since the experiment's index
        was written are fetched; the index is then rewritten for the next reader."""
        fs, _ = storage.filesystem(self.root)
        local = storage.is_local(fs)
        versions = {e["name"].rstrip("/").rsplit("/", 1)[-1].removesuffix(".json"): _version(e)
                    for e in storage.listdir(self._states_url(experiment)) if e["type"] == "file"}
        index_url = storage.join(self.root, experiment, INDEX)
        index: dict[str, Any] = {}
        if not local and storage.exists(index_url):
            try:
                index = storage.read_json(index_url)
            except ValueError:
                index = {}  # a torn or foreign file only costs the fetches below
        stale = [r for r in versions if index.get(r, {}).get("version") != versions[r]]
        if stale:
            _, base = storage.filesystem(self._states_url(experiment))
            # One GET per state: with concurrency above 1, s3fs first sends a HEAD per file to
            # decide on ranged parallel downloads, doubling the requests for tiny objects.
            blobs = fs.cat([f"{base}/{r}.json" for r in stale], on_error="omit", max_concurrency=1)
            for path, blob in blobs.items():
                run_id = path.rsplit("/", 1)[-1].removesuffix(".json")
                index[run_id] = {"version": versions[run_id], "state": json.loads(blob)}
            if not local:
                storage.write_json(index_url, {r: index[r] for r in versions if r in index})
        return [RunState.model_validate(index[r]["state"]) for r in versions if r in index]

    def resolve(self, target: str) -> list[RunState]:
        """``EXPERIMENT``, ``EXPERIMENT/RUN_ID`` or a bare ``RUN_ID`` (unique across experiments)."""
        if "/" in target:
            experiment, run_id = target.split("/", 1)
            return [self.state(experiment, run_id)]
        if target in self.experiments():
            return self.runs(target)
        matches = [s for s in self.runs() if s.run_id == target or s.run_id.startswith(target)]
        if len(matches) == 1:
            return matches
        if not matches:
            raise UserError(f"no experiment or run named {target!r} under {self.root}; see `maestro ls`")
        raise UserError(f"{target!r} matches {len(matches)} runs; use EXPERIMENT/RUN_ID")

    # Events and cancel requests ------------------------------------------------------------------
    def event(self, state: RunState, kind: str, **data: Any) -> None:
        url = self._url(state.experiment, state.run_id, "events.jsonl")
        old = storage.read_bytes(url) if storage.exists(url) else b""
        line = json.dumps({"time": time.time(), "event": kind, "attempt": state.attempts, **data}, default=str)
        storage.write_bytes(url, old + line.encode() + b"\n")

    def events(self, experiment: str, run_id: str) -> list[dict[str, Any]]:
        url = self._url(experiment, run_id, "events.jsonl")
        if not storage.exists(url):
            return []
        return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines()]

    def request_cancel(self, state: RunState) -> None:
        storage.write_bytes(self._url(state.experiment, state.run_id, "cancel"), b"")

    def cancel_requested(self, state: RunState) -> bool:
        return storage.exists(self._url(state.experiment, state.run_id, "cancel"))

    def clear_cancel(self, state: RunState) -> None:
        storage.remove(self._url(state.experiment, state.run_id, "cancel"))

    def record_worker(self, state: RunState, rank: int, info: dict[str, Any]) -> None:
        """Where a rank of the current attempt runs (pids, host): one file per rank, each written
        by its own rank only."""
        storage.write_json(self._url(state.experiment, state.run_id, f"workers/rank-{rank}.json"), info)

    def workers(self, state: RunState) -> dict[int, dict[str, Any]]:
        fs, _ = storage.filesystem(self.root)
        entries = storage.listdir(self._url(state.experiment, state.run_id, "workers"))
        blobs = fs.cat([e["name"] for e in entries if e["type"] == "file"], on_error="omit")
        return {int(p.rsplit("rank-", 1)[1].removesuffix(".json")): json.loads(b) for p, b in blobs.items()}

    def log_url(self, state: RunState, attempt: int, rank: int = 0) -> str:
        name = f"attempt-{attempt}.log" if rank == 0 else f"attempt-{attempt}.rank-{rank}.log"
        return self._url(state.experiment, state.run_id, f"logs/{name}")

    def read_logs(self, state: RunState, attempt: int) -> str:
        """The trainer logs an attempt left in the registry: the first rank's, then any other
        rank's under a header. What every backend's ``logs`` starts from."""
        first = self.log_url(state, attempt)
        prefix = first.removesuffix(".log") + ".rank-"
        others = sorted((e["name"] for e in storage.listdir(first.rsplit("/", 1)[0])
                         if e["name"].rsplit("/", 1)[-1].startswith(prefix.rsplit("/", 1)[-1])),
                        key=lambda name: int(name.rsplit(".rank-", 1)[1].removesuffix(".log")))
        fs, _ = storage.filesystem(first)
        text = storage.read_bytes(first).decode(errors="replace") if storage.exists(first) else ""
        for path in others:
            rank = path.rsplit(".rank-", 1)[1].removesuffix(".log")
            text += f"\n--- rank {rank} ---\n" + fs.cat_file(path).decode(errors="replace")
        return text
