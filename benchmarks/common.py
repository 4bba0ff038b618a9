"""What several benchmarks share: a moto S3 server on loopback (optionally started with objects
already in it), and the CPU share that other processes took while a benchmark ran."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator.testing.s3_server import TEST_CREDENTIALS, free_port, start_s3_server

# Runs in the moto server's own process: puts every object of the pickled {bucket: {key: bytes}}
# straight into moto's backend, then serves. Objects land as a PUT would leave them (ETag
# included), at ~50 us each instead of the ~10 ms of CPU a PUT through HTTP costs on moto.
_SEEDED_SERVER = """
import pickle, sys
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import main

with open(sys.argv[1], "rb") as f:
    seed = pickle.load(f)
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
for bucket, objects in seed.items():
    backend.create_bucket(bucket, "us-east-1")
    for key, value in objects.items():
        backend.put_object(bucket, key, value)
del seed
main(["-H", "127.0.0.1", "-p", sys.argv[2]])
"""


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

    def footer(self, began: float) -> str:
        """The line every benchmark ends with: cores, the other load, and its own run time."""
        share = "n/a" if self.share is None else f"{100 * self.share:.0f}%"
        return (f"{os.cpu_count()} cores; other processes took {share} of the CPU during the timed part "
                f"(above ~10%, rerun); total {time.perf_counter() - began:.0f} s")


@contextmanager
def counted_requests() -> Iterator[Counter[str]]:
    """S3 requests sent through s3fs in this process while in the block, by operation."""
    import s3fs

    calls: Counter[str] = Counter()
    call = s3fs.S3FileSystem._call_s3

    async def counting(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        calls[method] += 1
        return await call(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counting  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        s3fs.S3FileSystem._call_s3 = call  # type: ignore[method-assign]


def start_moto(seed: dict[str, dict[str, bytes]] | None = None, timeout: float = 600) -> subprocess.Popen[bytes]:
    """A moto S3 server on loopback (``orchestrator.testing``, as in the tests), its endpoint set in
    os.environ so that subprocesses (e.g. `maestro ls`) inherit it too. ``seed``: buckets and
    their objects, {bucket: {key: bytes}}, present before the first request."""
    if seed is None:
        server = start_s3_server()
        os.environ.update(server.env)
        return server.proc
    port = free_port()
    with tempfile.NamedTemporaryFile(suffix=".pickle") as f:
        pickle.dump(seed, f)
        f.flush()
        proc = subprocess.Popen([sys.executable, "-c", _SEEDED_SERVER, f.name, str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise RuntimeError(f"seeded moto server did not start within {timeout:.0f} s") from None
                time.sleep(0.2)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **TEST_CREDENTIALS})
    return proc
