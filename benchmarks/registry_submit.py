"""Registry writes of `maestro submit` for a 1,000-run grid (targets: ≤ 2 s to a local folder,
≤ 5 s to S3 on moto).

For each root (a local folder, a bucket on a moto S3 server that the script starts on 127.0.0.1)
it times, each time into a fresh experiment:

- what `maestro submit` writes to the registry: ``expand``, then in one ``Registry.creating``
  block what a backend records as it hands the grid over (the SLURM backend: each run's spec,
  its state queued with its job id, a "submitted" event) through ``Registry.specs`` and
  ``Registry.update_many``, so the new runs are written once, all in one pack. The scheduler
  call itself (one sbatch of a held array) is not timed;
- the sequential path these replaced, kept here only as the baseline: per run, an existence
  check, then spec.yaml, cluster.yaml, state.json and its listing mirror, and the "created" event
  appended to events.jsonl, each a write of its own, one after another; a re-read of each new
  state, as `submit` did; then per run the spec read, ``Registry.update`` and ``Registry.event``.

On S3 it also counts the requests each path sends, by operation, through s3fs.

    python benchmarks/registry_submit.py [--runs 1000] [--repeats 3] [--baseline-repeats 1] [--roots local,s3]
                                         [--local-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml
from common import OtherLoad, counted_requests, start_moto
from rich.console import Console
from rich.table import Table

from mae_core import storage
from orchestrator.profiles import Profile, load_profile
from orchestrator.registry import Registry, RunState
from orchestrator.spec import Derived, ExperimentSpec, load_spec
from orchestrator.sweep import PlannedRun, expand

REPO = Path(__file__).resolve().parents[1]
PROFILE = str(REPO / "cluster_configs/local.yaml")
TARGETS_S = {"local": 2.0, "s3": 5.0}


def grid_spec(name: str, runs: int) -> ExperimentSpec:
    """The paper's ViT-H recipe (a realistic spec.yaml) swept over ``runs`` seeds."""
    return load_spec(str(REPO / "jobs/vit_huge_1600ep.yaml"),
                     [f"name={name}", f"cluster={PROFILE}", f"sweep.grid={{seed: {list(range(runs))}}}"])


def submit_batched(registry: Registry, spec: ExperimentSpec, profile: Profile) -> int:
    """What `maestro submit` does: the new runs are created and, in the same ``creating`` block,
    the backend records each one's job id, so each new run's files are written once."""
    runs = expand(spec)
    with registry.creating(runs, profile, {r.run_id: Derived.of(r.spec).total_steps for r in runs}) as new:
        registry.specs(new)
        registry.update_many({s.key: {"status": "queued", "job_ids": [f"1234_{i}"]} for i, s in enumerate(new)},
                             "submitted", {s.key: {"job_id": f"1234_{i}"} for i, s in enumerate(new)})
    return len(new)


def sequential_create(registry: Registry, run: PlannedRun, profile: Profile, total_steps: int) -> bool:
    """``Registry.create`` as it was before ``create_many``: every storage call in turn."""
    if storage.exists(storage.join(registry.run_url(run.experiment, run.run_id), "state.json")):
        return False
    for name, model in (("spec.yaml", run.spec), ("cluster.yaml", profile)):
        text = yaml.dump(model.model_dump(mode="json"), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                         sort_keys=False)
        storage.write_bytes(storage.join(registry.run_url(run.experiment, run.run_id), name), text.encode())
    state = RunState(experiment=run.experiment, run_id=run.run_id, backend=profile.backend, total_steps=total_steps)
    registry.write_state(state)
    registry.event(state, "created", swept=run.swept)
    return True


def submit_sequential(registry: Registry, spec: ExperimentSpec, profile: Profile) -> int:
    new = []
    for run in expand(spec):
        if sequential_create(registry, run, profile, Derived.of(run.spec).total_steps):
            new.append(registry.state(run.experiment, run.run_id))
    for i, state in enumerate(new):
        spec_yaml = storage.read_bytes(storage.join(registry.run_url(state.experiment, state.run_id), "spec.yaml"))
        ExperimentSpec.model_validate(yaml.load(spec_yaml, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
        state = registry.update(state.experiment, state.run_id, status="queued", job_ids=[f"1234_{i}"])
        registry.event(state, "submitted", job_id=f"1234_{i}")
    return len(new)


def timed_submits(root: str, kind: str, how: str, runs: int, repeats: int,
                  submit: Callable[[Registry, ExperimentSpec, Profile], int]) -> tuple[list[float], Counter[str]]:
    profile = load_profile(PROFILE)
    times: list[float] = []
    calls: Counter[str] = Counter()
    for i in range(repeats):
        spec = grid_spec(f"grid-{how}-{i}", runs)
        with counted_requests() as sent:
            start = time.perf_counter()
            created = submit(Registry(root), spec, profile)
            times.append(time.perf_counter() - start)
        calls += sent
        if created != runs or len(Registry(root).runs(spec.name)) != runs:
            raise RuntimeError(f"{kind} {how}: {created} of {runs} runs created")
    return times, Counter({k: v // repeats for k, v in calls.items()})


def per_operation(calls: Counter[str]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(calls.items())) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed submits of create_many (median)")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="timed submits of the sequential baseline")
    parser.add_argument("--roots", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--local-dir", default=None,
                        help="where the local registry goes (default: the temp dir); e.g. /dev/shm, to tell "
                             "the code's cost from the file system's")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.roots.split(",") if k.strip()]
    if not kinds or set(kinds) - {"local", "s3"}:
        parser.error("--roots takes local, s3 or both")

    console = Console(width=None if sys.stdout.isatty() else 160)
    began = time.perf_counter()
    server = start_moto() if "s3" in kinds else None
    load = OtherLoad([server.pid] if server is not None else [])
    rows = []
    try:
        with tempfile.TemporaryDirectory(dir=args.local_dir) as tmp, load:
            for kind in kinds:
                if kind == "s3":
                    import s3fs

                    s3fs.S3FileSystem().mkdir("maestro-submit")
                root = f"{tmp}/registry" if kind == "local" else "s3://maestro-submit/registry"
                new, new_calls = timed_submits(root, kind, "batched", args.runs, args.repeats, submit_batched)
                old, old_calls = timed_submits(root, kind, "sequential", args.runs, args.baseline_repeats,
                                               submit_sequential)
                ratio = statistics.median(old) / statistics.median(new)
                verdict = "PASS" if statistics.median(new) <= TARGETS_S[kind] else "FAIL"
                rows += [(kind, "creating + update_many (batched)", new, per_operation(new_calls),
                          f"{ratio:.1f}x faster; target ≤ {TARGETS_S[kind]:.0f} s: {verdict}"),
                         (kind, "sequential create + update (old path)", old, per_operation(old_calls), "")]
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)

    table = Table(title=f"Registry writes of `maestro submit`, a {args.runs}-run grid (median)")
    for col in ("root", "what", "median s", "all s", "S3 requests per submit", "ratio"):
        table.add_column(col, justify="right" if col in ("median s", "all s") else "left")
    for kind, what, times, requests, ratio in rows:
        table.add_row(kind, what, f"{statistics.median(times):.2f}", ", ".join(f"{t:.2f}" for t in times), requests,
                      ratio)
    console.print(table)
    console.print(load.footer(began))


if __name__ == "__main__":
    main()
