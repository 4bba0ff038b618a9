"""Wall-clock time of `maestro ls` over a registry of 1,000 runs (target: under 2 s).

`maestro ls` is the command people run most, and the registry lives in object storage, so it must
stay fast as runs pile up. This script fills two registries with N runs spread over a few
experiments, each with a realistic state.json written by ``Registry.write_state``: one in a local
folder, one in a bucket on a moto S3 server that it starts on 127.0.0.1. For each it times:

- ``maestro ls --root ROOT`` exactly as a user runs it (a fresh process, Python start-up and
  imports included), median of several runs, its output checked to list every run;
- the same command on a registry holding 1 run: the fixed cost of the command, so
  ls(N)/ls(1) is the cost of the runs themselves, on this machine, in this run;
- ``Registry(root).runs()`` in-process (what `maestro watch` pays per refresh);
- the naive read it replaces, one ``fs.cat_file`` per state.json in turn: naive/list is what the
  batched read buys.

It also times a bare ``python -c pass`` and an ``import orchestrator.cli`` so the fixed cost can be
split into interpreter start-up and imports.

    python benchmarks/registry_ls.py [--runs 1000] [--experiments 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import OtherLoad, start_moto
from rich.console import Console
from rich.table import Table

from mae_core import storage
from orchestrator.registry import Registry, RunState

TARGET_S = 2.0
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


def populate(root: str, runs: int, experiments: int, seed: int) -> None:
    registry, rng = Registry(root), random.Random(seed)
    for i in range(runs):
        registry.write_state(fake_state(rng, EXPERIMENTS[i % experiments], i))


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_command(cmd: list[str], expect_rows: int | None = None) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    if expect_rows is not None:
        # Each run's row starts with its experiment/run_id key, so rows with "/" in the first cell are runs.
        rows = sum(1 for line in out.stdout.splitlines() if line.startswith("│") and "/" in line.split("│")[1])
        if rows != expect_rows:
            raise RuntimeError(f"{' '.join(cmd)} listed {rows} runs, expected {expect_rows}")


def naive_read(root: str) -> int:
    """One request per state.json, in turn: the approach the batched ``fs.cat`` in Registry.list replaces."""
    fs, _ = storage.filesystem(root)
    count = 0
    for exp in Registry(root).experiments():
        for entry in storage.listdir(storage.join(root, exp)):
            if entry["type"] == "directory" and not entry["name"].rstrip("/").rsplit("/", 1)[-1].startswith("."):
                RunState.model_validate_json(fs.cat_file(f"{entry['name'].rstrip('/')}/state.json"))
                count += 1
    return count


def measure(roots: dict[str, str], runs: int, repeats: int) -> list[tuple[str, str, list[float], str]]:
    python = sys.executable
    maestro = str(Path(python).with_name("maestro"))
    # Warms the file cache for the interpreter and its imports, so the first timed command pays no cold reads.
    run_command([python, "-c", "import orchestrator.cli"])
    rows = [("-", "python -c pass", timed(lambda: run_command([python, "-c", "pass"]), repeats), ""),
            ("-", "python -c 'import orchestrator.cli'",
             timed(lambda: run_command([python, "-c", "import orchestrator.cli"]), repeats), "")]
    for kind, root in roots.items():
        many, one = f"{root}/many", f"{root}/one"
        ls_one: list[float] = []
        ls_many: list[float] = []
        # Alternated so that drift in the machine's load hits the 1-run baseline and the N-run command alike.
        for _ in range(repeats):
            ls_one += timed(lambda one=one: run_command([maestro, "ls", "--root", one], expect_rows=1), 1)
            ls_many += timed(lambda many=many: run_command([maestro, "ls", "--root", many], expect_rows=runs), 1)
        Registry(many).runs()
        listed = timed(lambda many=many: Registry(many).runs(), repeats)
        naive = timed(lambda many=many: naive_read(many), repeats)
        if len(Registry(many).runs()) != runs or naive_read(many) != runs:
            raise RuntimeError(f"{kind}: registry does not hold {runs} runs")
        verdict = "PASS" if statistics.median(ls_many) < TARGET_S else "FAIL"
        rows += [(kind, "maestro ls (1 run)", ls_one, ""),
                 (kind, f"maestro ls ({runs} runs)", ls_many,
                  f"{statistics.median(ls_many) / statistics.median(ls_one):.2f}x ls(1); "
                  f"target < {TARGET_S:.0f} s: {verdict}"),
                 (kind, "Registry.runs() in-process", listed, ""),
                 (kind, "naive: cat_file per run, in turn", naive,
                  f"{statistics.median(naive) / statistics.median(listed):.2f}x Registry.runs()")]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--experiments", type=int, default=5, help=f"at most {len(EXPERIMENTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each measurement (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--roots", default="local,s3", help="comma-separated: local, s3")
    args = parser.parse_args()
    if not 1 <= args.experiments <= len(EXPERIMENTS):
        parser.error(f"--experiments must be between 1 and {len(EXPERIMENTS)}")
    kinds = [k.strip() for k in args.roots.split(",") if k.strip()]
    if not kinds or set(kinds) - {"local", "s3"}:
        parser.error("--roots takes local, s3 or both")

    console = Console(width=None if sys.stdout.isatty() else 160)
    began = time.perf_counter()
    server = start_moto() if "s3" in kinds else None
    load = OtherLoad([server.pid] if server is not None else [])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            roots: dict[str, str] = {}
            if "local" in kinds:
                roots["local"] = f"{tmp}/registry"
            if "s3" in kinds:
                import s3fs

                s3fs.S3FileSystem().mkdir("maestro-bench")
                roots["s3"] = "s3://maestro-bench/registry"
            for kind, root in roots.items():
                start = time.perf_counter()
                populate(f"{root}/many", args.runs, args.experiments, args.seed)
                populate(f"{root}/one", 1, 1, args.seed)
                console.print(f"{kind}: wrote {args.runs} + 1 state.json in {time.perf_counter() - start:.1f} s")

            with load:
                rows = measure(roots, args.runs, args.repeats)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)

    table = Table(title=f"`maestro ls` over {args.runs} runs in {args.experiments} experiments "
                        f"(median of {args.repeats})")
    for col in ("root", "what", "median s", "all s", "ratio"):
        table.add_column(col, justify="right" if col in ("median s", "all s") else "left")
    for kind, what, times, ratio in rows:
        table.add_row(kind, what, f"{statistics.median(times):.3f}", ", ".join(f"{t:.2f}" for t in times), ratio)
    console.print(table)
    share = "n/a" if load.share is None else f"{100 * load.share:.0f}%"
    console.print(f"{os.cpu_count()} cores; other processes took {share} of the CPU during the timed part "
                  f"(above ~10%, rerun); total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
