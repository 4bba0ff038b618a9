"""The registry at the scale of a grid: submit writes in batches, `ls` reads in batches, and the
request count per run stays constant, counted at the S3 client."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mae_core import storage
from mae_core.goodput import Goodput
from mae_core.progress import write_progress
from orchestrator import cli, journal
from orchestrator.errors import UserError
from orchestrator.profiles import Profile, load_profile
from orchestrator.registry import INDEX, PACKS, STATES, Registry, RunState
from orchestrator.spec import Derived, ExperimentSpec
from orchestrator.sweep import PlannedRun, expand

REPO = Path(__file__).resolve().parents[1]


def grid(runs: int, name: str = "grid") -> tuple[list[PlannedRun], Profile, dict[str, int]]:
    spec = ExperimentSpec.model_validate({
        "name": name, "model": {"arch": "mae_vit_micro_patch4"}, "data": {"num_samples": 256, "input_size": 32},
        "optim": {"epochs": 1, "global_batch": 32}, "resources": {"gpus_per_node": 1, "per_device_batch": 32},
        "cluster": str(REPO / "cluster_configs/local.yaml"), "sweep": {"grid": {"seed": list(range(runs))}}})
    planned = expand(spec)
    return planned, load_profile(spec.cluster), {r.run_id: Derived.of(r.spec).total_steps for r in planned}


class Requests:
    """S3 API calls made through s3fs, by operation, the prefixes listed, and the most GETs in
    flight at once."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.listed: list[str] = []
        self.in_flight = self.most_in_flight = 0

    def reset(self) -> None:
        self.calls.clear()
        self.listed.clear()
        self.most_in_flight = 0


