"""Which sample every reader delivers, and when: pure functions of the seed, the epoch and the layout.

An epoch starts from one global item sequence: the units (shards) in a seeded permutation, each
unit's samples in storage order, so every reader streams whole runs of a unit. A *segment* is a
stretch of the epoch read under one layout (world size, readers per rank, batch size). It cuts its
sequence into equal contiguous ranges, one per reader, rank-major; each reader emits its range
through a seeded shuffle buffer and batches the emissions. Ranks take their readers' batches
round-robin, as a DataLoader does, and whatever does not fill a whole number of batches on every
rank (drop-last, rounded to the accumulation multiple) is left out.

A resume under the same layout replays the same plan and skips what was consumed. A resume under
another layout starts a new segment over the items not yet consumed, in their old order, so no
sample of the epoch is seen twice and none is skipped beyond the last segment's drop-last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_MASK64 = 2**64 - 1


@dataclass(frozen=True)
class Layout:
    """Everything besides the seed and the epoch that decides a segment's plan."""

    world_size: int
    workers: int  # readers per rank: the DataLoader workers, or 1 without workers
    batch_size: int  # per rank
    multiple: int  # batches per rank per segment are a multiple of this (gradient accumulation)
    buffer: int  # shuffle-buffer slots per reader

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size


@dataclass(frozen=True)
class Segment:
    layout: Layout
    batches: int  # batches every rank has consumed in this segment


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([e & _MASK64 for e in entropy])


def epoch_items(counts: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """Global item ids (unit offset + ordinal) of the epoch, units in a seeded order."""
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    order = _rng(seed, epoch).permutation(len(counts))
    if not len(order):
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(offsets[u], offsets[u + 1], dtype=np.int64) for u in order])


def segment_batches(num_items: int, layout: Layout) -> int:
    """Batches per rank a segment of ``num_items`` yields: drop-last, a multiple of ``layout.multiple``."""
    return num_items // layout.global_batch // layout.multiple * layout.multiple


def worker_batches(rank_batches: int, workers: int, worker: int) -> int:
    """How many of a rank's first ``rank_batches`` batches come from ``worker`` (round-robin)."""
    return rank_batches // workers + (1 if worker < rank_batches % workers else 0)


def reader_range(num_items: int, layout: Layout, rank: int, worker: int) -> tuple[int, int]:
    """The slice of the segment's sequence one reader delivers."""
    total = segment_batches(num_items, layout)
    before = sum(worker_batches(total, layout.workers, w) for w in range(worker))
    start = (rank * total + before) * layout.batch_size
    return start, start + worker_batches(total, layout.workers, worker) * layout.batch_size


def emission_order(length: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..length-1 in the order a ``buffer``-slot shuffle buffer emits them when fed in order.

    Position t of the output is emitted once position t + buffer has arrived, so a reader that
    streams its range holds at most ``buffer`` samples.
    """
    slots = list(range(min(buffer, length)))
    out: list[int] = []
    draws = rng.integers(0, len(slots), size=length - len(slots)).tolist() if slots else []
    for incoming, j in zip(range(len(slots), length), draws, strict=True):
        out.append(slots[j])
        slots[j] = incoming
    out.extend(slots[i] for i in rng.permutation(len(slots)).tolist())
    return np.asarray(out, dtype=np.int64)


def reader_emissions(num_items: int, layout: Layout, seed: int, epoch: int, segment: int, rank: int,
                     worker: int) -> tuple[int, np.ndarray]:
    """(range start, emission order within the range) of one reader of one segment."""
    start, stop = reader_range(num_items, layout, rank, worker)
    rng = _rng(seed, epoch, segment, rank * layout.workers + worker)
    return start, emission_order(stop - start, layout.buffer, rng)


def remaining_items(items: np.ndarray, segment: Segment, seed: int, epoch: int, index: int) -> np.ndarray:
    """The items of a segment's sequence that its first ``segment.batches`` batches per rank left."""
    layout = segment.layout
    taken = np.zeros(len(items), dtype=bool)
    for rank in range(layout.world_size):
        for worker in range(layout.workers):
            done = worker_batches(segment.batches, layout.workers, worker) * layout.batch_size
            start, emitted = reader_emissions(len(items), layout, seed, epoch, index, rank, worker)
            taken[start + emitted[:done]] = True
    return items[~taken]


def segment_items(counts: Sequence[int], seed: int, epoch: int, finished: Sequence[Segment]) -> np.ndarray:
    """The item sequence the segment after ``finished`` reads: the epoch's, minus what they consumed."""
    items = epoch_items(counts, seed, epoch)
    for index, segment in enumerate(finished):
        items = remaining_items(items, segment, seed, epoch, index)
    return items
