"""How long a preempted SLURM run is off the CPUs, and what submitting a 1,000-run grid costs.

Both parts run on a real local SLURM cluster (1 node, all CPUs) that this script starts through
orchestrator/testing/slurm_cluster.py and stops at the end. It uses the same spec and profile as
tests/test_slurm_backend.py.

1. Requeue latency. A tiny run (mae_vit_micro_patch4 on synthetic data, 2 tasks x 1 CPU, partition
   ``low``) is preempted by a ``high`` job that needs every CPU (``sleep 1``). Latency runs from the
   preempting sbatch to the metrics record of the first step after resume, i.e. the first step
   greater than ``resumed_from_step``. Replayed steps are the steps the preempted attempt computed
   (its log, its ``requeued`` event) beyond the step the next attempt resumed from. The run is
   preempted ``--repeats`` times in a row. Targets: <= 30 s and 0 replayed steps. The breakdown
   uses registry events, the checkpoint marker's mtime and SLURM's start time (1 s resolution).
   Why: on a shared cluster preemption is routine, and every requeue costs this much idle
   allocation plus any replayed work.
2. Grid submit cost. ``maestro submit`` of a 1,000-point sweep (``seed`` 0..999) to a fresh local
   registry makes 1,000 registry entries and one job array. The baseline, measured in the same
   run, is a plain ``sbatch --array=0-999 --hold --wrap true``. Both arrays are cancelled at once.
   A blocker job on ``high`` holds every CPU while the grid is submitted, so the released array
   stays pending and no task trains. Why: a grid must not cost minutes before the first run queues.

    python benchmarks/requeue_latency.py [--repeats 3] [--grid-size 1000] [--grid-repeats 1] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mae_core import storage
from mae_core.checkpoint import Checkpointer
from mae_core.metrics_log import read_records
from orchestrator.registry import Registry, RunState
from orchestrator.testing.slurm_cluster import SlurmCluster, available, start_cluster
from orchestrator.testing.specs import merge

REPO = Path(__file__).resolve().parent.parent

MAESTRO = str(Path(sys.executable).with_name("maestro"))
TARGET_S = 30.0
# sacct/squeue times have 1 s resolution, so phases measured against them are +-1 s.
SLURM_TIME = "%Y-%m-%dT%H:%M:%S"

# As tests/test_slurm_backend.py, with far more epochs, so the run is still training after
# every repeat. It is cancelled at the end.
SPEC: dict[str, Any] = {
    "name": "requeue", "seed": 5, "model": {"arch": "mae_vit_micro_patch4"},
    "data": {"num_samples": 256, "input_size": 32},
    "optim": {"epochs": 100_000, "global_batch": 32, "warmup_epochs": 1, "blr": 1e-3},
    "resources": {"nodes": 1, "gpus_per_node": 2, "per_device_batch": 16}, "runtime": {"threads": 1},
    # keep_last 5: the preempted attempt's checkpoint must still exist when its mtime is read.
    "checkpoint": {"interval_steps": 20, "keep_last": 5},
    # Every step recorded: latency runs to the first new step's record, whatever the interval.
    "metrics": {"log_interval": 1, "flush_s": 10.0},
}
PROFILE: dict[str, Any] = {
    "backend": "slurm", "partition": "low", "gpus_per_node": 0, "cpus_per_task": 1, "time_min": 120,
    "signal_delay_s": 10, "array_parallelism": 2, "rendezvous": "file",
    # gloo binds to loopback only, as everything in the tests does.
    "setup": ["export GLOO_SOCKET_IFNAME=lo"],
}


def write_spec(directory: Path, **over: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cluster = directory / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({**PROFILE, "folder": str(directory / "submitit")}))
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(merge(SPEC, {"cluster": str(cluster), **over})))
    return path


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def sh(*argv: str, timeout: float = 60) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=timeout).stdout.strip()


def maestro(*args: str, timeout: float = 3600) -> float:
    """Wall seconds of one `maestro` command, as a user's shell runs it (start-up and imports included)."""
    began = time.perf_counter()
    proc = subprocess.run([MAESTRO, *args], capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"maestro {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return elapsed


def slurm_time(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text.strip(), SLURM_TIME))
    except ValueError:
        return None  # "Unknown", "N/A": not started or not ended yet


