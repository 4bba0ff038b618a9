"""The run registry: the source of truth, kept in object storage so any laptop with bucket access
can read it, and no database or shared filesystem is needed.

    <root>/<experiment>/<run_id>/
        spec.json        the fully resolved spec of this run (spec.yaml in older registries, still read)
        cluster.yaml     the cluster profile it was submitted with
        state.json       status, attempts, job ids, progress, timestamps
        events.jsonl     what happened, in order
        cancel           present once a cancel was requested
        progress.json    the trainer's newest step, loss, img/s and heartbeat, shown by ls and watch
        attempt.json     which attempt owns the run now (contract.claim_output)
        metrics/    tb/    checkpoints/    logs/     (written by the trainer and the runner)
    <root>/<experiment>/.states/<run_id>.json    a copy of each state.json, for listing
    <root>/<experiment>/.packs/<ms>~<tag>.json   runs created together on an object store, until each is written
    <root>/<experiment>/.index.json              states as last read by `ls`, and its journal cursor
    <root>/<experiment>/.changes/                which runs changed when (object stores; ``journal``)

Every object is replaced whole by one atomic write (``mae_core.storage``), so a reader polling
while a run writes sees the previous version or the next, never a torn one. After a run starts,
its runner is the only writer of ``state.json``; the CLI asks for a cancel through ``cancel``.

On object stores the runs a submit creates are written together in one pack per experiment:
every run's state.json, spec.json, cluster.yaml and events.jsonl in a single object that is never
rewritten, with its list of run ids beside it (``<ms>~<tag>.ids``). A run's file that is not in
its folder is read from its pack; a write of the file puts its whole content in the folder, and a
run's first state write puts its spec and profile there too, so a started run needs its pack no
more. A 1,000-run grid is then three PUTs (pack, ids, change record), not 5,000: at ~5 ms of
client and server CPU per request on moto, those took 23 s of every such submit.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from mae_core import storage
from mae_core.goodput import Goodput
from mae_core.progress import parse_progress, progress_url
from orchestrator import journal
from orchestrator.errors import UserError
from orchestrator.profiles import Profile, parse_profile
from orchestrator.spec import NAME_PATTERN, ExperimentSpec
from orchestrator.sweep import RUN_ID_PATTERN, PlannedRun

Status = Literal["pending", "queued", "running", "cancelling", "preempted", "requeued", "completed", "failed",
                 "cancelled"]
# "cancelling": a cancel was asked of a live attempt, which has not yet checkpointed and left.
ACTIVE: frozenset[str] = frozenset({"pending", "queued", "running", "cancelling", "preempted", "requeued"})
FINISHED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
ROOT_ENV = "MAESTRO_ROOT"
# Per experiment: a copy of every run's state.json in one folder, so a single listing request
# returns every run's version; and a reader-maintained cache of those states keyed by version.
STATES = ".states"
INDEX = ".index.json"
PACKS = ".packs"
# The version, in an index, of a state read from its pack.
PACKED = "pack"
_LOG_NAME = re.compile(r"attempt-(?P<attempt>\d+)(?:\.rank-(?P<rank>\d+))?(?:\.part-(?P<part>\d+))?\.log")
# libyaml where installed: every run has YAML files, and the pure-Python codec dominated
# submitting a 1,000-run grid.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
# Requests in flight at once when many small objects are read or written: enough to hide an
# object store's latency; more only cost the client CPU (on moto, 1,000 GETs all at once took
# 40% longer than in batches).
BATCH = 32
# Local folders written at once: the file system's journal commits concurrent fsyncs together
# (5,000 small files: 5.8 s one after another, 0.6 s from 32 threads).
FSYNC_THREADS = 32
# Records a listing returns in the time of one GET of a state: 1,000 GETs took 2.8 s, a listing
# of 1,000 records with their states 0.4 s (s3fs and moto on one 2-core machine).
KEYS_PER_GET = 7
# Heartbeats a trainer may miss before its run shows as hung (a flush waits for a logged step).
HUNG_FLUSHES = 3
# Statuses in which a trainer may be writing progress.json.
TRAINING: frozenset[str] = frozenset({"running", "cancelling"})


class StaleAttempt(RuntimeError):
    """A write by an attempt that is no longer the run's newest."""