@pytest.fixture
def requests(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Requests]:
    import s3fs

    seen = Requests()
    call = s3fs.S3FileSystem._call_s3

    async def counted(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        seen.calls[method] += 1
        if method == "list_objects_v2":
            seen.listed.append(kwargs["Prefix"])
        seen.in_flight += 1
        seen.most_in_flight = max(seen.most_in_flight, seen.in_flight)
        try:
            return await call(self, method, *args, **kwargs)
        finally:
            seen.in_flight -= 1

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    yield seen


def test_submit_of_a_grid_writes_one_pack_whatever_its_size(s3_bucket: str, requests: Requests) -> None:
    registry = Registry(f"{s3_bucket}/registry")
    counts = {}
    for size in (10, 40):
        runs, profile, steps = grid(size, name=f"grid{size}")
        requests.reset()
        new = registry.create_many(runs, profile, steps)
        assert [s.run_id for s in new] == [r.run_id for r in runs]
        counts[size] = dict(requests.calls)
    # The journal's intent, the pack (every run's state.json, spec.json, cluster.yaml and
    # events.jsonl), its list of run ids and one change record: four PUTs, then one DELETE of the
    # intent, whatever the grid's size. The existence check before them lists the mirror and the
    # packs: no HEAD or GET per run.
    assert counts[10] == counts[40] and counts[10]["put_object"] == 4 and counts[10]["delete_objects"] == 1
    assert counts[10].keys() == {"put_object", "delete_objects", "list_objects_v2"}
    assert counts[10]["list_objects_v2"] <= 4

    # Another process reads each run's files from the pack: no run has a folder yet.
    runs, profile, steps = grid(40, name="grid40")
    reader = Registry(registry.root)
    assert not storage.filesystem(registry.root)[0].exists(f"{storage.filesystem(registry.root)[1]}/grid40/"
                                                            f"{runs[0].run_id}")
    for run in runs:
        state = reader.state(run.experiment, run.run_id)
        assert state.status == "pending" and state.total_steps == steps[run.run_id] and state.backend == "local"
        assert reader.spec(run.experiment, run.run_id) == run.spec
        assert reader.profile(run.experiment, run.run_id) == profile
        [created] = reader.events(run.experiment, run.run_id)
        assert created["event"] == "created" and created["swept"] == run.swept
    assert {s.run_id for s in reader.runs("grid40")} == set(steps)

    # Resubmitting creates nothing and writes nothing. A process that has not read the pack reads
    # its list of run ids (kilobytes), not the pack.
    requests.reset()
    assert Registry(registry.root).create_many(runs, profile, steps) == []
    assert "put_object" not in requests.calls and requests.calls["get_object"] == 1


def test_a_local_submit_writes_one_pack_and_lists_what_it_holds(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "registry")
    runs, profile, steps = grid(40)
    Registry(root).create_many(runs, profile, steps)
    # The pack and its run ids: two files for the grid, no run folder, no mirror.
    written = sorted(p.relative_to(tmp_path / "registry" / "grid").parts[0] for p in (tmp_path / "registry").rglob("*")
                     if p.is_file())
    assert written == [PACKS, PACKS]
    reader = Registry(root)
    assert {s.run_id: (s.status, s.total_steps) for s in reader.runs("grid")} == \
        {r: ("pending", n) for r, n in steps.items()}
    assert reader.spec("grid", runs[5].run_id) == runs[5].spec
    assert Registry(root).create_many(runs, profile, steps) == []
    assert len([p for p in (tmp_path / "registry").rglob("*") if p.is_file()]) == 2

    # Once every run has been written, a listing reads only the pack's run ids, not the pack.
    writer = Registry(root)
    writer.update_many({f"grid/{r.run_id}": {"status": "queued"} for r in runs[:-1]}, "submitted", {})
    listed = Registry(root)
    read: list[list[str]] = []
    real = Registry._read_packs
    monkeypatch.setattr(Registry, "_read_packs", lambda self, paths: (read.append(paths), real(self, paths))[1])
    assert {s.run_id: s.status for s in listed.runs("grid")} == \
        {**{r.run_id: "queued" for r in runs[:-1]}, runs[-1].run_id: "pending"}
    assert [len(paths) for paths in read] == [0, 1]  # the run ids of the pack; then the pack, for the one left
    writer.update("grid", runs[-1].run_id, status="queued")
    read.clear()
    assert {s.status for s in Registry(root).runs("grid")} == {"queued"}
    assert all(paths == [] for paths in read)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_packed_run_s_first_writes_put_its_whole_files_in_its_folder(tmp_path: Path, request: pytest.FixtureRequest,
                                                                        where: str) -> None:
    # A run's state and events, once written, are read from its folder: its pack is never
    # rewritten, and what it holds stays the start of the run's event log.
    root = str(tmp_path / "registry") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/registry"
    runs, profile, steps = grid(3)
    Registry(root).create_many(runs, profile, steps)
    first, second = runs[0].run_id, runs[1].run_id
    writer = Registry(root)
    writer.update("grid", first, status="running", step=3)
    writer.event(writer.state("grid", first), "started", host="n1")
    writer.update_many({f"grid/{second}": {"status": "queued", "job_ids": ["9"]}}, "submitted", {})
    fs, base = storage.filesystem(root)
    assert fs.exists(f"{base}/grid/{first}/state.json") and fs.exists(f"{base}/grid/{second}/events.jsonl")
    reader = Registry(root)
    assert (reader.state("grid", first).status, reader.state("grid", first).step) == ("running", 3)
    assert [e["event"] for e in reader.events("grid", first)] == ["created", "started"]
    assert [e["event"] for e in reader.events("grid", second)] == ["created", "submitted"]
    assert reader.state("grid", second).job_ids == ["9"]
    assert {s.run_id: s.status for s in reader.runs("grid")} == \
        {first: "running", second: "queued", runs[2].run_id: "pending"}
    with pytest.raises(UserError, match="not in the registry"):
        reader.state("grid", "nope")
    # Once written, a run needs its pack no more: its first state write put its spec and profile
    # in its folder too, so later attempts read none of the pack.
    fs.rm(fs.ls(f"{base}/grid/{PACKS}"))
    for run in runs[:2]:
        reader = Registry(root)
        assert reader.spec("grid", run.run_id) == run.spec and reader.profile("grid", run.run_id) == profile
        assert reader.state("grid", run.run_id).status in ("running", "queued")
        assert reader.events("grid", run.run_id)[0]["event"] == "created"
    with pytest.raises(UserError, match="not in the registry"):
        Registry(root).state("grid", runs[2].run_id)


def test_a_backend_records_a_grid_it_hands_over_in_concurrent_requests(s3_bucket: str, requests: Requests) -> None:
    # What a backend records for runs created before (queued, the job id, a "submitted" event),
    # as a resume does: per run one GET each of state and events (absent from the folder: the
    # pack, which this process wrote, holds them) and one PUT each of state, mirror and events,
    # plus, as this is each run's first write, its spec and profile, several in flight. The specs
    # were just written by this process and are never rewritten: not fetched back.
    registry = Registry(f"{s3_bucket}/registry")
    runs, profile, steps = grid(30)
    new = registry.create_many(runs, profile, steps)
    requests.reset()
    specs = registry.specs(new)
    recorded = registry.update_many({s.key: {"status": "queued", "job_ids": [f"job-{i}"]} for i, s in enumerate(new)},
                                    "submitted", {s.key: {"job_id": f"job-{i}"} for i, s in enumerate(new)})
    # + the change record and its intent, which is then deleted
    assert dict(requests.calls) == {"get_object": 2 * 30, "put_object": 5 * 30 + 2, "delete_objects": 1}
    assert requests.most_in_flight > 1
    assert specs == {f"grid/{r.run_id}": r.spec for r in runs}
    # Another process (a later `resume`) reads them from the grid's pack: a listing of the packs,
    # then a GET of the pack's run ids and one of the pack.
    requests.reset()
    assert Registry(registry.root).specs(new) == specs
    assert dict(requests.calls) == {"list_objects_v2": 1, "get_object": 2}
    # Without a pack (a registry from before packs), each spec is fetched from the run's
    # folder, where the first write put it: concurrently, one GET each.
    fs, base = storage.filesystem(registry.root)
    fs.rm(fs.ls(f"{base}/grid/{PACKS}"))
    requests.reset()
    assert Registry(registry.root).specs(new) == specs
    assert requests.calls["get_object"] == 30 and requests.most_in_flight > 1
    for i, run in enumerate(runs):
        state = registry.state("grid", run.run_id)
        assert state == recorded[state.key] and (state.status, state.job_ids) == ("queued", [f"job-{i}"])
        assert [(e["event"], e.get("job_id")) for e in registry.events("grid", run.run_id)] == \
            [("created", None), ("submitted", f"job-{i}")]
    assert {s.run_id: s.status for s in registry.runs("grid")} == {r.run_id: "queued" for r in runs}

    # Resubmitting forgets cancel requests: one bulk delete, whether a run has one or not.
    for state in new[:3]:
        registry.request_cancel(state)
    requests.reset()
    registry.clear_cancels(new)
    assert dict(requests.calls) == {"delete_objects": 1}
    assert not any(registry.cancel_requested(s) for s in new)

    # Written once, a run is written as any other: its spec and profile are not written again.
    requests.reset()
    registry.update_many({s.key: {"status": "requeued"} for s in new}, "resumed", {})
    assert dict(requests.calls) == {"get_object": 2 * 30, "put_object": 3 * 30 + 2, "delete_objects": 1}


def test_a_submit_writes_each_new_run_once_with_its_job_id(s3_bucket: str, requests: Requests) -> None:
    # `maestro submit` creates the runs and hands them to the backend in one `creating` block:
    # the backend's record (queued, the job id, a "submitted" event) is written with the new
    # runs, in their pack, not as a rewrite of them: nothing is read back.
    registry = Registry(f"{s3_bucket}/registry")
    runs, profile, steps = grid(30)
    requests.reset()
    with registry.creating(runs, profile, steps) as new:
        listings = requests.calls["list_objects_v2"]
        # Nothing written yet: listings of the mirror and the packs (each empty, and then of its parent).
        assert dict(requests.calls) == {"list_objects_v2": listings} and listings <= 4
        assert Registry(registry.root).runs("grid") == []
        requests.reset()
        registry.clear_cancels(new)  # a new run has no cancel request: no request
        registry.update_many({s.key: {"status": "queued", "job_ids": [f"job-{i}"]} for i, s in enumerate(new)},
                             "submitted", {s.key: {"job_id": f"job-{i}"} for i, s in enumerate(new)})
    # The journal's intent, the pack, its list of run ids, one change record; the intent deleted.
    assert dict(requests.calls) == {"put_object": 4, "delete_objects": 1}
    reader = Registry(registry.root)
    for i, run in enumerate(runs):
        state = reader.state("grid", run.run_id)
        assert (state.status, state.job_ids, state.total_steps) == ("queued", [f"job-{i}"], steps[run.run_id])
        assert reader.spec("grid", run.run_id) == run.spec and reader.profile("grid", run.run_id) == profile
        assert [(e["event"], e.get("job_id"), e.get("swept")) for e in reader.events("grid", run.run_id)] == \
            [("created", None, run.swept), ("submitted", f"job-{i}", None)]
    assert {s.run_id: s.status for s in reader.runs("grid")} == {r.run_id: "queued" for r in runs}


def test_runs_a_backend_did_not_record_are_created_pending(tmp_path: Path) -> None:
    # A backend that fails part-way (sbatch refused the second array) loses no run: those it
    # recorded are queued, the others exist as created, and `maestro resume` starts them.
    registry = Registry(str(tmp_path / "registry"))
    runs, profile, steps = grid(4)
    with pytest.raises(RuntimeError, match="sbatch"), registry.creating(runs, profile, steps) as new:
        registry.update_many({s.key: {"status": "queued", "job_ids": ["7"]} for s in new[:2]}, "submitted", {})
        raise RuntimeError("sbatch: error: Batch job submission failed")
    reader = Registry(registry.root)
    assert [(s.run_id, s.status) for s in reader.runs("grid")] == \
        [(r.run_id, "queued" if i < 2 else "pending") for i, r in enumerate(runs)]
    assert [e["event"] for e in reader.events("grid", runs[3].run_id)] == ["created"]
    assert [e["event"] for e in reader.events("grid", runs[0].run_id)] == ["created", "submitted"]
    # Nothing is left to write twice, and submitting again creates nothing: the packs (one for the
    # runs recorded, one for the rest) hold all four, and no run has a folder.
    assert registry.create_many(runs, profile, steps) == []
    assert [p.name for p in (tmp_path / "registry" / "grid").iterdir()] == [PACKS]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_submit_cut_short_before_its_run_ids_creates_nothing_twice(tmp_path: Path, request: pytest.FixtureRequest,
                                                                     where: str) -> None:
    # The pack makes its runs exist; the list of run ids beside it only spares the next submit
    # reading the pack. A submit killed between the two leaves runs that the next one finds.
    root = str(tmp_path / "registry") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/registry"
    runs, profile, steps = grid(3)
    Registry(root).create_many(runs, profile, steps)
    fs, base = storage.filesystem(root)
    [ids] = [p for p in fs.ls(f"{base}/grid/{PACKS}") if p.endswith(".ids")]
    fs.rm(ids)
    assert Registry(root).create_many(runs, profile, steps) == []
    reader = Registry(root)
    assert [s.run_id for s in reader.runs("grid")] == [r.run_id for r in runs]
    assert [e["event"] for e in reader.events("grid", runs[1].run_id)] == ["created"]


def test_ls_on_s3_fetches_changed_states_concurrently_without_a_head_each(s3_bucket: str,
                                                                           requests: Requests) -> None:
    root = f"{s3_bucket}/registry"
    writer = Registry(root)
    # States too long for their records' names to carry them (a failure's long message): a reader
    # fetches each from its mirror.
    for i in range(30):
        writer.write_state(RunState(experiment="grid", run_id=f"r{i:02d}", step=i, message=os.urandom(800).hex()))
    requests.reset()
    assert [s.step for s in Registry(root).runs("grid")] == list(range(30))
    # 30 states and the (absent) index: one GET each, several in flight, no HEAD; listings of
    # the mirror, of the change journal's folders and newest folder, and of the packs (none yet:
    # s3fs lists the parent then, which the packs' anchor spares the next full listing).
    assert requests.calls["get_object"] == 31 and requests.most_in_flight > 1
    assert "head_object" not in requests.calls
    assert sorted(p.split("/", 2)[2] for p in requests.listed) == ["", ".changes/", f".changes/{journal_folder()}/",
                                                                   ".packs/", ".states/"]

    writer.update("grid", "r07", step=700)
    requests.reset()
    assert {s.run_id: s.step for s in Registry(root).runs("grid")}["r07"] == 700
    assert requests.calls["get_object"] == 2  # the index, then the one state that changed
    assert "head_object" not in requests.calls
    # A warm read lists the journal's newest folders, not every run's mirror.
    assert not any(".states" in p for p in requests.listed) and len(requests.listed) <= 3


def journal_folder(offset_ms: int = 0) -> int:
    return (int(time.time() * 1000) + offset_ms) // journal.FOLDER_MS


def test_a_warm_ls_reads_the_change_journal_and_a_full_listing_finds_what_it_missed(
        s3_bucket: str, requests: Requests, monkeypatch: pytest.MonkeyPatch) -> None:
    root = f"{s3_bucket}/registry"
    writer = Registry(root)
    for i in range(5):
        writer.write_state(RunState(experiment="grid", run_id=f"r{i}", step=i))
    Registry(root).runs("grid")  # a full listing: the index and its cursor
    watcher = Registry(root)  # one process that reads again and again, as `watch` does
    assert len(watcher.runs("grid")) == 5

    # Nothing changed: a refresh costs listings of the journal, and no GET (the index is in memory).
    requests.reset()
    assert [s.step for s in watcher.runs("grid")] == list(range(5))
    assert "get_object" not in requests.calls and "put_object" not in requests.calls

    # A record that lands late, stamped a minute before the newest one a reader has seen (a writer
    # whose clock is behind, or a slow PUT), is still read: the reader looks back MARGIN_MS.
    writer.update("grid", "r1", step=100)
    assert watcher.runs("grid")[1].step == 100
    behind = time.time() - 60
    with pytest.MonkeyPatch.context() as clock:
        clock.setattr(journal.time, "time", lambda: behind)
        writer.update("grid", "r2", step=200)
    assert [s.step for s in watcher.runs("grid")] == [0, 100, 200, 3, 4]
    # A new run of a grid, written in one batch record, shows too.
    Registry(root)._commit([RunState(experiment="grid", run_id=f"n{i}") for i in range(2)], {})
    assert len(watcher.runs("grid")) == 7
    # So does a submit of a single run, whose state is in its pack only (an evaluation started
    # when its pre-training run completed): its record carries the state, as a grid's does.
    runs, profile, steps = grid(1)
    Registry(root).create_many(runs, profile, steps)
    assert [s.status for s in watcher.runs("grid") if s.run_id == runs[0].run_id] == ["pending"]

    # A change the journal never heard of (a mirror put by hand, or by a writer of an older
    # version killed before its record) stays unseen, until the full listing a reader makes every
    # FULL_LISTING_S.
    state = writer.state("grid", "r3").model_copy(update={"step": 300})
    storage.write_bytes(storage.join(root, "grid", STATES, "r3.json"), state.model_dump_json().encode())
    assert watcher.runs("grid")[3].step == 3
    monkeypatch.setattr(journal, "FULL_LISTING_S", 0.0)
    requests.reset()
    assert watcher.runs("grid")[3].step == 300
    assert any(".states" in p for p in requests.listed)


class Killed(BaseException):
    """The writer's process dying: nothing after it runs."""


@pytest.mark.parametrize("batch", [False, True], ids=["one run", "a batch"])
def test_a_writer_killed_before_its_record_makes_readers_list_the_mirror_once(
        s3_bucket: str, requests: Requests, monkeypatch: pytest.MonkeyPatch, batch: bool) -> None:
    root = f"{s3_bucket}/registry"
    writer = Registry(root)
    for i in range(5):
        writer.write_state(RunState(experiment="grid", run_id=f"r{i}", step=i))
    fs, base = storage.filesystem(root)
    intents = lambda: [p for p in fs.find(f"{base}/grid/{journal.CHANGES}")  # noqa: E731
                       if f"~{journal.INTENT}" in p.rsplit("/", 1)[-1]]
    assert intents() == []  # each write deleted its intent after its record
    watcher = Registry(root)
    watcher.runs("grid")

    # Killed after its state and mirror, before its record: the intent stays.
    with pytest.MonkeyPatch.context() as kill:
        kill.setattr(journal, "record_files", lambda *a, **k: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            if batch:
                states = [writer.state("grid", r).model_copy(update={"step": 300}) for r in ("r3", "r4")]
                writer._commit(states, {})
            else:
                writer.update("grid", "r3", step=300)
    assert len(intents()) == 1

    # While the write may still be under way, a reader shows what it had, from the journal alone.
    requests.reset()
    assert [s.step for s in watcher.runs("grid")] == [0, 1, 2, 3, 4]
    assert not any(".states" in p for p in requests.listed) and "get_object" not in requests.calls
    # MARGIN_MS on, no record has followed: the writer stopped. The next read lists the mirror,
    # which holds the change, long before the daily full listing.
    later = time.time() + journal.MARGIN_MS / 1000 + 1
    monkeypatch.setattr(journal.time, "time", lambda: later)
    requests.reset()
    assert [s.step for s in watcher.runs("grid")] == [0, 1, 2, 300, 300 if batch else 4]
    assert any(".states" in p for p in requests.listed)
    # Once: the listing covers the intent, which no later read waits for.
    for reader in (watcher, Registry(root)):
        requests.reset()
        assert [s.step for s in reader.runs("grid")] == [0, 1, 2, 300, 300 if batch else 4]
        assert not any(".states" in p for p in requests.listed)


def test_the_first_ls_after_a_grid_is_submitted_reads_its_states_from_one_record(
        s3_bucket: str, requests: Requests) -> None:
    root = f"{s3_bucket}/registry"
    writer = Registry(root)
    writer.write_state(RunState(experiment="grid", run_id="old", step=1))
    Registry(root).runs("grid")  # a full listing: the index and its cursor
    runs, profile, steps = grid(40)
    with writer.creating(runs, profile, steps) as new:
        writer.update_many({s.key: {"status": "queued", "job_ids": [f"job-{i}"]} for i, s in enumerate(new)},
                           "submitted", {})
    requests.reset()
    listed = {s.run_id: s for s in Registry(root).runs("grid")}
    # The index and the submit's batch record: no GET per new run.
    assert requests.calls["get_object"] == 2
    assert {r: listed[r] for r in steps} == {s.run_id: writer.state("grid", s.run_id) for s in new}
    assert [listed[r.run_id].job_ids for r in runs] == [[f"job-{i}"] for i in range(40)]

    # A run the reader knows already is fetched, whatever a batch says: its mirror may hold a
    # later write, by a runner whose clock was behind the batch's writer.
    first, second = new[0], new[1]
    writer.update("grid", first.run_id, status="running", step=5)
    stale = writer.state("grid", second.run_id).model_copy(update={"step": 1})
    behind = time.time() - 60
    with pytest.MonkeyPatch.context() as clock:
        clock.setattr(journal.time, "time", lambda: behind)
        files = journal.record_files(f"{storage.filesystem(root)[1]}/grid",
                                     {first.run_id: writer.state("grid", first.run_id).model_copy(
                                         update={"step": 2}).model_dump_json().encode(),
                                      second.run_id: stale.model_dump_json().encode()})
    storage.filesystem(root)[0].pipe(files)
    requests.reset()
    listed = {s.run_id: s for s in Registry(root).runs("grid")}
    assert (listed[first.run_id].status, listed[first.run_id].step) == ("running", 5)
    assert listed[second.run_id].step == 0
    assert requests.calls["get_object"] == 1 + 1 + 2  # the index, the batch, both runs' mirrors


def test_the_first_ls_of_a_new_grid_reads_its_pack_then_batches_while_they_match(
        s3_bucket: str, requests: Requests) -> None:
    # No index yet: the reader lists the mirror and the packs. A new grid's runs have no mirror
    # yet and take the states their pack holds: one GET for the grid.
    root = f"{s3_bucket}/registry"
    writer = Registry(root)
    runs, profile, steps = grid(40)
    with writer.creating(runs, profile, steps) as new:
        writer.update_many({s.key: {"status": "queued", "job_ids": [f"job-{i}"]} for i, s in enumerate(new)},
                           "submitted", {})
    requests.reset()
    listed = {s.run_id: s for s in Registry(root).runs("grid")}
    assert requests.calls["get_object"] == 2  # the (absent) index and the pack
    assert listed == {s.run_id: writer.state("grid", s.run_id) for s in new}
    assert {s.status for s in listed.values()} == {"queued"}

    # A resume of the grid rewrites every state and mirror, and one batch record carries the new
    # states with each mirror's MD5. Then one run's runner started, without its change record
    # (killed between mirror and record).
    writer.update_many({s.key: {"status": "requeued"} for s in new}, "resumed", {})
    started = writer.state("grid", new[3].run_id).model_copy(update={"status": "running", "step": 7})
    storage.write_bytes(storage.join(root, "grid", STATES, f"{new[3].run_id}.json"), started.model_dump_json().encode())
    storage.remove(storage.join(root, "grid", INDEX))
    requests.reset()
    listed = {s.run_id: s for s in Registry(root).runs("grid")}
    # The (absent) index, the pack, the two batch records (the submit's, the resume's), and the
    # one mirror that no longer matches its batch: a state a batch carries is the mirror's own
    # while the mirror's ETag is its MD5, i.e. nobody rewrote the mirror since.
    assert requests.calls["get_object"] == 5
    assert (listed[new[3].run_id].status, listed[new[3].run_id].step) == ("running", 7)
    assert {r: s for r, s in listed.items() if r != new[3].run_id} == \
        {s.run_id: writer.state("grid", s.run_id) for s in new if s.run_id != new[3].run_id}
    assert {s.status for r, s in listed.items() if r != new[3].run_id} == {"requeued"}
    # The index written now holds the mirrors' versions and the packs it applied: the next full
    # listing fetches no state and no pack.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(journal, "FULL_LISTING_S", 0.0)
        requests.reset()
        assert len(Registry(root).runs("grid")) == 40
    assert any(".states" in p for p in requests.listed) and requests.calls["get_object"] == 1


def test_runners_writes_are_read_from_their_records_names_in_the_order_of_their_write_numbers(
        s3_bucket: str, requests: Requests) -> None:
    root = f"{s3_bucket}/registry"
    writer = Registry(root)
    for i in range(20):
        writer.write_state(RunState(experiment="grid", run_id=f"r{i:02d}", status="running", step=i))

    # A reader without an index lists the mirror, and takes each state from its record's name
    # while the mirror's ETag is that state's MD5: only the (absent) index is fetched.
    written = {f"r{i:02d}": writer.state("grid", f"r{i:02d}") for i in range(20)}
    requests.reset()
    assert {s.run_id: s for s in Registry(root).runs("grid")} == written
    assert requests.calls["get_object"] == 1

    # A warm reader (`watch`) after every runner wrote again: no GET at all.
    watcher = Registry(root)
    watcher.runs("grid")
    written = {f"r{i:02d}": writer.update("grid", f"r{i:02d}", step=100 + i) for i in range(20)}
    requests.reset()
    assert {s.run_id: s for s in watcher.runs("grid")} == written
    assert "get_object" not in requests.calls

    # A run's later write, by a writer whose clock is a minute behind, sorts first by name: its
    # write number says it is the newer, and it is taken without a GET.
    writer.update("grid", "r01", step=1000)
    behind = time.time() - 60
    with pytest.MonkeyPatch.context() as clock:
        clock.setattr(journal.time, "time", lambda: behind)
        writer.update("grid", "r01", step=1001)
    requests.reset()
    assert [s.step for s in watcher.runs("grid") if s.run_id == "r01"] == [1001]
    assert "get_object" not in requests.calls

    # Lost updates: a writer that wrote from a state another had replaced numbers its write like
    # that one, and its write landed last. The highest number (2000) is not the mirror's state:
    # the reader fetches the mirror, in the same refresh and in a later one.
    for run_id, known in (("r02", False), ("r03", True)):
        based = writer.state("grid", run_id)
        writer.write_state(based.model_copy(update={"step": 1999}))
        writer.update("grid", run_id, step=2000)
        if known:
            assert [s.step for s in watcher.runs("grid") if s.run_id == run_id] == [2000]
        writer.write_state(based.model_copy(update={"step": 3000}))
        requests.reset()
        assert [s.step for s in watcher.runs("grid") if s.run_id == run_id] == [3000]
        assert requests.calls["get_object"] == 1

    # A record whose name carries what this reader cannot decode is fetched.
    state = writer.update("grid", "r04", step=4000)
    fs, base = storage.filesystem(root)
    ms = int(time.time() * 1000)
    storage.write_bytes(storage.join(root, "grid", STATES, "r04.json"),
                        state.model_copy(update={"step": 4001, "seq": state.seq + 1}).model_dump_json().encode())
    fs.pipe({f"{base}/grid/{journal.CHANGES}/{ms // journal.FOLDER_MS}/{ms:013d}-r04~1notdeflate": b""})
    requests.reset()
    assert [s.step for s in watcher.runs("grid") if s.run_id == "r04"] == [4001]
    assert requests.calls["get_object"] == 1

    # The hourly full listing finds every state this reader took from the journal, or fetched
    # since, as the mirror now holds it: the index kept their ETags, and no state is fetched, even
    # when no recent record still carries it (an hour on, the newest records are others').
    fs.rm(f"{base}/grid/{journal.CHANGES}", recursive=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(journal, "FULL_LISTING_S", 0.0)
        requests.reset()
        assert len(watcher.runs("grid")) == 20
    assert any(".states" in p for p in requests.listed) and "get_object" not in requests.calls


def test_the_first_ls_after_hours_away_reads_the_journal_and_after_a_day_older_records_not_the_states(
        s3_bucket: str, requests: Requests) -> None:
    root = f"{s3_bucket}/registry"
    writer = Registry(root)
    now = time.time()
    with pytest.MonkeyPatch.context() as clock:
        # Three hours ago: 20 runs written and listed (the index in the bucket, its full listing
        # then). Two hours ago: every runner wrote again. Now: one write by another run, so the
        # newest records are recent and those of two hours ago are in older folders.
        clock.setattr(journal.time, "time", lambda: now - 3 * 3600)
        for i in range(20):
            writer.write_state(RunState(experiment="grid", run_id=f"r{i:02d}", status="queued"))
        Registry(root).runs("grid")
        clock.setattr(journal.time, "time", lambda: now - 2 * 3600)
        written = {f"r{i:02d}": writer.update("grid", f"r{i:02d}", status="running", step=i) for i in range(20)}
    writer.write_state(RunState(experiment="grid", run_id="late", step=1))
    written["late"] = writer.state("grid", "late")

    # The index was read three hours ago: the reader reads the journal's folders since then, not
    # the mirror, and takes each changed state from the records.
    older = f"{journal.CHANGES}/{journal_folder(-2 * 3600 * 1000)}"
    fs, base = storage.filesystem(root)
    index = fs.cat_file(f"{base}/grid/{INDEX}")
    requests.reset()
    assert {s.run_id: s for s in Registry(root).runs("grid")} == written
    assert requests.calls["get_object"] == 1  # the index
    assert any(p.rstrip("/").endswith(older) for p in requests.listed)
    assert not any(".states" in p for p in requests.listed)

    # A day after the index's full listing (here an hour, made shorter), a reader makes another:
    # it lists the mirror and takes each changed state from the older folder's records, while
    # their MD5s match the listed ETags.
    fs.pipe_file(f"{base}/grid/{INDEX}", index)
    with pytest.MonkeyPatch.context() as clock:
        clock.setattr(journal, "FULL_LISTING_S", 3600.0)
        requests.reset()
        assert {s.run_id: s for s in Registry(root).runs("grid")} == written
    assert requests.calls["get_object"] == 1  # the index
    assert any(p.rstrip("/").endswith(older) for p in requests.listed)
    assert any(".states" in p for p in requests.listed)

    # A state that no record carries (put by hand, or by a writer of an older version killed
    # before its record): older folders are listed only while they cost less than the GETs left,
    # here one folder for one GET.
    state = writer.state("grid", "r05").model_copy(update={"step": 500})
    storage.write_bytes(storage.join(root, "grid", STATES, "r05.json"), state.model_dump_json().encode())
    with pytest.MonkeyPatch.context() as clock:
        clock.setattr(journal, "FULL_LISTING_S", 0.0)
        for i in range(3):  # more older folders (three to five hours old), one record each
            ms = int((now - (3 + i) * 3600) * 1000)
            fs.pipe({f"{base}/grid/{journal.CHANGES}/{ms // journal.FOLDER_MS}/{ms:013d}-r{i:02d}": b""})
        requests.reset()
        assert [s.step for s in Registry(root).runs("grid") if s.run_id == "r05"] == [500]
    assert requests.calls["get_object"] == 2  # the index and r05's mirror
    journal_folders = [p for p in requests.listed if f"/{journal.CHANGES}/" in p.rstrip("/") + "/"
                       and p.rstrip("/").rsplit("/", 1)[-1].isdigit()]
    assert len(journal_folders) <= 2, journal_folders  # the recent folder, and one older


def test_a_state_too_long_for_a_name_goes_in_a_record_without_it(s3_bucket: str) -> None:
    root = f"{s3_bucket}/registry"
    _, base = storage.filesystem(root)
    short = RunState(experiment="grid", run_id="r0", seq=1).model_dump_json().encode()
    long = RunState(experiment="grid", run_id="r0", seq=1, message=os.urandom(800).hex()).model_dump_json().encode()
    [carrying] = journal.record_files(f"{base}/grid", {"r0": short})
    [plain] = journal.record_files(f"{base}/grid", {"r0": long})
    assert len(carrying.encode()) <= journal.MAX_PATH and "~" in carrying.rsplit("/", 1)[-1]
    assert plain.rsplit("/", 1)[-1].endswith("-r0")


def test_a_batch_record_of_run_ids_alone_still_names_its_runs(s3_bucket: str) -> None:
    # Batch records written before they carried states are lists of run ids.
    root = f"{s3_bucket}/registry"
    writer = Registry(root)
    writer.write_state(RunState(experiment="grid", run_id="r0"))
    reader = Registry(root)
    reader.runs("grid")
    fs, base = storage.filesystem(root)
    storage.write_bytes(storage.join(root, "grid", STATES, "r0.json"),
                        RunState(experiment="grid", run_id="r0", step=9).model_dump_json().encode())
    ms = int(time.time() * 1000)
    fs.pipe({f"{base}/grid/{journal.CHANGES}/{ms // journal.FOLDER_MS}/{ms:013d}~oldformat": b'["r0"]'})
    assert [s.step for s in reader.runs("grid")] == [9]


def test_states_read_from_the_index_equal_those_written(s3_bucket: str, requests: Requests) -> None:
    # The index leaves out fields at their defaults; what a warm reader gets back is every field.
    root = f"{s3_bucket}/registry"
    writer = Registry(root)
    writer.write_state(RunState(experiment="grid", run_id="plain"))
    writer.write_state(RunState(experiment="grid", run_id="full", swept={"mask_ratio": 0.9, "seed": 3},
                                status="failed", backend="slurm", job_ids=["12", "13"], step=7, total_steps=9,
                                loss=0.5, img_s=None, failures=2, message="trainer exited with code 1",
                                goodput=Goodput(allocated_s=5.0, productive_s=4.0), pid=0, started=0.0))
    written = {s.run_id: writer.state("grid", s.run_id) for s in writer.runs("grid")}
    requests.reset()
    assert {s.run_id: s for s in Registry(root).runs("grid")} == written
    assert requests.calls["get_object"] == 1  # the index alone


def test_reading_states_leaves_the_garbage_collector_as_it_was(tmp_path: Path) -> None:
    # Reading pauses Python's collector (it spent most of a large parse walking the new states),
    # and leaves nothing frozen out of its reach (a long `watch` would keep its garbage forever).
    registry = Registry(str(tmp_path / "registry"))
    registry.write_state(RunState(experiment="grid", run_id="r0"))
    assert gc.isenabled()
    registry.runs()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        registry.runs()
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("index", [b"{torn", b'{"a": {"version": 1}}', b'{"runs": {"r0": 3}}',
                                   b'{"runs": {}, "journal": {"ms": "soon"}}'])
def test_a_torn_old_or_foreign_index_only_costs_fetches(s3_bucket: str, index: bytes) -> None:
    root = f"{s3_bucket}/registry"
    for i in range(3):
        Registry(root).write_state(RunState(experiment="grid", run_id=f"r{i}", step=i))
    storage.write_bytes(storage.join(root, "grid", INDEX), index)
    assert [s.step for s in Registry(root).runs("grid")] == [0, 1, 2]
    assert [s.step for s in Registry(root).runs("grid")] == [0, 1, 2]  # from the index the first rewrote


def test_a_warm_read_of_a_quiet_experiment_lists_its_journal_alone(s3_bucket: str, requests: Requests) -> None:
    # Once an experiment's records are deleted (six hours without a change), listing its journal
    # must not come back empty: s3fs answers that by listing the parent, every run's folder.
    root = f"{s3_bucket}/registry"
    for i in range(3):
        Registry(root).write_state(RunState(experiment="grid", run_id=f"r{i}", step=i))
    fs, path = storage.filesystem(storage.join(root, "grid", journal.CHANGES))
    fs.rm(path, recursive=True)
    Registry(root).runs("grid")  # a full listing
    requests.reset()
    assert [s.step for s in Registry(root).runs("grid")] == [0, 1, 2]
    assert [p.split("/", 1)[1] for p in requests.listed] == ["grid/.changes/"]


def test_a_full_listing_deletes_journal_folders_older_than_kept(s3_bucket: str) -> None:
    root = f"{s3_bucket}/registry"
    writer = Registry(root)
    old = time.time() - (journal.KEEP_MS + 2 * journal.FOLDER_MS) / 1000
    with pytest.MonkeyPatch.context() as clock:
        clock.setattr(journal.time, "time", lambda: old)
        writer.write_state(RunState(experiment="grid", run_id="a"))
    writer.write_state(RunState(experiment="grid", run_id="b"))
    folders = lambda: sorted(name for e in storage.listdir(storage.join(root, "grid", journal.CHANGES))  # noqa: E731
                             if (name := e["name"].rsplit("/", 1)[-1]) != journal.ANCHOR)
    assert len(folders()) == 2
    assert {s.run_id for s in Registry(root).runs("grid")} == {"a", "b"}
    assert folders() == [str(journal_folder())]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_progress_overlay_shows_a_running_runs_progress_json(tmp_path: Path, request: pytest.FixtureRequest,
                                                             capsys: pytest.CaptureFixture[str], where: str) -> None:
    root = str(tmp_path / "registry") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/registry"
    registry = Registry(root)
    running = RunState(experiment="grid", run_id="live", status="running", step=5, total_steps=1000, loss=0.9)
    done = RunState(experiment="grid", run_id="done", status="completed", step=1000, total_steps=1000, loss=0.4)
    quiet = RunState(experiment="grid", run_id="quiet", status="running", step=7, total_steps=1000)
    for state in (running, done, quiet):
        registry.write_state(state)
    write_progress(registry.run_url("grid", "live"), 421, loss=0.625, img_s=1234.5)
    # A finished run's last progress record is not newer than what its end recorded.
    write_progress(registry.run_url("grid", "done"), 999, loss=0.5)

    shown = {s.run_id: s for s in registry.with_progress(registry.runs("grid"))}
    live = shown["live"]
    assert (live.step, live.loss, live.img_s) == (421, 0.625, 1234.5)
    assert live.heartbeat is not None and time.time() - live.heartbeat < 60
    assert (shown["done"].step, shown["done"].loss) == (1000, 0.4)
    assert shown["quiet"].step == 7  # no progress.json yet
    assert registry.state("grid", "live").step == 5  # nothing written back

    cli.list_runs("grid", root=root)
    table = capsys.readouterr().out
    assert "421/1000" in table and "1000/1000" in table and "999/1000" not in table


def test_progress_overlay_fetches_only_training_runs(s3_bucket: str, requests: Requests) -> None:
    registry = Registry(f"{s3_bucket}/registry")
    states = [RunState(experiment="grid", run_id=f"r{i}", status="running" if i < 3 else "completed")
              for i in range(10)]
    for state in states:
        write_progress(registry.run_url("grid", state.run_id), 50)
    requests.reset()
    shown = registry.with_progress(states)
    assert [s.step for s in shown] == [50] * 3 + [0] * 7
    assert dict(requests.calls) == {"get_object": 3}


def test_ls_fetches_live_progress_of_the_runs_that_started_last_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Every training run costs `ls` a GET of its progress.json: past LIVE_PROGRESS of them, the
    # newest attempts get theirs, and the rest show their state's step under a note that says so.
    root = str(tmp_path / "registry")
    registry = Registry(root)
    for i in range(5):
        registry.write_state(RunState(experiment="grid", run_id=f"r{i}", status="running", step=i, total_steps=1000,
                                      attempt_started=1000.0 + i))
        write_progress(registry.run_url("grid", f"r{i}"), 500 + i)
    monkeypatch.setattr(cli, "LIVE_PROGRESS", 2)
    cli.list_runs("grid", root=root)
    assert gc.isenabled()  # `ls` keeps the collector off while it lists, and only then
    out = capsys.readouterr().out
    assert "503/1000" in out and "504/1000" in out and "502/1000" not in out
    assert all(f"{i}/1000" in out for i in range(3))
    assert "live progress of the 2 training runs that started last; the other 3 show the step" in out


def test_reader_never_sees_a_torn_file_while_a_grid_is_created(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "registry"))
    runs, profile, steps = grid(150)
    stop = threading.Event()
    seen: list[int] = []
    torn: list[str] = []

    def reader() -> None:
        # The grid's pack is renamed into place whole, so another process sees none of the grid
        # or all of it, each run with its spec.
        while not stop.is_set():
            try:
                states = Registry(registry.root).runs("grid")
                if states:
                    Registry(registry.root).spec("grid", states[-1].run_id)
                seen.append(len(states))
            except (OSError, ValueError, UserError) as e:
                torn.append(repr(e))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        registry.create_many(runs, profile, steps)
        time.sleep(0.2)  # the reader's last pass sees every run
    finally:
        stop.set()
        thread.join()
    assert not torn
    assert set(seen) <= {0, len(steps)} and seen[-1] == len(steps)