def node_cpus() -> str:
    return sh("sinfo", "-h", "-p", "high", "-o", "%c").split()[0]


def sbatch_high(command: str) -> str:
    """A high-priority job needing every CPU: it starts only by preempting ``low`` (or after it)."""
    return sh("sbatch", "--parsable", "--partition", "high", "--cpus-per-task", node_cpus(), "--output",
              "/dev/null", "--wrap", command)


def in_squeue(job_id: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip())


def cancel(job_ids: list[str], registries: list[Registry] | None = None) -> None:
    """Cancel our jobs and wait until they leave squeue, so the next part starts on an idle node.

    A bare scancel does not end a running maestro run: its trainer checkpoints on TERM and the run
    requeues itself as if preempted. The registry's cancel request (what `maestro cancel` writes
    first) makes the runner end it instead.
    """
    for registry in registries or []:
        for state in registry.runs():
            registry.request_cancel(state)
    live = [j for j in job_ids if in_squeue(j)]
    if not live:
        return
    subprocess.run(["scancel", *live], capture_output=True, timeout=60, check=False)
    try:
        wait_for(lambda: not any(in_squeue(j) for j in live), timeout=60, what=f"jobs {live} to leave squeue")
    except TimeoutError:
        subprocess.run(["scancel", "--full", "--signal=KILL", *live], capture_output=True, timeout=60, check=False)
        wait_for(lambda: not any(in_squeue(j) for j in live), timeout=60, what=f"jobs {live} to leave squeue")


# Part 1: requeue latency ------------------------------------------------------------------------

def only(registry: Registry) -> RunState:
    [state] = registry.runs()
    return state


def checkpoint_step(registry: Registry, state: RunState) -> int:
    url = storage.join(registry.run_url(state.experiment, state.run_id), "checkpoints")
    info = Checkpointer(url, rank=0, world_size=1).latest()
    return info.step if info else 0


def event(registry: Registry, state: RunState, kind: str, attempt: int) -> dict[str, Any] | None:
    found = [e for e in registry.events(state.experiment, state.run_id)
             if e["event"] == kind and e["attempt"] == attempt]
    return found[-1] if found else None


def logged_steps(registry: Registry, state: RunState, attempt: int) -> list[int]:
    """The steps an attempt's trainer logged: all it computed, whatever the checkpoint kept."""
    text = storage.read_bytes(registry.log_url(state, attempt)).decode(errors="replace")
    return [int(m) for m in re.findall(r" step (\d+)/\d+ loss", text)]


def job_start(job_id: str) -> float | None:
    """When SLURM started the job's current run (its latest requeue)."""
    return slurm_time(sh("squeue", "-h", "-j", job_id, "-o", "%S"))