class RunState(BaseModel):
    experiment: str
    run_id: str
    swept: dict[str, Any] = Field(default_factory=dict, description="this run's values of the swept spec fields")
    job: str = Field(default="pretrain", description="pretrain, or the evaluation (linprobe, finetune) this run is")
    evaluates: str | None = Field(default=None, description="an evaluation's pre-training run id")
    status: Status = "pending"
    backend: str = "local"
    devices: int = Field(default=1, description="devices (GPUs or CPU processes) each attempt holds")
    attempts: int = 0
    attempt_started: float | None = Field(default=None, description="when the newest attempt began")
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
    flush_s: float | None = Field(default=None, description="the trainer's heartbeat interval (spec metrics.flush_s)")
    goodput: Goodput = Field(default_factory=Goodput, description="summed over the attempts that ended")
    seq: int = Field(default=0, description="this state's write number: one past the state it was written from. "
                                            "Readers order a run's writes by it, not by writers' clocks (journal)")

    @property
    def hung(self) -> bool:
        """Running, but the trainer's heartbeat stopped: no new step for the profile's hang timeout
        or, without one, for HUNG_FLUSHES metrics flush intervals."""
        limit = self.hang_timeout_s or (HUNG_FLUSHES * self.flush_s if self.flush_s else None)
        # A new attempt is not hung while it starts: the heartbeat may still be its predecessor's.
        last = max(self.heartbeat or 0.0, self.attempt_started or 0.0)
        return self.status == "running" and limit is not None and last > 0 and time.time() - last > limit

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.run_id}"


class _Entry(BaseModel):
    version: str | None = Field(default=None, description="the mirror's version when read (from the journal: "
                                                         "the ETag a plain PUT of it gets)")
    state: RunState


class _Index(BaseModel):
    """An experiment's states as last read, and its change journal's cursor (object stores),
    parsed and validated in one pass by pydantic-core."""
    cursor: journal.Cursor | None = None
    runs: dict[str, _Entry] = Field(default_factory=dict)
    packs: list[str] = Field(default_factory=list, description="the packs whose runs are in ``runs``")

    def dump(self) -> bytes:
        """Without the fields at their defaults: 10 MB instead of 16 for 20,000 runs, which is
        what every reader fetches and parses."""
        return self.model_dump_json(exclude_defaults=True).encode()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a while, as it was before afterwards. Reading
    100,000 states allocates millions of objects, none of them cyclic garbage, and the collector's
    passes over them took two thirds of the parse time (1.4 s of every 20,000-state index, 0.5 s
    without). Once it is back on, it walks what survived a few more times (about 2 s at 100,000
    states), which a one-shot command avoids by keeping it off until its states are dropped."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _version(entry: dict[str, Any]) -> str:
    """What changes whenever an object is rewritten: the ETag on object stores."""
    return str(entry.get("ETag") or entry.get("etag") or f"{entry.get('mtime')}:{entry.get('size')}")


def _take_carried(stale: list[str], versions: dict[str, str], runs: dict[str, _Entry],
                  carried: dict[str, list[journal.Carried]]) -> list[str]:
    """Gives each stale run (its mirror's listed version not the index's) the state of a write
    that records carry and whose MD5 is that version, i.e. exactly the mirror's bytes; returns
    the runs left to fetch."""
    left = []
    for run_id in stale:
        write = next((w for w in carried.get(run_id, []) if versions[run_id] == _etag(w.md5)), None)
        if write is None:
            left.append(run_id)
        else:
            runs[run_id] = _Entry(version=versions[run_id], state=RunState.model_validate(write.state))
    return left


def _etag(md5: str) -> str:
    """The version a listing of S3 gives an object written by one plain PUT: its quoted MD5. An
    index keeps it for states read from the journal, so the daily full listing does not fetch
    them again; on a store whose versions differ, that listing only fetches them."""
    return f'"{md5}"'


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _ids_path(pack: str) -> str:
    """Where a pack's list of run ids is kept, beside it."""
    return f"{pack.removesuffix('.json')}.ids"


def default_root() -> str:
    return os.environ.get(ROOT_ENV, "runs")


def _event_line(state: RunState, kind: str, **data: Any) -> bytes:
    return json.dumps({"time": time.time(), "event": kind, "attempt": state.attempts, **data},
                      default=str).encode() + b"\n"


