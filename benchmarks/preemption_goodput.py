"""Goodput of a run preempted at random, against the same run left alone, on a real local SLURM cluster.

A tiny MAE run (mae_vit_tiny_patch4 on synthetic 32x32 data, 2 tasks x 1 CPU, partition ``low``)
trains for about ``--minutes`` while a ``high`` job that needs every CPU preempts it at random
times: after each attempt starts, the next preemption comes after an exponentially distributed
delay with mean ``--mean-s``. The baseline is the same spec run through SLURM without
preemption, in the same invocation. Both runs record goodput through maestro's own accounting
(``mae_core.goodput``): allocated, productive, lost, restart overhead, checkpoint.

Printed: both goodputs and their ratio; the time each preemption cost, split by cause; the
preemptions survived; whether the final parameters of both runs are bit-identical; and, from the
measured cost per preemption, the goodput of a long run preempted once every 10 minutes of
allocation (goal >= 95%). Queue time between attempts is not allocated and is shown apart.

    python benchmarks/preemption_goodput.py [--minutes 10] [--mean-s 60] [--seed 0]   # as root
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from requeue_latency import MAESTRO, cancel, in_squeue, node_cpus, sbatch_high, sh, wait_for, write_spec

from mae_core.checkpoint import Checkpointer, load_weights
from mae_core.goodput import Goodput
from mae_core.progress import read_progress
from mae_core.train import make_model
from orchestrator.registry import Registry, RunState
from orchestrator.spec import Derived, load_spec
from orchestrator.testing.slurm_cluster import SlurmCluster, available, start_cluster

TERMS = ("allocated_s", "productive_s", "lost_s", "overhead_s", "checkpoint_s")
# The interval the extrapolation is for: one preemption per 10 minutes of allocation.
EXTRAPOLATE_S = 600.0
GOAL = 0.95


def spec_over(steps: int) -> dict[str, Any]:
    # 8 steps per epoch (256 samples, global batch 32); checkpoints every 100 steps, as a long run
    # would every so many minutes; a preemption checkpoints where it stops anyway.
    return {"name": "goodput", "model": {"arch": "mae_vit_tiny_patch4"},
            "optim": {"epochs": max(2, steps // 8), "global_batch": 32, "warmup_epochs": 1},
            "checkpoint": {"interval_steps": 100, "keep_last": 2}, "metrics": {"log_interval": 20, "flush_s": 30.0}}


def submit(spec: Path, root: Path) -> Registry:
    out = subprocess.run([MAESTRO, "submit", str(spec), "--root", str(root)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stdout + out.stderr)
    return Registry(str(root))


def only(registry: Registry) -> RunState:
    [state] = registry.runs()
    return state


def steps_per_s(work: Path) -> float:
    """The trainer's speed on this machine, from a short run of the same model outside SLURM."""
    spec = load_spec(str(write_spec(work / "probe", **spec_over(160))))
    config = work / "probe" / "train.yaml"
    config.write_text(spec.train_config(output=str(work / "probe" / "run")).to_yaml())
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mae_core.launch", "--nproc", "2", str(config)], check=True,
                   capture_output=True)
    return Derived.of(spec).total_steps / (time.perf_counter() - began)


def preempt_at_random(registry: Registry, mean_s: float, rng: random.Random, jobs: list[str]) -> int:
    """Preempt the run at random until it completes; returns the preemptions sent."""
    sent = 0
    while True:
        wait_for(lambda: only(registry).status in ("running", "completed", "failed"), timeout=600,
                 what="the run to run again")
        state = only(registry)
        if state.status != "running":
            return sent
        started = state.attempt_started or time.time()
        due = started + rng.expovariate(1.0 / mean_s)
        while time.time() < due and only(registry).status == "running":
            time.sleep(0.5)
        state = only(registry)
        last = read_progress(registry.run_url(state.experiment, state.run_id)) or {}
        if state.status != "running" or last.get("step", 0) >= 0.97 * state.total_steps:
            continue  # ended meanwhile, or too close to its end to be worth it
        jobs.append(sbatch_high("sleep 1"))
        sent += 1
        attempts = state.attempts
        wait_for(lambda a=attempts: only(registry).attempts > a or only(registry).status in ("completed", "failed"),
                 timeout=600, what="the preempted run to start again")


def attempt_ends(registry: Registry, state: RunState) -> list[dict[str, Any]]:
    return [e for e in registry.events(state.experiment, state.run_id) if "goodput" in e]


