"""Metrics traffic does not grow with the run, and readers see one clean curve across attempts.

The writers here are driven directly (no model): ``log`` then ``flush`` stand for training steps
and the flush timer. Uploads to S3 are counted at s3fs's one call per request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import s3fs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trainer_runs import TINY, launch

from mae_core import storage
from mae_core.config import MetricsConfig
from mae_core.metrics import MetricsWriter
from mae_core.metrics_log import METRICS_DIR, TB_DIR, read_records
from mae_core.progress import read_progress
from orchestrator.spec import validate

SEGMENT, TB_SEGMENT = 2048, 4096
NEVER = 1e9  # flush_s: only explicit flushes


@dataclass
class Put:
    key: str
    size: int


@pytest.fixture
def puts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Put]]:
    """Every PutObject s3fs sends (each request goes through ``_call_s3``), with its body size."""
    seen: list[Put] = []
    call = s3fs.S3FileSystem._call_s3

    async def counting(self: s3fs.S3FileSystem, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "put_object":
            seen.append(Put(kwargs["Key"], len(kwargs["Body"])))
        return await call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    yield seen


def writer(output: str, resume_step: int = 0) -> MetricsWriter:
    return MetricsWriter(output, enabled=True, flush_s=NEVER, resume_step=resume_step,
                         segment_bytes=SEGMENT, tb_segment_bytes=TB_SEGMENT)


def record(step: int, attempt: int) -> dict[str, float]:
    """A record that says which attempt wrote it."""
    return {"loss": attempt + step / 1000, "lr": 1e-3, "grad_norm": 0.5, "img_s": 100.0 + step}


def curve(output: str) -> list[tuple[int, int]]:
    return [(r["step"], int(r["loss"])) for r in read_records(output)]


def tb_curve(logdir: Path) -> list[tuple[int, int]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, int(e.value)) for e in acc.Scalars("loss")]


def download_tb(output: str, to: Path) -> Path:
    fs, path = storage.filesystem(storage.join(output, TB_DIR))
    fs.invalidate_cache(path)
    fs.get(f"{path}/", str(to), recursive=True)
    return to


def test_flush_uploads_stay_bounded_as_the_run_grows(s3_bucket: str, puts: list[Put]) -> None:
    output = f"{s3_bucket}/run"
    w = writer(output)
    per_flush: list[list[Put]] = []
    for step in range(1, 301):
        w.log(step, record(step, 1))
        before = len(puts)
        w.flush()
        per_flush.append(puts[before:])
    w.close()

    # Each flush: the open metrics segment, the open TensorBoard file, progress.json.
    assert all(len(p) == 3 for p in per_flush)
    sizes = [sum(p.size for p in flush) for flush in per_flush]
    bound = SEGMENT + TB_SEGMENT + 1024  # each file closes past its size, by at most one flush's records
    assert max(sizes) <= bound
    # Flat: late flushes cost what early ones do (a file rewritten whole would grow 6x from 50 to 300).
    early, late = sum(sizes[50:100]) / 50, sum(sizes[250:300]) / 50
    assert 0.7 < late / early < 1.4
    # While the files stay few: a whole segment per SEGMENT bytes of records.
    stored = storage.listdir(storage.join(output, METRICS_DIR))
    assert len(stored) <= sum(e["size"] for e in stored) // SEGMENT + 1
    assert [r["step"] for r in read_records(output)] == list(range(1, 301))


def test_tensorboard_files_on_object_storage_are_not_reuploaded_whole(
        s3_bucket: str, puts: list[Put], tmp_path: Path) -> None:
    output = f"{s3_bucket}/run"
    w = writer(output)
    for step in range(1, 301):
        w.log(step, record(step, 1))
        w.flush()
    w.close()
    tb = [p for p in puts if f"/{TB_DIR}/" in p.key]
    stored = {e["name"]: e["size"] for e in storage.listdir(storage.join(output, TB_DIR))}
    # The event files hold several times what one upload may carry, yet no upload carries more.
    assert sum(stored.values()) > 5 * TB_SEGMENT and len(stored) > 5
    assert max(p.size for p in tb) <= TB_SEGMENT + 1024
    # TensorBoard reads the rolled files as one run: every step once, in order.
    assert tb_curve(download_tb(output, tmp_path / "tb")) == [(s, 1) for s in range(1, 301)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resumed_attempts_show_one_clean_curve(tmp_path: Path, request: pytest.FixtureRequest, where: str) -> None:
    output = str(tmp_path / "run") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/run"

    def start(resume: int) -> MetricsWriter:
        if where == "local":
            time.sleep(1.05)  # TensorBoard names local event files by the second they are opened
        return writer(output, resume)

    def log(w: MetricsWriter, attempt: int, steps: range) -> None:
        for step in steps:
            w.log(step, record(step, attempt))

    first = start(0)
    log(first, 1, range(1, 31))
    first.flush()  # checkpoint at 20, flushed at 30, then it dies
    second = start(20)
    # The steps past the checkpoint disappear as soon as the next attempt starts...
    assert curve(output) == [(s, 1) for s in range(1, 21)]
    log(second, 2, range(21, 26))
    second.flush()
    log(second, 2, range(26, 28))  # ...its own records follow; it dies at 27, flushed until 25.
    assert curve(output) == [(s, 1) for s in range(1, 21)] + [(s, 2) for s in range(21, 26)]
    # Two more attempts from the same checkpoint; the first of them dies before its first flush.
    log(start(20), 3, range(21, 24))
    fourth = start(20)
    log(fourth, 4, range(21, 41))
    fourth.close()
    expected = [(s, 1) for s in range(1, 21)] + [(s, 4) for s in range(21, 41)]
    assert curve(output) == expected
    fifth = start(40)
    log(fifth, 5, range(41, 46))
    fifth.close()
    expected += [(s, 5) for s in range(41, 46)]
    assert curve(output) == expected
    # With no checkpoint left, an attempt starts over: nothing earlier remains on the curve.
    sixth = start(0)
    log(sixth, 6, range(1, 4))
    sixth.close()
    expected = [(s, 6) for s in range(1, 4)]
    assert curve(output) == expected

    logdir = tmp_path / "run" / TB_DIR if where == "local" else download_tb(output, tmp_path / "tb")
    assert tb_curve(logdir) == expected


def test_progress_json_reflects_the_last_flush(tmp_path: Path) -> None:
    output = str(tmp_path / "run")
    w = writer(output)
    assert read_progress(output) is None
    w.log(1, record(1, 1))
    w.log(2, {**record(2, 1), "loss": 0.25})
    w.flush()
    progress = read_progress(output)
    assert progress is not None and progress["step"] == 2 and progress["loss"] == 0.25
    assert progress["lr"] == 1e-3 and progress["img_s"] == 102.0 and time.time() - progress["heartbeat"] < 60
    w.log(3, record(3, 1))  # not flushed yet: progress names only stored records
    assert read_progress(output) == progress
    w.close()
    assert read_progress(output)["step"] == 3  # type: ignore[index]
    # With a short flush_s, logging flushes by itself.
    timed = MetricsWriter(output, enabled=True, flush_s=0.0, resume_step=3)
    timed.log(4, record(4, 2))
    assert read_progress(output)["step"] == 4  # type: ignore[index]
    timed.close()


def test_spec_metrics_section_reaches_the_trainer(tmp_path: Path) -> None:
    spec = validate({"name": "m", "seed": TINY["seed"], "model": TINY["model"], "data": TINY["data"],
                     "optim": TINY["optim"], "resources": {"per_device_batch": 16},
                     "runtime": {"threads": 1}, "checkpoint": {"interval_steps": 4},
                     "metrics": {"log_interval": 3, "flush_s": 30}}, "spec")
    output = str(tmp_path / "run")
    cfg = spec.train_config(output)
    assert cfg.metrics == MetricsConfig(log_interval=3, flush_s=30.0)
    path = tmp_path / "train.yaml"
    path.write_text(cfg.to_yaml())
    proc = launch(path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Every 3rd step, plus the attempt's first step (its start, for goodput), the checkpoint steps
    # (4, 8) and the last (8): a resume point is on the curve.
    assert [r["step"] for r in read_records(output)] == [1, 3, 4, 6, 8]
    assert read_progress(output)["step"] == 8  # type: ignore[index]

