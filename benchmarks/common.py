"""What several benchmarks share: a moto S3 server on loopback, and the CPU share that other
processes took while a benchmark ran."""

from __future__ import annotations

import os
import subprocess
import time

from orchestrator.testing.s3_server import start_s3_server


class OtherLoad:
    """Share of the machine's CPU time taken by processes other than this one, its children and
    ``pids`` (e.g. a moto server), and by the hypervisor, while in the block.

    Medians absorb short blips, not a test suite running beside the benchmark on 2 cores, so the
    share is printed with the results: a high value marks them as suspect.
    """

    def __init__(self, pids: list[int] | None = None) -> None:
        self.pids = pids or []
        self.other = self.wall = 0.0
        self.known = True

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        except (OSError, ValueError):
            return None
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def _own(self) -> float:
        total = sum(os.times()[:4])
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                self.known = False
        return total

    def __enter__(self) -> OtherLoad:
        self._start = (self._busy(), self._own(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = self._busy(), self._own(), time.perf_counter()
        if busy is None or self._start[0] is None:
            self.known = False
        else:
            self.other += max(0.0, (busy - self._start[0]) - (own - self._start[1]))
        self.wall += wall - self._start[2]

    @property
    def share(self) -> float | None:
        if not self.known or not self.wall:
            return None
        return self.other / (self.wall * (os.cpu_count() or 1))


def start_moto() -> subprocess.Popen[bytes]:
    """A moto S3 server on loopback (``orchestrator.testing``, as in the tests), its endpoint set in
    os.environ so that subprocesses (e.g. `maestro ls`) inherit it too."""
    server = start_s3_server()
    os.environ.update(server.env)
    return server.proc