def job_span(job_id: str) -> tuple[float | None, float | None]:
    """(start, end) of a finished job from accounting, which may lag its end by a moment."""
    for _ in range(20):
        out = sh("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "Start,End").splitlines()
        if out and "|" in out[-1]:
            start, end = (slurm_time(t) for t in out[-1].split("|"))
            if end is not None:
                return start, end
        time.sleep(0.5)
    return None, None


def preempt_once(registry: Registry, attempt: int, jobs: list[str]) -> dict[str, Any]:
    """Preempt attempt ``attempt`` (already training) and time it to attempt + 1's first new step."""
    state = only(registry)
    run_url = registry.run_url(state.experiment, state.run_id)
    t_submit = time.time()
    high = sbatch_high("sleep 1")
    jobs.append(high)

    wait_for(lambda: event(registry, state, "requeued", attempt) is not None, 120, f"attempt {attempt} to requeue")
    stop = event(registry, state, "requeued", attempt)
    assert stop is not None
    if stop["reason"] != "preempted":
        raise RuntimeError(f"attempt {attempt} ended {stop['reason']!r}, not preempted")
    marker = Path(run_url) / "checkpoints" / f"step-{stop['last_checkpoint_step']:09d}" / "COMMITTED"
    t_ckpt = marker.stat().st_mtime

    wait_for(lambda: event(registry, state, "started", attempt + 1) is not None, 180,
             f"attempt {attempt + 1} to start")
    start = event(registry, state, "started", attempt + 1)
    assert start is not None
    t_job = job_start(state.job_ids[-1])
    resumed = start["resumed_from_step"] or 0

    def first_new_step() -> dict[str, Any] | None:
        # The curve drops records past the resume step, so one newer than the start is this attempt's.
        new = [r for r in read_records(run_url) if r["step"] > resumed and r["time"] >= start["time"]]
        return min(new, key=lambda r: r["step"]) if new else None

    # The trainer flushes metrics at each checkpoint (every 20 steps) or every metrics.flush_s (10 s).
    wait_for(lambda: first_new_step() is not None, 180, f"attempt {attempt + 1}'s first step")
    first = first_new_step()
    assert first is not None
    high_start, high_end = job_span(high)

    computed = max([stop["step"] or 0, *logged_steps(registry, state, attempt)])
    return {
        "total": first["time"] - t_submit, "stop_step": computed, "checkpoint": stop["last_checkpoint_step"],
        "resumed": resumed, "first_step": first["step"], "replayed": max(0, computed - resumed),
        "job_id": start["job_id"], "restart_count": start["restart_count"],
        # Phases, in order; each ends where the next begins.
        "submit->ckpt": t_ckpt - t_submit,
        "ckpt->requeued": stop["time"] - t_ckpt,
        "requeued->job running": None if t_job is None else t_job - stop["time"],
        "job running->started": None if t_job is None else start["time"] - t_job,
        "started->1st step": first["time"] - start["time"],
        # The preempting job, for where the requeue wait goes.
        "high ran": None if high_start is None else f"{high_start - t_submit:+.0f}..{high_end - t_submit:+.0f} s",
    }


PHASES = ["submit->ckpt", "ckpt->requeued", "requeued->job running", "job running->started", "started->1st step"]


def requeue_latency(work: Path, repeats: int, jobs: list[str],
                    registries: list[Registry]) -> tuple[list[dict[str, Any]], int]:
    """Per-preemption results, and how many steps the curve holds twice (0 when resume is exact)."""
    root = str(work / "registry")
    maestro("submit", str(write_spec(work)), "--root", root)
    registry = Registry(root)
    registries.append(registry)
    jobs.extend(only(registry).job_ids)
    results = []
    for attempt in range(1, repeats + 1):
        # Preempt only an attempt in steady training: it has saved a checkpoint of its own.
        since = 0 if attempt == 1 else results[-1]["resumed"]
        wait_for(lambda a=attempt, s=since: only(registry).attempts == a and only(registry).status == "running"
                 and checkpoint_step(registry, only(registry)) > s, 300, f"attempt {attempt} to checkpoint")
        result = preempt_once(registry, attempt, jobs)
        results.append(result)
        phases = ", ".join(f"{k} {fmt(result[k])}" for k in PHASES)
        print(f"  preemption {attempt}: {result['total']:.1f} s to step {result['first_step']} "
              f"(stopped at {result['stop_step']}, resumed from {result['resumed']}, "
              f"replayed {result['replayed']}); {phases}; high job ran {result['high ran']}", flush=True)
    state = only(registry)
    steps = [r["step"] for r in read_records(registry.run_url(state.experiment, state.run_id))]
    twice = len(steps) - len(set(steps))
    print(f"  steps twice in the curve (read_records): {twice}; requeued under job ids "
          f"{sorted({r['job_id'] for r in results})}, SLURM_RESTART_COUNT up to {results[-1]['restart_count']}")
    return results, twice


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# Part 2: grid submit cost -----------------------------------------------------------------------

def max_array_size() -> int:
    config = sh("scontrol", "show", "config")
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.MULTILINE)
    return int(found.group(1)) if found else 1001  # SLURM's default


