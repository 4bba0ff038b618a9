"""Requests and bytes a training run sends to its bucket, outside checkpoint data: they must not
grow with the run (target: at most 100 requests per run-hour at the default settings).

A run of 499,200 steps lasts weeks over 100+ attempts, so any cost that grows with the step count
(a file rewritten whole at each flush) ends up dominating. This script simulates one attempt's
metadata traffic, without a model, against a moto S3 server (``orchestrator.testing``) behind a
counting HTTP proxy that sees every request the clients send (retries and listings included):

- trainer side: the real ``mae_core.metrics.MetricsWriter`` (metrics segments, TensorBoard event
  files, progress.json), fed a record every ``metrics.log_interval`` steps as ``mae_core.train``
  does, with realistic values, and flushed by its own timer (``metrics.flush_s``) and at every
  checkpoint (every ``--checkpoint-min``, as ``save`` does; the checkpoint data itself is not
  simulated);
- runner side: the real ``orchestrator.runner.AttemptWatch`` polled every 2 s as a runner does:
  cancel check every ``REGISTRY_POLL_S``, the log's new bytes (one line per record) and the hang
  check every ``UPLOAD_S``.

Time is simulated: step k happens at k x ``--step-s`` seconds, and the ``time`` module that
``mae_core.metrics`` and ``orchestrator.runner`` see is replaced by one whose ``monotonic`` is
that clock (wall time stays real), so timers fire as they would in a real run, and 100k steps
take a minute instead of a day. The default step time, 2.4 s, spreads 499,200 steps over two weeks.

For 1k, 10k and 100k steps it prints requests and uploaded bytes per metrics flush, their ratio
100k/1k (flat: about 1), what rewriting the stored metrics and TensorBoard files whole would upload
per flush at the end, and requests per run-hour.

    python benchmarks/registry_traffic.py [--steps 1000 10000 100000] [--step-s 2.4] [--checkpoint-min 30]
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common import start_moto

from mae_core import metrics as metrics_module
from mae_core import storage
from mae_core.config import MetricsConfig
from mae_core.metrics import MetricsWriter
from mae_core.metrics_log import METRICS_DIR, TB_DIR
from orchestrator import runner
from orchestrator.registry import Registry, RunState

TOTAL_STEPS = 499_200  # jobs/vit_huge_1600ep.yaml: 312 steps/epoch x 1600 epochs
TARGET_PER_HOUR = 100
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


class Counts:
    """Requests and body bytes (up: request bodies, down: response bodies) seen by the proxy."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # by method
        self.up = self.down = 0
        self.lock = threading.Lock()

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return sum(self.requests.values()), self.up, self.down

    def by_method(self) -> Counter[str]:
        with self.lock:
            return Counter(self.requests)


