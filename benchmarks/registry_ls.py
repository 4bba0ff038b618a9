"""Wall-clock time of `maestro ls` over registries of 1,000, 10,000 and 100,000 runs (targets on
moto S3: 2 s at 1,000 and 15 s at 100,000, cold and warm; cost per run no faster than linear).

`maestro ls` is the command people run most, and the registry lives in object storage, so it must
stay fast as runs pile up. For each size this script builds two registries of N runs spread over a
few experiments, each run's state.json as ``Registry.write_state`` writes it: one in a local
folder, one in a bucket on a moto S3 server that it starts on 127.0.0.1, with every object put
into the server before it starts serving (100,000 PUTs through HTTP would take ~15 min here). For
each it times:

- ``maestro ls --root ROOT`` exactly as a user runs it (a fresh process, Python start-up and
  imports included), its output checked to list every run: **cold**, the first after the states
  were written (on S3 it fetches every state, one GET each), then **warm** (median of several);
- the same command on a registry holding 1 run: the fixed cost of the command, so
  (ls(N) - ls(1)) / N is the cost per run, on this machine, in this run;
- ``Registry(root).runs()`` in-process, warm (what `maestro watch` pays per refresh);
- up to ``--naive-max`` runs, the naive read it replaces, one ``fs.cat_file`` per state.json in turn;
- on S3, the first `ls` after 1,000 runners' writes: just after them; after hours away (written
  two hours ago, the index read three hours ago); after a day away (written 20 hours ago, the
  index's daily full listing due); and after a grid's submit.

Above ``--cold-max`` runs, a cold `ls` on moto would take minutes (each GET costs ~8 ms of CPU on
the two ends), so there the S3 registry starts with the experiment index that a first `ls` leaves,
and only warm `ls` is timed; the script checks that it then fetches no state. Registries above
``--cold-max`` are timed once, local ones included.

    python benchmarks/registry_ls.py [--runs 1000,10000,100000] [--experiments 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

from common import OtherLoad, counted_requests, start_moto
from registry_submit import PROFILE, grid_spec, submit_batched
from rich.console import Console
from rich.table import Table

from mae_core import storage
from orchestrator import journal
from orchestrator.profiles import load_profile
from orchestrator.registry import INDEX, PACKS, STATES, Registry, RunState, _Entry, _Index

TARGETS_S = {1_000: 2.0, 100_000: 15.0}
CHANGED = 1_000
EXPERIMENTS = ["mae-vit-b-1600ep", "mae-vit-l-800ep", "mae-vit-h-1600ep", "mask-ratio-sweep", "decoder-ablation",
               "lr-sweep-vit-l", "norm-pix-ablation", "vit-b-smoke"]
STATUS_WEIGHTS = {"completed": 55, "running": 12, "failed": 8, "cancelled": 5, "queued": 8, "pending": 5,
                  "preempted": 3, "requeued": 4}


def fake_state(rng: random.Random, experiment: str, index: int) -> RunState:
    """A state.json as a real sweep leaves it: swept-value run ids, SLURM job ids, progress, timings."""
    lr, mask = rng.choice(["1.5e-4", "3e-4", "6e-4", "1e-3"]), rng.choice(["0.6", "0.75", "0.85", "0.9"])
    run_id = f"blr-{lr}_mask_ratio-{mask}_seed-{index}-{rng.getrandbits(32):08x}"
    status = rng.choices(list(STATUS_WEIGHTS), weights=list(STATUS_WEIGHTS.values()))[0]
    total = rng.choice([62_500, 125_000, 250_000])
    created = time.time() - rng.uniform(3_600, 60 * 86_400)
    state = RunState(experiment=experiment, run_id=run_id, status=status, backend="slurm", total_steps=total,
                     created=created)
    if status == "pending":
        return state
    attempts = 1 + (rng.random() < 0.3) + (rng.random() < 0.1)
    state.attempts = attempts
    state.job_ids = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(attempts)]
    if status == "queued":
        return state
    state.started = created + rng.uniform(10, 3_600)
    state.step = total if status == "completed" else rng.randint(0, total)
    state.loss = rng.uniform(0.35, 0.9)
    state.img_s = rng.uniform(2_000, 9_000)
    state.last_checkpoint_step = state.step // 5_000 * 5_000 or None
    state.preemptions = attempts - 1
    state.host, state.pid = f"gpu-node-{rng.randint(1, 256):03d}", rng.randint(1_000, 400_000)
    if status in ("completed", "failed", "cancelled"):
        state.ended = state.started + rng.uniform(600, 5 * 86_400)
    if status == "failed":
        state.failures = 1
        state.message = ("trainer exited with code 1: RuntimeError: CUDA error: an illegal memory access was "
                         "encountered (see logs/attempt-1.log)")
    return state


def registry_objects(sizes: list[int], experiments: int, seed: int, naive_max: int, cold_max: int
                     ) -> dict[str, dict[str, bytes]]:
    """Per registry (``n<size>``, and ``one`` with a single run), its objects by key: every
    state's listing mirror, the run's own state.json where the naive read needs it, and above
    ``cold_max`` the experiment indexes that a first `ls` writes."""
    registries: dict[str, dict[str, bytes]] = {}
    for name, runs, exps in [("one", 1, 1), *((f"n{n}", n, experiments) for n in sizes)]:
        rng, objects = random.Random(seed), {}
        indexes: dict[str, dict[str, _Entry]] = {}
        for i in range(runs):
            state = fake_state(rng, EXPERIMENTS[i % exps], i)
            data = state.model_dump_json().encode()
            objects[f"{state.experiment}/{STATES}/{state.run_id}.json"] = data
            if runs <= naive_max:
                objects[f"{state.experiment}/{state.run_id}/state.json"] = data
            # The version a listing reports for a single-part PUT: its ETag, the quoted MD5.
            version = f'"{hashlib.md5(data).hexdigest()}"'
            indexes.setdefault(state.experiment, {})[state.run_id] = _Entry(version=version, state=state)
        for exp in indexes:
            # Packs, as any submit to an object store leaves them (here only the folder's anchor):
            # an experiment without the folder costs its first full listing a listing of every
            # run's folder (s3fs's answer to an empty listing), once, then gets the anchor.
            objects[f"{exp}/{PACKS}/{journal.ANCHOR}"] = b""
        if runs > cold_max:
            # As a full listing leaves it: its journal cursor at "now", so the timed `ls` reads the
            # journal (the server starts within minutes; a full listing is due after an hour).
            cursor = journal.Cursor(ms=int(time.time() * 1000), listed=time.time())
            for exp, index in indexes.items():
                objects[f"{exp}/{INDEX}"] = _Index(cursor=cursor, runs=index).dump()
                objects[f"{exp}/{journal.CHANGES}/{journal.ANCHOR}"] = b""
        registries[name] = objects
    return registries


def write_local(root: str, objects: dict[str, bytes]) -> None:
    """Plain writes, no fsync: what is timed is reading."""
    made: set[Path] = set()
    for key, data in objects.items():
        path = Path(root, key)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(data)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_command(cmd: list[str], expect_rows: int | None = None, env: dict[str, str] | None = None) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    if expect_rows is not None:
        # Each run's row starts with its experiment/run_id key (in a table cell or a plain column).
        rows = sum(1 for line in out.stdout.splitlines()
                   if "/" in (line.strip("│ ").split() or [""])[0] and not line.startswith(("┃", "┏", "┡")))
        if rows != expect_rows:
            raise RuntimeError(f"{' '.join(cmd)} listed {rows} runs, expected {expect_rows}")


def change_states(root: str, count: int, clock: float | None = None) -> int:
    """Rewrite ``count`` states of the registry (their step advanced), each as ``write_state``
    writes it, 32 at a time, at ``clock`` (a time.time(); now when None); returns how many."""
    registry = Registry(root)
    states = registry.runs()[:count]
    for state in states:
        state.step += 1
    with mock.patch("time.time", lambda: clock) if clock is not None else contextlib.nullcontext():
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(registry.write_state, states))
    return len(states)


def age_indexes(root: str, seconds: float) -> None:
    """Backdate each experiment index as if last read that long ago: its journal cursor and its
    last full listing."""
    for exp in Registry(root).experiments():
        path = storage.join(root, exp, INDEX)
        index = _Index.model_validate_json(storage.read_bytes(path))
        assert index.cursor is not None
        index.cursor.listed -= seconds
        index.cursor.ms -= int(seconds * 1000)
        storage.write_bytes(path, index.dump())


def naive_read(root: str) -> int:
    """One request per state.json, in turn: the approach the batched reads of Registry.runs replace."""
    fs, _ = storage.filesystem(root)
    count = 0
    for exp in Registry(root).experiments():
        for entry in storage.listdir(storage.join(root, exp)):
            if entry["type"] == "directory" and not entry["name"].rstrip("/").rsplit("/", 1)[-1].startswith("."):
                RunState.model_validate_json(fs.cat_file(f"{entry['name'].rstrip('/')}/state.json"))
                count += 1
    return count


Row = tuple[str, int | None, str, list[float], str]


def against(seconds: float, target: float) -> str:
    return f"target ≤ {target:.0f} s: {'PASS' if seconds <= target else 'FAIL'}"


def measure(kind: str, base: str, sizes: list[int], repeats: int, naive_max: int, cold_max: int) -> Iterator[Row]:
    maestro = str(Path(sys.executable).with_name("maestro"))

    def ls(root: str, rows: int) -> None:
        run_command([maestro, "ls", "--root", root], expect_rows=rows)

    ls_one = timed(lambda: ls(f"{base}/one", 1), repeats)
    fixed = statistics.median(ls_one)
    yield kind, 1, "maestro ls", ls_one, "fixed cost"

    def per_run(times: list[float], runs: int) -> str:
        return f"{1000 * (statistics.median(times) - fixed) / runs:.3f} ms/run"

    for runs in sizes:
        root = f"{base}/n{runs}"
        cold = kind == "local" or runs <= cold_max
        # An `ls` of the largest registries takes a minute on moto: those are timed once.
        reps = repeats if runs <= cold_max else 1
        if cold:
            first = timed(lambda root=root, runs=runs: ls(root, runs), 1)
            yield (kind, runs, "maestro ls, cold (first)", first, per_run(first, runs))
        warm = timed(lambda root=root, runs=runs: ls(root, runs), reps)
        target = TARGETS_S.get(runs) if kind == "s3" else None
        slowest = max(warm + (first if cold else []))
        verdict = f"; {against(slowest, target)}" if target else ""
        yield (kind, runs, "maestro ls, warm", warm, per_run(warm, runs) + verdict)
        listed: list[float] = []
        with counted_requests() as calls:
            for _ in range(reps):
                start = time.perf_counter()
                states = Registry(root).runs()
                listed.append(time.perf_counter() - start)
        if len(states) != runs:
            raise RuntimeError(f"{kind}: registry does not hold {runs} runs")
        indexes = reps * len(Registry(root).experiments())
        if kind == "s3" and calls["get_object"] != indexes:
            raise RuntimeError(f"warm listings of {runs} runs fetched {calls['get_object']} objects, "
                               f"expected {indexes}: one index per experiment")
        yield (kind, runs, "Registry.runs() in-process, warm", listed,
               f"{1000 * statistics.median(listed) / runs:.3f} ms/run")
        if kind == "s3":
            # What the issue times: the first `ls` after 1,000 states changed (a grid's runs
            # starting, say), written as the runners write them, each its own state and record.
            changed = change_states(root, CHANGED)
            after = timed(lambda root=root, runs=runs: ls(root, runs), 1)
            yield (kind, runs, f"maestro ls, first after {changed:,} changed states", after,
                   per_run(after, runs) + (f"; {against(after[0], target)}" if target else ""))
            # The first `ls` after hours away: 1,000 states that runners wrote two hours ago, the
            # index read three hours ago. Then after a day away, when the index's daily full
            # listing is due: 1,000 states written 20 hours ago, their records in older folders.
            for away, written in ((3, 2), (25, 20)):
                changed = change_states(root, CHANGED, clock=time.time() - written * 3600)
                age_indexes(root, away * 3600)
                after = timed(lambda root=root, runs=runs: ls(root, runs), 1)
                yield (kind, runs, f"maestro ls, first after {away} h away, {changed:,} states changed {written} h ago",
                       after, per_run(after, runs) + (f"; {against(after[0], target)}" if target else ""))
        if runs <= naive_max:
            naive = timed(lambda root=root: naive_read(root), repeats)
            yield (kind, runs, "naive: cat_file per run, in turn", naive,
                   f"{statistics.median(naive) / statistics.median(listed):.1f}x Registry.runs()")
        if kind == "s3":
            # The first `ls` after `maestro submit` of a grid: its batch record carries the new
            # states, so neither an experiment read before nor a new one costs a GET per run.
            listed_runs = runs
            for where, experiment in (("to an experiment read before", EXPERIMENTS[0]), ("as a new experiment",
                                                                                       "new-grid")):
                submit_batched(Registry(root), grid_spec(experiment, CHANGED), load_profile(PROFILE))
                listed_runs += CHANGED
                after = timed(lambda root=root, n=listed_runs: ls(root, n), 1)
                yield (kind, runs, f"maestro ls, first after submitting {CHANGED:,} runs {where}", after,
                       against(after[0], target) if target else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="1000,10000,100000", help="comma-separated registry sizes")
    parser.add_argument("--experiments", type=int, default=5, help=f"at most {len(EXPERIMENTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each warm measurement (median)")
    parser.add_argument("--cold-max", type=int, default=10_000, help="largest S3 registry whose cold ls is timed")
    parser.add_argument("--naive-max", type=int, default=1_000, help="largest registry read the naive way")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--roots", default="local,s3", help="comma-separated: local, s3")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.runs.split(","))
    if not 1 <= args.experiments <= len(EXPERIMENTS):
        parser.error(f"--experiments must be between 1 and {len(EXPERIMENTS)}")
    kinds = [k.strip() for k in args.roots.split(",") if k.strip()]
    if not kinds or set(kinds) - {"local", "s3"}:
        parser.error("--roots takes local, s3 or both")

    console = Console(width=None if sys.stdout.isatty() else 160)
    began = time.perf_counter()
    registries = registry_objects(sizes, args.experiments, args.seed, args.naive_max, args.cold_max)
    console.print(f"generated {sum(map(len, registries.values()))} objects in {time.perf_counter() - began:.0f} s")
    server = None
    if "s3" in kinds:
        start = time.perf_counter()
        server = start_moto({"maestro-bench": {f"registry/{name}/{key}": data for name, objects in registries.items()
                                               for key, data in objects.items()}})
        console.print(f"moto started with them in {time.perf_counter() - start:.0f} s")
    load = OtherLoad([server.pid] if server is not None else [])
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "local" in kinds:
                for name, objects in registries.items():
                    write_local(f"{tmp}/registry/{name}", objects)
            # Warms the file cache for the interpreter and its imports, so the first timed command pays no cold reads.
            run_command([sys.executable, "-c", "import orchestrator.cli"])
            with load:
                rows += [("-", None, "python -c pass", timed(lambda: run_command([sys.executable, "-c", "pass"]),
                                                              args.repeats), ""),
                         ("-", None, "python -c 'import orchestrator.cli'",
                          timed(lambda: run_command([sys.executable, "-c", "import orchestrator.cli"]), args.repeats),
                          "")]
                for kind in kinds:
                    base = f"{tmp}/registry" if kind == "local" else "s3://maestro-bench/registry"
                    for row in measure(kind, base, sizes, args.repeats, args.naive_max, args.cold_max):
                        # As it comes too: the largest sizes take minutes on moto.
                        console.print(f"{row[0]} {row[1]} {row[2]}: {', '.join(f'{t:.2f}' for t in row[3])} s {row[4]}")
                        rows.append(row)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)

    table = Table(title=f"`maestro ls` over {', '.join(map(str, sizes))} runs in {args.experiments} experiments "
                        f"(median of {args.repeats})")
    for col in ("root", "runs", "what", "median s", "all s", "per run / ratio"):
        table.add_column(col, justify="right" if col in ("runs", "median s", "all s") else "left")
    for kind, runs, what, times, ratio in rows:
        table.add_row(kind, "" if runs is None else f"{runs:,}", what, f"{statistics.median(times):.3f}",
                      ", ".join(f"{t:.2f}" for t in times), ratio)
    console.print(table)
    console.print(load.footer(began))


if __name__ == "__main__":
    main()