def _write_durably(folder: str, files: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """Write each file of one folder to a temp file beside it and fsync it; the (temp, target)
    pairs, for the caller to rename once every folder is written."""
    os.makedirs(folder, exist_ok=True)
    renames = []
    for path, data in files:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        renames.append((tmp, path))
    return renames


def progress_fields(record: dict[str, Any] | None) -> dict[str, Any]:
    """The state fields a trainer's progress record (``mae_core.progress``) holds: what ``ls``
    and ``watch`` show of a training run, and what its runner records when the attempt ends."""
    if record is None:
        return {}
    fields = {k: record[k] for k in ("step", "loss", "img_s", "heartbeat")
              if isinstance(record.get(k), int | float) and not isinstance(record[k], bool)}
    # The state records its last checkpoint when an attempt ends; a week-long attempt's own
    # checkpoints show from its progress.
    if isinstance(record.get("checkpoint_step"), int) and not isinstance(record["checkpoint_step"], bool):
        fields["last_checkpoint_step"] = record["checkpoint_step"]
    return fields


class Registry:
    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        # Each experiment's index as this process last left it: `watch` reads the registry every
        # few seconds, and at 100,000 runs the index is megabytes to fetch again.
        self._indexes: dict[str, _Index] = {}
        # The specs of the runs this process created. A run's spec is never rewritten, so the
        # backend handed those runs next need not fetch them back (a GET each on S3).
        self._created_specs: dict[str, ExperimentSpec] = {}
        # Runs being created (``creating``) whose files are not written yet: each state and its
        # spec.json, cluster.yaml and events.jsonl by name, keyed by ``RunState.key``.
        self._unwritten: dict[str, tuple[RunState, dict[str, bytes]]] = {}
        # The packs this process read or wrote (path -> run id -> file name -> bytes), and the run
        # ids of each pack it knows: a pack is never rewritten.
        self._packs: dict[str, dict[str, dict[str, bytes]]] = {}
        self._pack_ids: dict[str, frozenset[str]] = {}
        # Runs whose state this process read from their pack: the first write of each state puts
        # its spec and profile in the run's folder too, so later attempts do not read the pack.
        self._from_pack: set[str] = set()

    def run_url(self, experiment: str, run_id: str) -> str:
        return storage.join(self.root, experiment, run_id)

    def _url(self, experiment: str, run_id: str, name: str) -> str:
        return storage.join(self.run_url(experiment, run_id), name)

    # Creating and reading ----------------------------------------------------------------------
    def create(self, run: PlannedRun, profile: Profile, total_steps: int) -> bool:
        """Record one planned run; False when it already exists."""
        return bool(self.create_many([run], profile, {run.run_id: total_steps}))

    def create_many(self, runs: list[PlannedRun], profile: Profile,
                    total_steps_by_run: dict[str, int]) -> list[RunState]:
        """Record planned runs and return the states of those that were new: re-submitting never
        duplicates."""
        with self.creating(runs, profile, total_steps_by_run) as new:
            return new

    @contextlib.contextmanager
    def creating(self, runs: list[PlannedRun], profile: Profile,
                 total_steps_by_run: dict[str, int]) -> Iterator[list[RunState]]:
        """The states of the planned runs that are new (per experiment, the listing mirror and
        the packs' run ids tell which exist), written when the block ends. A backend handed them inside the
        block records its job ids through ``update_many``, which writes each new run once with
        them instead of creating it and then rewriting its state and events: a submit of 1,000
        runs writes one pack per experiment, and reads none back. Whatever the block did not
        record, even when it raised, is written as created (pending), as a plain create would."""
        existing = {exp: set(self._versions(exp)).union(*self._ids_of(self._pack_paths(exp)).values())
                    for exp in {run.experiment for run in runs}}
        cluster = yaml.dump(profile.model_dump(mode="json"), Dumper=_DUMPER, sort_keys=False).encode()
        _, base = storage.filesystem(self.root)
        new: list[RunState] = []
        for run in runs:
            if run.run_id in existing[run.experiment]:
                continue
            existing[run.experiment].add(run.run_id)
            of = run.spec.evaluation
            state = RunState(experiment=run.experiment, run_id=run.run_id, swept=run.swept,
                             job=of.job if of else "pretrain", evaluates=of.run_id if of else None,
                             backend=profile.backend, devices=run.spec.resources.world_size,
                             flush_s=run.spec.metrics.flush_s,
                             total_steps=total_steps_by_run[run.run_id])
            # JSON, not YAML: PyYAML's representer is pure Python, 30x slower than pydantic's
            # serialiser, and was the largest cost of submitting a 1,000-run grid.
            self._unwritten[state.key] = (state, {
                "spec.json": run.spec.model_dump_json(indent=2).encode(), "cluster.yaml": cluster,
                "events.jsonl": _event_line(state, "created", swept=run.swept)})
            self._created_specs[state.key] = run.spec
            new.append(state)
        try:
            yield new
        finally:
            self._create([self._unwritten.pop(s.key) for s in new if s.key in self._unwritten])

    def _create(self, runs: list[tuple[RunState, dict[str, bytes]]]) -> None:
        """Write new runs, each state with its other files by name, in one pack per experiment,
        on object stores between the journal's intent and its record: a 1,000-run grid is two
        files on local disk (the pack and its run ids), not 5,000 fsync'd ones, and four PUTs and a
        DELETE on object stores."""
        fs, base = storage.filesystem(self.root)
        if not runs:
            return
        by_experiment: dict[str, dict[str, dict[str, bytes]]] = {}
        for state, files in runs:
            state.updated = time.time()
            by_experiment.setdefault(state.experiment, {})[state.run_id] = {
                "state.json": state.model_dump_json().encode(), **files}
        packs = {f"{base}/{exp}/{PACKS}/{int(time.time() * 1000):013d}~{uuid.uuid4().hex[:12]}.json": packed
                 for exp, packed in by_experiment.items()}
        tag = journal.new_tag()
        begun = {} if storage.is_local(fs) else {
            path: blob for exp, packed in by_experiment.items()
            for path, blob in journal.intent_files(f"{base}/{exp}", list(packed), tag, carry=True).items()}
        self._write_many(begun)
        self._write_many({path: json.dumps({run_id: {name: data.decode() for name, data in files.items()}
                                            for run_id, files in packed.items()}).encode()
                          for path, packed in packs.items()})
        # Then each pack's run ids, which a submit reads to tell which runs exist: kilobytes, not
        # the pack's megabytes. A pack whose list was never written is read whole instead.
        self._write_many({_ids_path(path): "\n".join(packed).encode() for path, packed in packs.items()})
        for path, packed in packs.items():
            self._packs[path], self._pack_ids[path] = packed, frozenset(packed)
        if storage.is_local(fs):
            return
        self._write_many({path: blob for exp, packed in by_experiment.items()
                          for path, blob in journal.record_files(
                              f"{base}/{exp}", {r: files["state.json"] for r, files in packed.items()},
                              tag, carry=True).items()})
        journal.end(fs, list(begun))

    def _commit(self, states: list[RunState], files: dict[str, bytes]) -> None:
        """Write ``files`` (paths inside the root's filesystem) and these states, in concurrent
        batches whose order is the rule: on object stores, the journal's intents, so a reader
        learns of a write that stops part-way; the files and each state.json, then the states'
        listing mirrors, which make a run count as created, so a submit cut short leaves no
        half-made run; then the journal's records of the changes, so a reader that sees a record
        finds the mirror it names already written, and the intents are deleted."""
        fs, base = storage.filesystem(self.root)
        mirrors: dict[str, bytes] = {}
        by_experiment: dict[str, dict[str, bytes]] = {}
        for state in states:
            state.updated = time.time()
            state.seq += 1
            data = state.model_dump_json().encode()
            files[f"{base}/{state.key}/state.json"] = data
            mirrors[f"{base}/{state.experiment}/{STATES}/{state.run_id}.json"] = data
            by_experiment.setdefault(state.experiment, {})[state.run_id] = data
        journaled = not storage.is_local(fs) and by_experiment
        tag = journal.new_tag()
        begun = {path: blob for exp, written in by_experiment.items() if journaled
                 for path, blob in journal.intent_files(f"{base}/{exp}", list(written), tag).items()}
        self._write_many(begun)
        self._write_many(files)
        self._write_many(mirrors)
        if journaled:
            self._write_many({path: blob for exp, written in by_experiment.items()
                              for path, blob in journal.record_files(f"{base}/{exp}", written, tag).items()})
            journal.end(fs, list(begun))

    def _write_many(self, files: dict[str, bytes]) -> None:
        """Write many objects (paths inside the root's filesystem) at once, each atomically as
        ``storage.write_bytes`` does: concurrent PUTs on object stores; on local disk every file
        goes to a temp file, the temp files are fsync'd together, then each is renamed over its
        target, so a reader sees no file or a whole one."""
        fs, _ = storage.filesystem(self.root)
        if not storage.is_local(fs):
            fs.pipe(files, batch_size=BATCH)
            return
        by_folder: dict[str, list[tuple[str, bytes]]] = {}
        for path, data in files.items():
            by_folder.setdefault(os.path.dirname(path), []).append((path, data))
        # Creating, writing and fsyncing files release the GIL, and the file system's journal
        # commits concurrent fsyncs together: a folder per task, many at once.
        with ThreadPoolExecutor(FSYNC_THREADS) as pool:
            renames = [pair for pairs in pool.map(_write_durably, by_folder, by_folder.values()) for pair in pairs]
        for tmp, path in renames:
            os.replace(tmp, path)

    def _unpacked(self, key: str) -> dict[str, bytes]:
        """The immutable files of a run whose state was read from its pack (``_from_pack``), to
        write with its first state write; otherwise none."""
        if key not in self._from_pack:
            return {}
        self._from_pack.discard(key)
        experiment, run_id = key.split("/", 1)
        _, base = storage.filesystem(self.root)
        return {f"{base}/{key}/{name}": data for name in ("spec.json", "cluster.yaml")
                if (data := self._packed_file(experiment, run_id, name)) is not None}

    def _pack_paths(self, experiment: str, anchor: bool = False) -> list[str]:
        """The experiment's packs (paths inside the root's filesystem), oldest first, from one
        listing. With ``anchor``, the folder is kept from being empty, as the journal's is, so
        later listings of it do not fall back to every run's folder."""
        fs, base = storage.filesystem(self.root)
        entries = storage.fresh_listing(fs, f"{base}/{experiment}/{PACKS}")
        if anchor and not any(_name(e["name"]) == journal.ANCHOR for e in entries):
            fs.pipe_file(f"{base}/{experiment}/{PACKS}/{journal.ANCHOR}", b"")
        return sorted(e["name"] for e in entries if e["type"] == "file" and e["name"].endswith(".json"))

    def _read_packs(self, paths: list[str]) -> dict[str, dict[str, bytes]]:
        """The runs these packs hold, each with its files by name, from one GET for each pack this
        process has not read. A run in two packs (two submits of one grid that raced) is the
        first one's."""
        for path, blob in self._get_many([p for p in paths if p not in self._packs]).items():
            packed = {run_id: {name: text.encode() for name, text in files.items()}
                      for run_id, files in json.loads(blob).items()}
            self._packs[path], self._pack_ids[path] = packed, frozenset(packed)
        runs: dict[str, dict[str, bytes]] = {}
        for path in reversed(paths):
            runs.update(self._packs.get(path, {}))
        return runs

    def _ids_of(self, paths: list[str]) -> dict[str, frozenset[str]]:
        """The run ids of each of these packs: from its list of ids, or the pack itself."""
        unknown = [p for p in paths if p not in self._pack_ids]
        lists = self._get_many([_ids_path(p) for p in unknown])
        for path in unknown:
            if (ids := lists.get(_ids_path(path))) is not None:
                self._pack_ids[path] = frozenset(ids.decode().split())
        self._read_packs([p for p in unknown if p not in self._pack_ids])
        return {p: self._pack_ids[p] for p in paths if p in self._pack_ids}

    def _packed_file(self, experiment: str, run_id: str, name: str, look: bool = True) -> bytes | None:
        """A run's file as its pack holds it; None when no pack holds the run. Unless ``look`` is
        False, packs this process does not know of yet are looked for (a listing)."""
        _, base = storage.filesystem(self.root)
        folder = f"{base}/{experiment}/{PACKS}/"

        def holding() -> list[str]:
            return sorted(p for p, ids in self._pack_ids.items() if p.startswith(folder) and run_id in ids)[:1]

        paths = holding()
        if not paths and look:
            self._ids_of(self._pack_paths(experiment))
            paths = holding()
        files = self._read_packs(paths).get(run_id)
        return None if files is None else files.get(name)

    def _run_file(self, experiment: str, run_id: str, name: str) -> bytes:
        """One of a run's files (state.json, spec.json, cluster.yaml, events.jsonl): from its folder
        or, until it is written there, from its pack."""
        try:
            return storage.read_bytes(self._url(experiment, run_id, name))
        except FileNotFoundError:
            packed = self._packed_file(experiment, run_id, name)
            if packed is None:
                raise
            if name == "state.json":
                self._from_pack.add(f"{experiment}/{run_id}")
            return packed

    def spec(self, experiment: str, run_id: str) -> ExperimentSpec:
        try:
            return ExperimentSpec.model_validate_json(self._run_file(experiment, run_id, "spec.json"))
        except FileNotFoundError:  # a run submitted before specs were stored as JSON
            raw = yaml.load(storage.read_bytes(self._url(experiment, run_id, "spec.yaml")), Loader=_LOADER)
            return ExperimentSpec.model_validate(raw)

    def profile(self, experiment: str, run_id: str) -> Profile:
        raw = yaml.load(self._run_file(experiment, run_id, "cluster.yaml"), Loader=_LOADER)
        return parse_profile(raw, f"{experiment}/{run_id}/cluster.yaml")

    def state(self, experiment: str, run_id: str) -> RunState:
        try:
            return RunState.model_validate_json(self._run_file(experiment, run_id, "state.json"))
        except FileNotFoundError:
            raise UserError(f"run {experiment}/{run_id} is not in the registry at {self.root}; "
                            "check `maestro ls` or --root") from None

    def write_state(self, state: RunState) -> None:
        self._commit([state], {})

    def _states_url(self, experiment: str) -> str:
        return storage.join(self.root, experiment, STATES)

    def update(self, experiment: str, run_id: str, owner: int | None = None, **changes: Any) -> RunState:
        """Change fields of a run's state. An attempt's own writes pass ``owner`` (its attempt
        number): once a newer attempt has begun, the older one's writes are refused, so a
        straggler can never overwrite what the run's current attempt recorded."""
        current = self.state(experiment, run_id)
        if owner is not None and current.attempts != owner:
            raise StaleAttempt(f"attempt {owner} of {experiment}/{run_id} is stale: attempt {current.attempts} owns "
                               f"the run now; its write of {sorted(changes)} was refused")
        state = current.model_copy(update=changes)
        self._commit([state], self._unpacked(state.key))
        return state

    def update_many(self, changes: dict[str, dict[str, Any]], event: str,
                    details: dict[str, dict[str, Any]]) -> dict[str, RunState]:
        """``update`` then ``event`` for many runs at once, keyed by ``RunState.key``: what a backend
        records when it hands over a grid. Their states and event logs are read concurrently (runs
        still being created are in memory), then every changed file goes out in concurrent
        batches (``_commit``) instead of seven requests per run in turn (a 1,000-run grid on S3
        spent a minute here)."""
        _, base = storage.filesystem(self.root)
        unwritten = {key: self._unwritten.pop(key) for key in changes if key in self._unwritten}
        folders = {key: f"{base}/{key}" for key in changes}
        blobs = self._get_many([f"{folders[key]}/{name}" for key in changes if key not in unwritten
                                for name in ("state.json", "events.jsonl")])
        created: list[tuple[RunState, dict[str, bytes]]] = []
        files: dict[str, bytes] = {}
        updated: dict[str, RunState] = {}
        for key, folder in folders.items():
            experiment, run_id = key.split("/", 1)
            if key in unwritten:
                state, files_of_run = unwritten[key]
                events = files_of_run["events.jsonl"]
            else:
                blob = blobs.get(f"{folder}/state.json")
                if blob is None and (blob := self._packed_file(experiment, run_id, "state.json")) is not None:
                    self._from_pack.add(key)
                    files.update(self._unpacked(key))
                # Without a state anywhere, ``state`` says the run is not in the registry.
                state = RunState.model_validate_json(blob) if blob else self.state(experiment, run_id)
                events = (blobs.get(f"{folder}/events.jsonl")
                          or self._packed_file(experiment, run_id, "events.jsonl") or b"")
            state = state.model_copy(update=changes[key])
            events += _event_line(state, event, **details.get(key, {}))
            if key in unwritten:
                created.append((state, {**unwritten[key][1], "events.jsonl": events}))
            else:
                files[f"{folder}/events.jsonl"] = events
            updated[key] = state
        self._create(created)
        self._commit([state for key, state in updated.items() if key not in unwritten], files)
        return updated

    def specs(self, states: list[RunState]) -> dict[str, ExperimentSpec]:
        """Many runs' specs keyed by ``RunState.key``: those this process created as it wrote them;
        those of packed runs from their packs (a listing of each experiment's packs, a GET per
        pack); the others fetched concurrently, one GET each. A spec is never rewritten."""
        _, base = storage.filesystem(self.root)
        wanted = [s for s in states if s.key not in self._created_specs]
        for experiment in {s.experiment for s in wanted}:
            self._ids_of(self._pack_paths(experiment))
        blobs = {s.key: blob for s in wanted
                 if (blob := self._packed_file(s.experiment, s.run_id, "spec.json", look=False)) is not None}
        paths = {s.key: f"{base}/{s.key}/spec.json" for s in wanted if s.key not in blobs}
        fetched = self._get_many(list(paths.values()))
        blobs.update({key: fetched[path] for key, path in paths.items() if path in fetched})
        return {s.key: self._created_specs[s.key] if s.key in self._created_specs
                else ExperimentSpec.model_validate_json(blobs[s.key]) if s.key in blobs
                else self.spec(s.experiment, s.run_id) for s in states}

    def experiments(self) -> list[str]:
        entries = storage.fresh_listing(*storage.filesystem(self.root))
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def runs(self, experiment: str | None = None) -> list[RunState]:
        """Every run's state (or one experiment's), oldest first. Experiments are read at once: the
        store's answer to one overlaps the parsing of another's index."""
        experiments = [experiment] if experiment else self.experiments()
        with collector_paused(), ThreadPoolExecutor(max(1, min(len(experiments), 8))) as pool:
            states = [s for found in pool.map(self._experiment_states, experiments) for s in found]
        return sorted(states, key=lambda s: (s.experiment, s.created, s.run_id))

    def _versions(self, experiment: str) -> dict[str, str]:
        """Every run of an experiment with the version of its state, from one fresh listing of
        the mirror (one request per 1,000 runs on S3). Temp files of local writes are skipped."""
        return {e["name"].rsplit("/", 1)[-1].removesuffix(".json"): _version(e)
                for e in storage.fresh_listing(*storage.filesystem(self._states_url(experiment)))
                if e["type"] == "file" and e["name"].endswith(".json")}

    def _get_many(self, paths: list[str]) -> dict[str, bytes]:
        """The contents of many small objects (paths inside the root's filesystem) that exist,
        fetched concurrently with one GET each."""
        fs, _ = storage.filesystem(self.root)
        if not paths:
            return {}
        if storage.is_local(fs):
            return fs.cat(paths, on_error="omit")
        # max_concurrency=1: above 1, s3fs sends a HEAD before each GET to decide on ranged
        # downloads, doubling the requests for tiny objects. The files still go concurrently,
        # BATCH at a time.
        return fs.cat(paths, on_error="omit", batch_size=BATCH,
                      **({"max_concurrency": 1} if "s3" in fs.protocol else {}))

    def _experiment_states(self, experiment: str) -> list[RunState]:
        """The states of one experiment. On local disk: every mirror copy, read at once. On object
        stores, from the experiment's index, which holds every state as last read: a reader whose
        index had a full listing within ``journal.FULL_LISTING_S`` takes the states the change
        journal carries since the index's cursor, and fetches those it names alone; otherwise,
        or when a writer stopped between its intent and its record, one listing of the mirror gives
        every run's version and only the states that changed since the index was written are
        fetched. The index is then rewritten for the next reader."""
        fs, base = storage.filesystem(storage.join(self.root, experiment))
        if storage.is_local(fs):
            versions = self._versions(experiment)
            blobs = self._get_many([f"{base}/{STATES}/{r}.json" for r in versions])
            states = {r: RunState.model_validate_json(blobs[path]) for r in versions
                      if (path := f"{base}/{STATES}/{r}.json") in blobs}
            # A run not written since its submit has only its pack's state: only packs holding
            # such runs are read (their run ids say which).
            held = self._ids_of(self._pack_paths(experiment))
            unwritten = [path for path, ids in held.items() if not ids <= versions.keys()]
            for run_id, files in self._read_packs(unwritten).items():
                if run_id not in versions:
                    states[run_id] = RunState.model_validate_json(files["state.json"])
            return list(states.values())
        index = self._indexes.get(experiment) or self._read_index(experiment)
        runs = dict(index.runs)
        packs = index.packs
        news = None
        if index.cursor is not None and time.time() - index.cursor.listed < journal.FULL_LISTING_S:
            news = journal.changes(fs, base, index.cursor)
            if journal.stalled(news[2]):  # its change, if any, is in the mirror alone
                news = None
        if news is not None:
            changed, carried, cursor = news
            # A run's newest write, as its record carries it, needs no GET of its mirror, unless
            # its write numbers say a writer wrote from a replaced state (``journal.newest``).
            for run_id, writes in carried.items():
                known = runs.get(run_id)
                state = None if run_id in changed else journal.newest(writes, known.state.seq if known else None)
                if state is None:
                    changed.add(run_id)
                else:
                    runs[run_id] = _Entry(version=_etag(state.md5), state=RunState.model_validate(state.state))
            fetched = self._get_many([f"{base}/{STATES}/{r}.json" for r in sorted(changed)])
            versions = None
        else:
            # Before the listing: what it misses, the journal names.
            cursor, records, older = journal.start(fs, base)
            versions = self._versions(experiment)
            # A run with no mirror yet has the state its pack holds, which is never rewritten: the
            # index keeps it, and only packs it has not applied yet are read.
            paths = self._pack_paths(experiment, anchor=True)
            packs = [_name(p) for p in paths]
            for run_id, files in self._read_packs([p for p in paths if _name(p) not in index.packs]).items():
                if run_id not in versions:
                    runs[run_id] = _Entry(version=PACKED, state=RunState.model_validate_json(files["state.json"]))
            versions.update({r: PACKED for r, entry in runs.items() if entry.version == PACKED and r not in versions})
            stale = [r for r in versions if r not in runs or runs[r].version != versions[r]]
            # A state a recent record carries is the mirror's own while the mirror's ETag is its
            # MD5 (S3's ETag of a plain PUT): the first listing of a new grid, or of states that
            # runners wrote, needs no GET per run.
            left = _take_carried(stale, versions, runs, journal.read(fs, records)[1] if stale else {})
            # States written before the recent records (the first `ls` after a day away): older
            # folders are read, newest first, while what they may cost stays below the GETs left.
            budget = len(left)
            for folder in older:
                if not left or budget <= 0:
                    break
                listed, carried = journal.read_folder(fs, folder)
                budget -= 1 + listed / KEYS_PER_GET
                left = _take_carried(left, versions, runs, carried)
            fetched = self._get_many([f"{base}/{STATES}/{r}.json" for r in left])
        for path, blob in fetched.items():
            run_id = path.rsplit("/", 1)[-1].removesuffix(".json")
            runs[run_id] = _Entry(version=versions[run_id] if versions else _etag(hashlib.md5(blob).hexdigest()),
                                  state=RunState.model_validate_json(blob))
        if versions is not None:
            runs = {r: runs[r] for r in versions if r in runs}  # runs whose mirror is gone are gone
        new = _Index(cursor=cursor, runs=runs, packs=packs)
        if fetched or cursor != index.cursor or len(runs) != len(index.runs) or new.packs != index.packs:
            fs.pipe_file(f"{base}/{INDEX}", new.dump())
        self._indexes[experiment] = new
        # The index's own objects, not copies (2.5 s at 100,000 runs): callers only read them.
        return [entry.state for entry in runs.values()]

    def _read_index(self, experiment: str) -> _Index:
        """An experiment's index, as the last reader left it; empty when there is none yet or it
        is torn, foreign, or from before the change journal (then it only costs fetches)."""
        try:  # one GET, no HEAD before it; parsed and validated in one pass (pydantic-core)
            return _Index.model_validate_json(storage.read_bytes(storage.join(self.root, experiment, INDEX)))
        except (FileNotFoundError, ValueError):
            return _Index()

    def with_progress(self, states: list[RunState], most: int | None = None) -> list[RunState]:
        """The states as shown to people: a training run's step, loss, img/s and heartbeat from
        its ``progress.json``, which its trainer rewrites on every metrics flush (one concurrent
        GET per training run, none for others), for at most ``most`` training runs, those whose
        attempt started last. Nothing is written back to the registry."""
        fs, _ = storage.filesystem(self.root)
        training = sorted((s for s in states if s.status in TRAINING), key=lambda s: s.attempt_started or 0.0,
                          reverse=True)[:most]
        paths = {s.key: fs._strip_protocol(progress_url(self.run_url(s.experiment, s.run_id))) for s in training}
        if not paths:
            return states
        blobs = self._get_many(list(paths.values()))
        return [s.model_copy(update=progress_fields(parse_progress(blobs.get(paths[s.key])))) if s.key in paths else s
                for s in states]

    @staticmethod
    def check_target(target: str, runs: bool = True) -> str:
        """``target`` if it is ``EXPERIMENT`` or, with ``runs``, ``EXPERIMENT/RUN_ID`` or a bare
        ``RUN_ID`` (prefix); else a UserError. Every part is a whole name, never a path, so nothing
        typed (``../x``, ``/etc``, a trailing newline) reaches storage outside the registry."""
        experiment, slash, run_id = target.partition("/")
        if slash:
            ok = runs and bool(NAME_PATTERN.fullmatch(experiment) and RUN_ID_PATTERN.fullmatch(run_id))
        else:
            ok = bool((RUN_ID_PATTERN if runs else NAME_PATTERN).fullmatch(target))
        if not ok:
            what, shapes = ("a run or experiment", "EXPERIMENT, EXPERIMENT/RUN_ID or RUN_ID") if runs else \
                ("an experiment", "EXPERIMENT")
            raise UserError(f"{target!r} is not {what}; write {shapes} (letters, digits, '_', '-', '.'; "
                            "see `maestro ls`)")
        return target

    def resolve(self, target: str) -> list[RunState]:
        """``EXPERIMENT``, ``EXPERIMENT/RUN_ID`` or a bare ``RUN_ID`` (unique across experiments)."""
        self.check_target(target)
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
    def _event_log(self, experiment: str, run_id: str) -> bytes:
        try:
            return self._run_file(experiment, run_id, "events.jsonl")
        except FileNotFoundError:
            return b""

    def event(self, state: RunState, kind: str, **data: Any) -> None:
        url = self._url(state.experiment, state.run_id, "events.jsonl")
        storage.write_bytes(url, self._event_log(state.experiment, state.run_id) + _event_line(state, kind, **data))

    def events(self, experiment: str, run_id: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._event_log(experiment, run_id).decode().splitlines()]

    def request_cancel(self, state: RunState) -> None:
        storage.write_bytes(self._url(state.experiment, state.run_id, "cancel"), b"")

    def cancel_requested(self, state: RunState) -> bool:
        # A GET that may 404 is one request; s3fs's exists() on a missing key costs a HEAD and a
        # LIST, and every attempt asks this all its life.
        try:
            storage.read_bytes(self._url(state.experiment, state.run_id, "cancel"))
        except FileNotFoundError:
            return False
        return True

    def clear_cancels(self, states: list[RunState]) -> None:
        """Forget the runs' cancel requests, if any: one request per 1,000 runs on object stores
        (a bulk delete, which absent keys do not fail), instead of a check and a delete per run."""
        fs, base = storage.filesystem(self.root)
        # A run still being created has no cancel request to forget.
        paths = [f"{base}/{s.key}/cancel" for s in states if s.key not in self._unwritten]
        if not paths:
            return
        if not storage.is_local(fs):
            fs.rm(paths)
            return
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def record_worker(self, state: RunState, rank: int, info: dict[str, Any]) -> None:
        """Where a rank of the current attempt runs (pids, host): one file per rank, each written
        by its own rank only."""
        storage.write_json(self._url(state.experiment, state.run_id, f"workers/rank-{rank}.json"), info)

    def workers(self, state: RunState) -> dict[int, dict[str, Any]]:
        fs, _ = storage.filesystem(self.root)
        entries = storage.listdir(self._url(state.experiment, state.run_id, "workers"))
        blobs = fs.cat([e["name"] for e in entries if e["type"] == "file"], on_error="omit")
        return {int(p.rsplit("rank-", 1)[1].removesuffix(".json")): json.loads(b) for p, b in blobs.items()}

    def log_url(self, state: RunState, attempt: int, rank: int = 0, part: int = 0) -> str:
        """A rank's trainer log of an attempt, uploaded in parts of bounded size (``runner.LogUpload``)."""
        name = f"attempt-{attempt}" + (f".rank-{rank}" if rank else "") + (f".part-{part}" if part else "")
        return self._url(state.experiment, state.run_id, f"logs/{name}.log")

    def read_logs(self, state: RunState, attempt: int) -> str:
        """The trainer logs an attempt left in the registry: the first rank's, then any other
        rank's under a header, each rank's parts in order. What every backend's ``logs`` starts from."""
        folder = self.log_url(state, attempt).rsplit("/", 1)[0]
        parts: dict[int, list[tuple[int, str]]] = {}
        for entry in storage.listdir(folder):
            found = _LOG_NAME.fullmatch(entry["name"].rsplit("/", 1)[-1])
            if found and int(found["attempt"]) == attempt:
                parts.setdefault(int(found["rank"] or 0), []).append((int(found["part"] or 0), entry["name"]))
        fs, _ = storage.filesystem(folder)
        text = ""
        for rank in sorted(parts):
            body = b"".join(fs.cat_file(path) for _, path in sorted(parts[rank])).decode(errors="replace")
            text += body if rank == 0 else f"\n--- rank {rank} ---\n{body}"
        return text