def final_weights(registry: Registry, state: RunState) -> dict[str, torch.Tensor]:
    run_url = registry.run_url(state.experiment, state.run_id)
    info = Checkpointer(f"{run_url}/checkpoints", rank=0, world_size=1).latest()
    assert info is not None
    spec = registry.spec(state.experiment, state.run_id)
    return load_weights(info, make_model(spec.train_config(output=run_url))).state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time of the preempted run")
    parser.add_argument("--mean-s", type=float, default=60.0, help="mean time between preemptions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not available():
        sys.exit("needs root and the SLURM packages: scripts/local_slurm.sh install")
    logging.getLogger("mae_core.checkpoint").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="goodput-bench-"))
    jobs: list[str] = []
    registries: list[Registry] = []
    cluster: SlurmCluster | None = None
    t0 = time.perf_counter()
    # The trainers run under slurmd, not as this script's children, so a CPU share of "other"
    # processes cannot be told apart here; the load average before the start says if the machine was busy.
    print(f"load average before the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    try:
        rate = steps_per_s(work)
        steps = int(rate * args.minutes * 60)
        cluster = start_cluster(1)
        os.environ.update(cluster.env)
        print(f"{sh('sinfo', '--version')}, 1 node, {node_cpus()} CPUs; trainer {rate:.1f} steps/s -> "
              f"{steps} steps; preemption every {args.mean_s:.0f} s on average (seed {args.seed})")

        preempted = submit(write_spec(work / "preempted", **spec_over(steps)), work / "preempted" / "registry")
        registries.append(preempted)
        began = time.time()
        sent = preempt_at_random(preempted, args.mean_s, random.Random(args.seed), jobs)
        wait_for(lambda: only(preempted).status in ("completed", "failed"), timeout=3600, what="the run to end")
        wall = time.time() - began
        print(f"preempted run: {only(preempted).status} after {wall:.0f} s, {sent} preemption(s) sent")

        baseline = submit(write_spec(work / "baseline", **spec_over(steps)), work / "baseline" / "registry")
        registries.append(baseline)
        began = time.time()
        wait_for(lambda: only(baseline).status in ("completed", "failed"), timeout=3600, what="the baseline")
        print(f"baseline run: {only(baseline).status} after {time.time() - began:.0f} s")
    finally:
        if cluster is not None:
            try:
                cancel([j for j in jobs if in_squeue(j)], registries)
            finally:
                cluster.stop()

    run, base = only(preempted), only(baseline)
    g, b = run.goodput, base.goodput
    ends = attempt_ends(preempted, run)
    starts = [e for e in preempted.events(run.experiment, run.run_id) if e["event"] == "started"]
    stops = [e for e in ends if e.get("ended_by") == "preempted"]
    print("\nresults")
    print(f"{'':>10} " + " ".join(f"{t.removesuffix('_s'):>11}" for t in TERMS) + f" {'goodput':>8}")
    for name, terms in (("preempted", g), ("baseline", b)):
        print(f"{name:>10} " + " ".join(f"{getattr(terms, t):>10.1f}s" for t in TERMS) + f" {terms.ratio:>8.1%}")
    assert g.ratio is not None and b.ratio is not None
    print(f"goodput ratio preempted / baseline: {g.ratio / b.ratio:.3f}")

    # Per preemption: the preempted attempt's lost work and its other time (signal to the runner's
    # record of the end), the next attempt's restart overhead, and the queue wait in between.
    rows = []
    for stop in stops:
        nxt_start = next(s for s in starts if s["attempt"] == stop["attempt"] + 1)
        nxt_end = next(e for e in ends if e["attempt"] == stop["attempt"] + 1)
        gp = Goodput(**stop["goodput"])
        other = gp.allocated_s - gp.productive_s - gp.lost_s - gp.overhead_s - gp.checkpoint_s
        rows.append({"step": stop["step"], "lost": gp.lost_s, "stop+exit": other,
                     "restart": nxt_end["goodput"]["overhead_s"], "queue": nxt_start["time"] - stop["time"]})
    extra_checkpoint = max(0.0, g.checkpoint_s - b.checkpoint_s) / max(1, len(rows))
    print(f"\n{len(rows)} preemption(s) survived; cost of each (s; queue is not allocated):")
    print(f"{'#':>3} {'step':>6} {'lost':>6} {'stop+exit':>9} {'restart':>8} {'queue':>6}")
    for i, r in enumerate(rows, 1):
        print(f"{i:>3} {r['step']:>6} {r['lost']:>6.1f} {r['stop+exit']:>9.1f} {r['restart']:>8.1f} {r['queue']:>6.1f}")
    if rows:
        med = {k: statistics.median(r[k] for r in rows) for k in ("lost", "stop+exit", "restart", "queue")}
        print(f"{'med':>3} {'':>6} {med['lost']:>6.1f} {med['stop+exit']:>9.1f} {med['restart']:>8.1f} "
              f"{med['queue']:>6.1f}   + {extra_checkpoint:.1f} s of stop checkpoint each")
        per = med["lost"] + med["stop+exit"] + med["restart"] + extra_checkpoint
        steady = b.productive_s / (b.productive_s + b.checkpoint_s)  # a long uninterrupted run's share
        at_10 = steady * max(0.0, 1 - per / EXTRAPOLATE_S)
        print(f"allocation lost per preemption: {per:.1f} s -> one preemption per {EXTRAPOLATE_S / 60:.0f} min of "
              f"allocation: goodput {at_10:.1%} (goal {GOAL:.0%}: {'met' if at_10 >= GOAL else 'NOT met'})")
    same = final_weights(preempted, run)
    ref = final_weights(baseline, base)
    identical = run.step == base.step and all(torch.equal(same[k], ref[k]) for k in ref)
    print(f"final parameters bit-identical to the uninterrupted run: {identical} (step {run.step} vs {base.step})")
    print(f"total {time.perf_counter() - t0:.0f} s")
    for registry in registries:
        for state in registry.runs():
            for leftover in Path(tempfile.gettempdir()).glob(f"maestro-{state.run_id}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