def grid_submit(work: Path, size: int, repeats: int, profile: bool, jobs: list[str]) -> dict[str, Any]:
    # The blocker keeps the released array pending, so no task trains while we time or cancel.
    blocker = sbatch_high("sleep 3600")
    jobs.append(blocker)
    wait_for(lambda: sh("squeue", "-h", "-j", blocker, "-o", "%T") == "RUNNING", 60, "the blocker to run")

    spec = write_spec(work / "grid", optim={"epochs": 1}, resources={"gpus_per_node": 1},
                      sweep={"grid": {"seed": list(range(size))}})
    startup = min(maestro("--help") for _ in range(3))
    sbatch_s: list[float] = []
    maestro_s: list[float] = []
    for r in range(repeats):
        began = time.perf_counter()
        array = sh("sbatch", "--parsable", f"--array=0-{size - 1}", "--hold", "--partition", "low",
                   "--output", "/dev/null", "--wrap", "true")
        sbatch_s.append(time.perf_counter() - began)
        jobs.append(array)
        cancel([array])

        root = str(work / f"grid-registry-{r}")
        maestro_s.append(maestro("submit", str(spec), "--root", root))
        states = Registry(root).runs()
        arrays = sorted({s.job_ids[-1].split("_")[0] for s in states if s.job_ids})
        jobs.extend(arrays)
        queued = len(sh("squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i").splitlines()) if arrays else 0
        print(f"  repeat {r + 1}: sbatch {1000 * sbatch_s[-1]:.1f} ms, maestro submit {maestro_s[-1]:.1f} s: "
              f"{len(states)} registry entries, job arrays {arrays}, {queued} array tasks in squeue", flush=True)
        if len(states) != size or len(arrays) != 1 or queued != size:
            raise RuntimeError(f"expected {size} runs in one array of {size} tasks")
        cancel(arrays)

    if profile:
        print_profile(spec, str(work / "grid-registry-profiled"), jobs)
    cancel([blocker])
    return {"sbatch": statistics.median(sbatch_s), "maestro": statistics.median(maestro_s), "startup": startup}


def category(filename: str, name: str) -> str:
    """Which kind of work a profiled function is, for the split of `maestro submit`'s time."""
    if "fsync" in name:
        return "fsync (atomic local writes)"
    if "/yaml/" in filename:
        return "YAML dump/parse (pure Python)"
    if "waitpid" in name or "poll" in name or "/subprocess.py" in filename or "/submitit/" in filename:
        return "submitit + sbatch/scontrol"
    if filename == "~" or "/fsspec/" in filename or "mae_core/storage" in filename:
        return "other file I/O (create, mkdir, rename, fsspec)"
    if "/pydantic" in filename:
        return "pydantic"
    return "other Python"


def print_profile(spec: Path, root: str, jobs: list[str]) -> None:
    """Where `maestro submit` spends its time: cProfile of the CLI in this process."""
    from orchestrator import cli

    argv, sys.argv = sys.argv, ["maestro", "submit", str(spec), "--root", root]
    profiler = cProfile.Profile()
    try:
        profiler.runcall(cli.main)
    except SystemExit as e:
        if e.code:
            raise
    finally:
        sys.argv = argv
    jobs.extend(sorted({s.job_ids[-1].split("_")[0] for s in Registry(root).runs() if s.job_ids}))
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    # Only the orchestrator's own frames and the storage calls they end in: it reads as a call tree.
    stats.print_stats(r"orchestrator/|mae_core/storage|submitit/core/core", 16)
    print("  cProfile of `maestro submit` in-process (cumulative; cProfile slows pure Python the most):")
    print("\n".join("    " + line for line in out.getvalue().splitlines()[5:] if line.strip()))
    split: dict[str, float] = {}
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():
        split[category(filename, name)] = split.get(category(filename, name), 0.0) + tottime
    total = sum(split.values())
    print("  own time by kind:")
    for kind, seconds in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"    {kind:<46} {seconds:6.2f} s {100 * seconds / total:4.0f}%")


