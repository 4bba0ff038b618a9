"""Run N trainer processes on this machine, the way torchrun does, with two differences:

- the rendezvous is a file, so nothing listens on a network port (gloo is pinned to loopback);
- SIGUSR2 and SIGTERM are forwarded to every rank, so a preemption reaches the trainer's
  checkpoint-and-exit path (torchrun does not forward SIGUSR2).

    python -m mae_core.launch --nproc 2 CONFIG.yaml

Exit status: 0 when every rank succeeded, the preempted status when ranks stopped on a
forwarded signal (``contract.exit_status`` says when), otherwise the first failing rank's status.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from mae_core.contract import PREEMPT_SIGNALS, PREEMPTED_EXIT_CODE, exit_status, rendezvous_env


def rank_env(rank: int, nproc: int, init_file: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(rendezvous_env(rank, rank, nproc, nproc, "127.0.0.1", init_method=f"file://{init_file}"))
    env["GLOO_SOCKET_IFNAME"] = "lo"
    # Share the cores between ranks instead of oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def launch(config: str, nproc: int) -> int:
    rdzv_dir = tempfile.mkdtemp(prefix="maestro-rdzv-")
    init_file = os.path.join(rdzv_dir, "store")
    procs = [subprocess.Popen([sys.executable, "-m", "mae_core.train", config],
                              env=rank_env(r, nproc, init_file)) for r in range(nproc)]

    signalled: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        signalled.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, forward)
    try:
        codes: dict[int, int] = {}
        while len(codes) < nproc:
            for r, p in enumerate(procs):
                if r not in codes and p.poll() is not None:
                    codes[r] = exit_status(p.returncode, signalled)
                    if codes[r] not in (0, PREEMPTED_EXIT_CODE):
                        _terminate(procs)  # the others would block in a collective forever
            time.sleep(0.05)
    finally:
        _terminate(procs)
        shutil.rmtree(rdzv_dir, ignore_errors=True)
    failures = [c for c in codes.values() if c not in (0, PREEMPTED_EXIT_CODE)]
    if failures:
        return failures[0]
    return PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in codes.values() else 0


def _terminate(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m mae_core.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=1, help="processes (one per GPU, or per CPU share)")
    parser.add_argument("config", help="TrainConfig YAML")
    args = parser.parse_args()
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    return launch(args.config, args.nproc)


if __name__ == "__main__":
    sys.exit(main())
