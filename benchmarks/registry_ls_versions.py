"""The case issue 11 timed, the first `maestro ls` after 1,000 runners' writes on S3, for this code
and for an older checkout of maestro, in turns on one moto server: the ratio between them holds
when the machine is slower or faster than on the day a target was set.

The issue measured 4.75 s for this case with the code of its day and set 2 s: a ratio of 0.42.
This machine's speed varies from day to day (the fixed cost of any `maestro ls` on S3 was 0.85 s
on one day and 1.4 s on the next), so an absolute figure alone cannot say whether a change met
that target; the same case timed with the issue's code in the same run can.

For each version, in turns (``--rounds`` pairs), in a fresh registry of its own: the version's own
``Registry.write_state`` writes ``--runs`` states over 5 experiments, 32 at a time, as runners do;
its `maestro ls` runs once (and leaves the index a reader leaves); the writer rewrites every state
(the step advanced); then the version's `maestro ls` is timed: **first after the writes**, then
**warm**, and on a registry of one run (the fixed cost). Each `ls` is a fresh process, run with
``PYTHONPATH`` at the version's checkout, its output checked to list every run.

    git worktree add ../base a2ebb01       # the code issue 11 was filed against
    python benchmarks/registry_ls_versions.py --baseline ../base [--runs 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OtherLoad, start_moto
from registry_ls import EXPERIMENTS, fake_state, run_command

# The issue's figures for this case: measured with the code of its day, and the target it set.
ISSUE_RUNS, ISSUE_BASELINE_S, ISSUE_TARGET_S = 1_000, 4.75, 2.0

# Runs with PYTHONPATH at a version's checkout: writes the states in a JSON file with that version's
# Registry.write_state, 32 at a time (an older RunState ignores the fields it does not know).
_WRITER = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from orchestrator.registry import Registry, RunState

root, path = sys.argv[1:3]
registry = Registry(root)
with open(path) as f:
    states = [RunState.model_validate(d) for d in json.load(f)]
with ThreadPoolExecutor(32) as pool:
    list(pool.map(registry.write_state, states))
"""


def states(runs: int, experiments: int, writes: int) -> list[dict[str, object]]:
    """The runs' states as a runner has them after ``writes`` writes (its step advanced each
    time): what it passes to write_state for the next one."""
    rng = random.Random(0)
    out = []
    for i in range(runs):
        state = fake_state(rng, EXPERIMENTS[i % experiments], i)
        state.step += writes
        # Write numbers, as a runner that read its state before writing it has them (a reader
        # treats two writes with one number as a race, and fetches the state).
        state.seq = writes
        out.append(state.model_dump(mode="json"))
    return out


class Version:
    """One checkout of maestro, run through this interpreter with PYTHONPATH at it."""

    def __init__(self, name: str, checkout: Path, tmp: str) -> None:
        self.name, self.tmp = name, tmp
        self.env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
        self.maestro = str(Path(sys.executable).with_name("maestro"))

    def write(self, root: str, batch: list[dict[str, object]]) -> None:
        path = f"{self.tmp}/states.json"
        with open(path, "w") as f:
            json.dump(batch, f)
        subprocess.run([sys.executable, "-c", _WRITER, root, path], env=self.env, check=True)

    def ls(self, root: str, rows: int) -> float:
        start = time.perf_counter()
        run_command([self.maestro, "ls", "--root", root], expect_rows=rows, env=self.env)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, type=Path, help="a checkout of the older code")
    parser.add_argument("--runs", type=int, default=ISSUE_RUNS)
    parser.add_argument("--experiments", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of (baseline, this) measurements")
    args = parser.parse_args()
    if not (args.baseline / "orchestrator" / "registry.py").is_file():
        parser.error(f"--baseline {args.baseline} is not a checkout of maestro (no orchestrator/registry.py)")

    began = time.perf_counter()
    # A bucket per measurement: moto's listings scan the whole bucket, so one bucket growing round
    # after round would slow the later versions' listings.
    buckets = {(name, r): f"bench-{name}-{r}" for name in ("baseline", "this") for r in range(args.rounds)}
    server = start_moto({bucket: {} for bucket in buckets.values()})
    load = OtherLoad([server.pid])
    first = states(args.runs, args.experiments, 0)
    changed = states(args.runs, args.experiments, 1)
    times: dict[str, dict[str, list[float]]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            versions = [Version("baseline", args.baseline, tmp), Version("this", Path(__file__).parents[1], tmp)]
            for round_ in range(args.rounds):
                for version in versions:
                    root = f"s3://{buckets[version.name, round_]}/registry"
                    version.write(f"{root}/one", first[:1])
                    version.write(f"{root}/grid", first)
                    version.ls(f"{root}/grid", args.runs)  # the reader's index, as it was before the writes
                    version.write(f"{root}/grid", changed)
                    with load:
                        measured = {"first `ls` after the writes": version.ls(f"{root}/grid", args.runs),
                                    "warm `ls`": version.ls(f"{root}/grid", args.runs),
                                    "`ls` of one run (fixed cost)": version.ls(f"{root}/one", 1)}
                    for what, seconds in measured.items():
                        times.setdefault(what, {}).setdefault(version.name, []).append(seconds)
                    print(f"round {round_ + 1} {version.name}: "
                          + ", ".join(f"{what} {seconds:.2f} s" for what, seconds in measured.items()), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)

    print(f"\n{args.runs:,} runs on moto S3, medians of {args.rounds} rounds:")
    for what, by_version in times.items():
        base, this = (statistics.median(by_version[v]) for v in ("baseline", "this"))
        print(f"  {what}: baseline {base:.2f} s, this {this:.2f} s, ratio {this / base:.2f}")
    after_writes = times["first `ls` after the writes"]
    ratios = [t / b for b, t in zip(after_writes["baseline"], after_writes["this"], strict=True)]
    target = ISSUE_TARGET_S / ISSUE_BASELINE_S
    verdict = "met" if statistics.median(ratios) <= target else "NOT met"
    if args.runs != ISSUE_RUNS:
        verdict += f" (the issue's figures are for {ISSUE_RUNS:,} runs, not {args.runs:,})"
    print(f"first `ls` after the writes, this / baseline per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"the issue's target {ISSUE_TARGET_S:g} s against its {ISSUE_BASELINE_S:g} s is {target:.2f}: {verdict}")
    print(load.footer(began))


if __name__ == "__main__":
    main()
