"""The training curve in object storage: ``<output>/metrics/`` segment files and their one reader.

Importable without torch: the trainer writes through ``MetricsWriter`` (mae_core.metrics), while
tests, benchmarks and the orchestrator read the curve with ``read_records``.

Object stores cannot append, and rewriting one growing file costs more each flush as the run gets
longer. So the records go to segments, each a JSONL object::

    metrics/000003-000012-from-000041200.jsonl
            writer segment    resume step
    tb/events.out.tfevents.000003.000004.maestro      (object stores; locally TensorBoard's own names)

Each attempt of a run is one *writer*, numbered one past the highest writer already stored, so
names order attempts even across machines whose clocks disagree. A writer rewrites its open
segment on every flush until the segment holds ``segment_bytes``, then starts the next one: a
flush uploads at most about ``segment_bytes``, however long the run, and a 500k-step run keeps a
few hundred files. Nothing is ever rewritten once closed, nor deleted.

A resumed attempt recomputes the steps after its checkpoint, so its records replace the earlier
writers' records past its resume step. The reader applies that rule in writer order; the history
stays as written. A writer stores its first segment, empty, when it starts, so the cut shows at
once. Two attempts resuming from the same step each cut at that step; an attempt that died before
it started writing left no segment and so cuts nothing, and the next one cuts for it.

TensorBoard's event files follow the same scheme on object stores (see ``MetricsWriter``); it
reads every file of ``tb/`` in name order as one run, and each writer's first file purges the
steps past its resume step, so TensorBoard shows the same clean curve.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from mae_core import storage

METRICS_DIR = "metrics"
TB_DIR = "tb"
# 16 KiB holds ~85 records of ~195 bytes: ~300 segments for a 500k-step run logged every 20 steps,
# and a flush uploads 8 KiB on average (benchmarks/registry_traffic.py).
SEGMENT_BYTES = 16 * 1024

_NAME = re.compile(r"^(\d+)-(\d+)-from-(\d+)\.jsonl$")


@dataclass(frozen=True, order=True)
class Segment:
    writer: int
    index: int
    resume_step: int

    @property
    def name(self) -> str:
        return f"{self.writer:06d}-{self.index:06d}-from-{self.resume_step:09d}.jsonl"

    @classmethod
    def parse(cls, name: str) -> Segment | None:
        found = _NAME.match(name)
        return cls(*map(int, found.groups())) if found else None


def metrics_url(output: str) -> str:
    return storage.join(output, METRICS_DIR)


def tb_event_name(writer: int, index: int) -> str:
    """An uploaded TensorBoard event file: "tfevents" makes TensorBoard read it, and the zero-padded
    numbers make its name order (the order TensorBoard reads in) the order of writing."""
    return f"events.out.tfevents.{writer:06d}.{index:06d}.maestro"


def _listed(output: str) -> list[tuple[Segment, str]]:
    """Every segment under ``output`` in writer order, with its path in its filesystem."""
    found = []
    for entry in storage.listdir(metrics_url(output)):
        segment = Segment.parse(entry["name"].rstrip("/").rsplit("/", 1)[-1])
        if segment is not None:
            found.append((segment, entry["name"]))
    return sorted(found)


def next_writer(output: str) -> int:
    """The number of a new attempt's writer: one past every writer that has flushed."""
    return max((segment.writer for segment, _ in _listed(output)), default=0) + 1


def read_records(output: str) -> list[dict[str, Any]]:
    """The run's clean curve: every record, with each writer's records replacing earlier writers'
    records past its resume step, in step order."""
    listed = _listed(output)
    fs, _ = storage.filesystem(metrics_url(output))
    bodies = fs.cat([path for _, path in listed]) if listed else {}  # concurrent GETs on object stores
    records: list[dict[str, Any]] = []
    writer = None
    for segment, path in listed:
        if segment.writer != writer:
            writer = segment.writer
            records = [r for r in records if r["step"] <= segment.resume_step]
        records.extend(json.loads(line) for line in bodies[path].splitlines())
    return records


class SegmentWriter:
    """One attempt's records: ``append`` buffers, ``flush`` uploads the open segment (one PUT).

    It writes its first segment, empty, at once: that claims its writer number and hides the
    earlier records past ``resume_step`` from readers from the start of the attempt, not from its
    first flush.
    """

    def __init__(self, output: str, resume_step: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.output, self.segment_bytes = output, segment_bytes
        self.segment = Segment(next_writer(output), 0, resume_step)
        self._lines: list[bytes] = []
        self._size = 0
        self._dirty = True
        self.flush()

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode()
        self._lines.append(line)
        self._size += len(line)
        self._dirty = True

    def flush(self) -> None:
        if not self._dirty:
            return
        storage.write_bytes(storage.join(metrics_url(self.output), self.segment.name), b"".join(self._lines))
        self._dirty = False
        if self._size >= self.segment_bytes:
            s = self.segment
            self.segment = Segment(s.writer, s.index + 1, s.resume_step)
            self._lines, self._size = [], 0