# Main -------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="successive preemptions of the run")
    parser.add_argument("--grid-size", type=int, default=1000, help="runs in the swept grid")
    parser.add_argument("--grid-repeats", type=int, default=1, help="submits of the grid (and of the baseline)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one `maestro submit` of the grid")
    parser.add_argument("--skip-requeue", action="store_true")
    parser.add_argument("--skip-grid", action="store_true")
    args = parser.parse_args()
    if not available():
        sys.exit("needs root and the SLURM packages: scripts/local_slurm.sh install")
    # Polling for checkpoints sees the trainer's saves in progress; that is expected, not worth a warning.
    logging.getLogger("mae_core.checkpoint").setLevel(logging.ERROR)

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="requeue-bench-"))
    jobs: list[str] = []
    registries: list[Registry] = []
    cluster: SlurmCluster | None = None
    try:
        cluster = start_cluster(1)
        # sbatch, squeue and submitit (in this process and in maestro's) reach only this cluster.
        os.environ.update(cluster.env)
        version = sh("sinfo", "--version")
        # Other work on this machine shares the cluster's CPUs; the load average says how much there was.
        print(f"{version} local cluster, 1 node, {node_cpus()} CPUs (nproc {os.cpu_count()}), {cluster.base}; "
              f"load average {os.getloadavg()[0]:.1f}")

        latency: list[dict[str, Any]] = []
        twice = 0
        if not args.skip_requeue:
            print(f"\nrequeue latency: {args.repeats} successive preemptions of one run (2 tasks x 1 CPU)")
            latency, twice = requeue_latency(work / "requeue", args.repeats, jobs, registries)
            cancel(jobs, registries)

        grid: dict[str, Any] | None = None
        limit = max_array_size()
        if not args.skip_grid:
            print(f"\ngrid submit: {args.grid_size} runs (MaxArraySize={limit})")
            if args.grid_size > limit - 1:
                print(f"  MaxArraySize={limit} allows indices up to {limit - 1}: a {args.grid_size}-task array "
                      "cannot be submitted on this cluster; skipped")
            else:
                grid = grid_submit(work, args.grid_size, args.grid_repeats, args.profile, jobs)
    finally:
        try:
            if cluster is not None:
                try:
                    cancel(jobs, registries)
                finally:
                    cluster.stop()
        finally:
            # The runner leaves each attempt's trainer config dir in /tmp; ours are named by our run ids.
            for registry in registries:
                for state in registry.runs():
                    for leftover in Path(tempfile.gettempdir()).glob(f"maestro-{state.run_id}-*"):
                        shutil.rmtree(leftover, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)

    print("\nresults")
    if latency:
        print(f"{'preemption':>10} {'total s':>8} " + " ".join(f"{p:>22}" for p in PHASES) + f" {'replayed':>8}")
        for i, r in enumerate(latency, 1):
            print(f"{i:>10} {r['total']:>8.1f} " + " ".join(f"{fmt(r[p]):>22}" for p in PHASES)
                  + f" {r['replayed']:>8}")
        totals = [r["total"] for r in latency]
        medians = [statistics.median([r[p] for r in latency if r[p] is not None] or [0]) for p in PHASES]
        print(f"{'median':>10} {statistics.median(totals):>8.1f} " + " ".join(f"{m:>22.1f}" for m in medians)
              + f" {sum(r['replayed'] for r in latency):>8}")
        replayed = sum(r["replayed"] for r in latency) + twice
        ok = statistics.median(totals) <= TARGET_S and replayed == 0
        print(f"requeue latency median {statistics.median(totals):.1f} s (target <= {TARGET_S:.0f} s), "
              f"replayed steps {replayed} (target 0; {twice} of them recorded twice): {'met' if ok else 'NOT met'}")
    if grid:
        print(f"grid of {args.grid_size}, median of {args.grid_repeats}: maestro submit {grid['maestro']:.1f} s "
              f"({1000 * grid['maestro'] / args.grid_size:.1f} ms/run; CLI start-up alone {grid['startup']:.1f} s), "
              f"plain sbatch --array --hold {1000 * grid['sbatch']:.1f} ms; "
              f"ratio {grid['maestro'] / grid['sbatch']:.0f}x")
    print(f"total {time.perf_counter() - began:.0f} s; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