class CountingProxy:
    """An HTTP proxy on loopback that forwards every request to ``upstream`` and counts it."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        counts = self.counts = Counts()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients use it

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    body = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return body
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def _forward(self) -> None:
                body = self._body()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                with counts.lock:
                    counts.requests[self.command] += 1
                    counts.up += len(body)
                    counts.down += len(data)
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in HOP_BY_HOP and not (key.lower() == "content-length" and
                                                              self.command != "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


class SimClock:
    """A ``time`` module stand-in: ``monotonic`` is the simulated clock, the rest is real."""

    def __init__(self) -> None:
        self.now = 0.0
        self.module = types.SimpleNamespace(monotonic=lambda: self.now, time=time.time,
                                            perf_counter=time.perf_counter, sleep=time.sleep)


def record(step: int, rng: random.Random) -> dict[str, float]:
    """The trainer's record (mae_core.train), with values as long as real ones."""
    return {"loss": 0.4 + rng.random(), "lr": 2.4e-3 * rng.random(), "grad_norm": rng.random(),
            "img_s": 7000 + 1000 * rng.random(), "epoch": step // 312, "data/skipped": 0.0}


def simulate(root: str, steps: int, step_s: float, checkpoint_s: float, counts: Counts) -> dict[str, Any]:
    """One attempt of ``steps`` steps; returns its counted traffic."""
    cfg = MetricsConfig()
    clock = SimClock()
    metrics_module.time = clock.module  # type: ignore[assignment]
    runner.time = clock.module  # type: ignore[assignment]
    registry = Registry(root)
    state = RunState(experiment="traffic", run_id=f"steps-{steps}", status="running", attempts=1)
    output = registry.run_url(state.experiment, state.run_id)
    rng = random.Random(steps)
    flushes: list[tuple[int, int]] = []  # (requests, bytes up) of each metrics flush
    trainer = [0, 0]
    runner_requests: Counter[str] = Counter()  # by method
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "train.log"
        log_path.touch()
        start = counts.snapshot()
        writer = MetricsWriter(output, enabled=True, flush_s=cfg.flush_s)
        flush = writer.flush

        def counted_flush() -> None:
            before = counts.snapshot()
            flush()
            after = counts.snapshot()
            if after[0] > before[0]:
                flushes.append((after[0] - before[0], after[1] - before[1]))

        writer.flush = counted_flush  # type: ignore[method-assign]
        watch = runner.AttemptWatch(registry, state, log_path)
        proc = subprocess.Popen(["true"])  # the watch signals it only on cancel or hang: neither happens
        next_checkpoint, next_poll = checkpoint_s, 0.0
        with log_path.open("a") as log:
            for step in range(1, steps + 1):
                clock.now = step * step_s
                checkpoint = clock.now >= next_checkpoint
                before = counts.snapshot()
                if step % cfg.log_interval == 0 or checkpoint or step == steps:
                    values = record(step, rng)
                    writer.log(step, values)
                    log.write(f"2025-01-01 00:00:00,000 mae_core.train: step {step}/{TOTAL_STEPS} loss "
                              f"{values['loss']:.4f} lr {values['lr']:.3g} {values['img_s']:.1f} img/s\n")
                    log.flush()
                if checkpoint:
                    next_checkpoint += checkpoint_s
                    writer.flush()
                after = counts.snapshot()
                trainer[0] += after[0] - before[0]
                trainer[1] += after[1] - before[1]
                while clock.now >= next_poll:  # the runner looks every POLL_S, between steps
                    methods = counts.by_method()
                    watch.poll(proc)
                    runner_requests += counts.by_method() - methods
                    next_poll += runner.POLL_S
        writer.close()
        proc.wait()
    end = counts.snapshot()
    hours = steps * step_s / 3600
    stored = {d: storage.listdir(storage.join(output, d)) for d in (METRICS_DIR, TB_DIR)}
    return {
        "steps": steps, "hours": hours, "flushes": len(flushes),
        "req_per_flush": sum(r for r, _ in flushes) / len(flushes),
        "kb_per_flush": sum(b for _, b in flushes) / len(flushes) / 1024,
        "max_kb_per_flush": max(b for _, b in flushes) / 1024,
        "whole_kb": sum(e["size"] for entries in stored.values() for e in entries) / 1024,
        "files": sum(len(entries) for entries in stored.values()),
        "trainer_per_hour": trainer[0] / hours, "runner_per_hour": runner_requests.total() / hours,
        "runner_methods": {m: n / hours for m, n in sorted(runner_requests.items())},
        "per_hour": (end[0] - start[0]) / hours, "up_kb": (end[1] - start[1]) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--step-s", type=float, default=2.4, help="simulated seconds per step")
    parser.add_argument("--checkpoint-min", type=float, default=30.0,
                        help="simulated minutes between checkpoints (jobs/vit_huge_1600ep.yaml: 30)")
    args = parser.parse_args()
    moto = start_moto()
    proxy = CountingProxy(os.environ["AWS_ENDPOINT_URL"])
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint  # every client below goes through the proxy
    try:
        import s3fs

        s3fs.S3FileSystem().mkdir("traffic")
        results = [simulate(f"s3://traffic/run-{n}", n, args.step_s, args.checkpoint_min * 60, proxy.counts)
                   for n in args.steps]
    finally:
        proxy.stop()
        moto.terminate()
        moto.wait()
    cfg = MetricsConfig()
    print(f"simulated attempt, {args.step_s} s/step, checkpoint every {args.checkpoint_min:g} min; "
          f"metrics.log_interval={cfg.log_interval}, metrics.flush_s={cfg.flush_s:g}; runner "
          f"REGISTRY_POLL_S={runner.REGISTRY_POLL_S:g}, UPLOAD_S={runner.UPLOAD_S:g}; moto S3 behind a counting proxy")
    print(f"{'steps':>8} {'run h':>6} {'flushes':>7} {'req/flush':>9} {'KiB/flush':>9} {'max KiB':>8} "
          f"{'whole KiB':>9} {'files':>5} {'trainer/h':>9} {'runner/h':>8} {'req/run-h':>9}")
    for r in results:
        print(f"{r['steps']:>8} {r['hours']:>6.1f} {r['flushes']:>7} {r['req_per_flush']:>9.2f} "
              f"{r['kb_per_flush']:>9.1f} {r['max_kb_per_flush']:>8.1f} {r['whole_kb']:>9.0f} {r['files']:>5} "
              f"{r['trainer_per_hour']:>9.1f} {r['runner_per_hour']:>8.1f} {r['per_hour']:>9.1f}")
    first, last = results[0], results[-1]
    print(f"ratio {last['steps']}/{first['steps']} steps: "
          f"requests/flush {last['req_per_flush'] / first['req_per_flush']:.2f}, "
          f"KiB/flush {last['kb_per_flush'] / first['kb_per_flush']:.2f}; a whole-file rewrite would upload "
          f"{last['whole_kb'] / first['whole_kb']:.0f}x more per flush")
    print("runner requests per run-hour by method: "
          + ", ".join(f"{m} {n:.1f}" for m, n in last["runner_methods"].items()))
    per_hour = last["per_hour"]
    print(f"requests per run-hour at {last['steps']} steps: {per_hour:.1f} (target <= {TARGET_PER_HOUR}): "
          f"{'OK' if per_hour <= TARGET_PER_HOUR else 'OVER'}")
    return 0 if per_hour <= TARGET_PER_HOUR and math.isfinite(per_hour) else 1


if __name__ == "__main__":
    sys.exit(main())
