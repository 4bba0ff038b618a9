"""Streaming one rank's batches from tar shards or an image folder at any fsspec URL.

The order comes from the pure functions of ``order``: the main process plans the segment a run
resumes in (which may need the history of earlier layouts), and each DataLoader worker derives
the plans of later epochs itself. In a worker, a background thread streams the wanted samples of
each unit in storage order while the worker decodes and augments them in shuffle-buffer order.
Filesystems are created inside the worker that uses them, because s3fs instances do not survive
a fork.

A sample whose image is missing or does not decode is skipped and logged; any other error is a bug
and ends the run with its traceback. A skipped slot repeats one of its batch's good samples; a
batch with none takes the first good samples of its reader's range, so the fill is a function of
the plan, and a resumed run reproduces it. Each rank counts the samples it skipped in its share of
the epoch (under one layout) and fails once they pass ``data.max_skip_fraction`` of that share,
checked batch by batch in plan order, so the same data fails at the same batch every time.

With ``data.labels`` every batch comes with the class labels of its samples, in the same order, a
repeated sample with its label; a decoded sample without a label ends the run naming it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mae_core.data import dataset_size
from mae_core.data.augment import PRETRAINING, UnreadableImage, augment, normalise, sample_rng
from mae_core.data.config import SYNTHETIC_HAS_NO_LABELS, Augmentation, DataConfig
from mae_core.data.order import (
    Layout,
    Segment,
    epoch_items,
    reader_emissions,
    segment_batches,
    segment_items,
    worker_batches,
)
from mae_core.data.readers import FileGroup, Sample, Unit, read_unit
from mae_core.data.sources import Dataset, resolve

log = logging.getLogger(__name__)

PREFETCH_SAMPLES = 256  # read-ahead per worker: enough to hide an object-store round trip behind decoding
SHOWN_SHARDS = 10  # bad shards a skip error names, so it stays one readable line


class DataError(ValueError):
    """Data this run cannot train on; the trainer reports it in one line."""


LABELS_FIX = ("put the images in class sub-folders (pack them into shards with `python -m mae_core.data shard`, "
              "which writes .cls labels), or set data.labels false")


def check_labelled(dataset: Dataset) -> None:
    """Refuse, before reading, data known to lack labels: a manifest or an image folder without
    classes, an image outside the class sub-folders. Shards without a manifest are checked as read."""
    if dataset.num_classes == 0:
        folder = any(isinstance(unit, FileGroup) for unit in dataset.units)
        where = "its images sit in no class sub-folder" if folder else "its manifest.json records no classes"
        raise DataError(f"data.url {dataset.description} holds no class labels ({where}), which data.labels and "
                        f"validation need; {LABELS_FIX}")
    for unit in dataset.units:
        if isinstance(unit, FileGroup) and unit.labels and min(unit.labels) < 0:
            path = unit.paths[unit.labels.index(min(unit.labels))]
            raise DataError(f"{path} in data.url {dataset.description} sits in no class sub-folder, so it has no "
                            "class label, which data.labels and validation need; move it into one, or remove it")


def unlabelled(where: str) -> DataError:
    return DataError(f"data: sample {where} has no class label (no .cls member holding an integer); data.labels "
                     f"needs every sample labelled: {LABELS_FIX}")


def check_label_range(labels: torch.Tensor, ids: list[str], num_classes: int | None) -> None:
    """Labels of a batch within 0..num_classes-1 (only non-negative when the count is unknown)."""
    top = num_classes if num_classes else None
    bad = (labels < 0) | (labels >= top) if top is not None else labels < 0
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        sample = ids[i] if i < len(ids) else "a sample repeated to fill a batch"
        allowed = f"0..{top - 1}, the {top} classes data.url declares" if top is not None else "0 and up"
        raise DataError(f"data: sample {sample} has label {int(labels[i])}, outside {allowed}; fix its .cls "
                        "member, or the manifest's num_classes and classes")


@dataclass(frozen=True)
class _ReaderPlan:
    arrival: np.ndarray  # global item ids of the reader's range, in storage order
    needed: np.ndarray  # positions in ``arrival`` still to emit, in emission order


# (images, ids, units of skipped samples, labels, the unlabelled sample that ends the stream)
_WorkerBatch = tuple[torch.Tensor | None, list[str], list[int], torch.Tensor | None, str | None]


def _reader_plan(items: np.ndarray, layout: Layout, seed: int, epoch: int, segment: int, rank: int, worker: int,
                 consumed: int) -> _ReaderPlan:
    """A reader's part of a segment of which its rank has already had ``consumed`` batches."""
    start, emitted = reader_emissions(len(items), layout, seed, epoch, segment, rank, worker)
    done = worker_batches(consumed, layout.workers, worker) * layout.batch_size
    return _ReaderPlan(items[start : start + len(emitted)], emitted[done:])


class _RankStream(IterableDataset):
    """One rank's batches from the resumed segment on, through all later epochs, endlessly.

    Workers live for the whole run, so epoch boundaries cost no restart and prefetching carries
    on across them. The DataLoader takes its g-th batch from worker g mod n, and a segment's t-th
    batch comes from its reader t mod n; each worker therefore runs, in every segment, the reader
    that lines these up. Every worker derives later epochs' plans itself: pure functions again.
    """

    def __init__(self, units: tuple[Unit, ...], layout: Layout, rank: int, seed: int, input_size: int,
                 retries: int, epoch: int, consumed: int, total: int, plans: list[_ReaderPlan],
                 labels: bool = False, aug: Augmentation = PRETRAINING) -> None:
        self.units, self.layout, self.rank, self.seed = units, layout, rank, seed
        self.input_size, self.retries, self.labels, self.aug = input_size, retries, labels, aug
        self.epoch, self.consumed, self.total, self.plans = epoch, consumed, total, plans
        self.counts = [u.samples for u in units]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])

    def __iter__(self) -> Iterator[_WorkerBatch]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        workers = self.layout.workers
        first = -self.consumed  # the DataLoader batch index of the resumed segment's batch 0
        yield from self._batches(self.plans[(physical - first) % workers], self.epoch)
        first += self.total
        per_epoch = segment_batches(sum(self.counts), self.layout)
        for epoch in itertools.count(self.epoch + 1):
            items = epoch_items(self.counts, self.seed, epoch)
            reader = (physical - first) % workers
            yield from self._batches(_reader_plan(items, self.layout, self.seed, epoch, 0, self.rank, reader, 0),
                                     epoch)
            first += per_epoch

    def _batches(self, plan: _ReaderPlan, epoch: int) -> Iterator[_WorkerBatch]:
        """(images, ids of the batch's decoded samples, unit of each skipped one, labels or None,
        None or the sample without a label that ends the stream); images are None only when nothing
        in the reader's range decodes, or with a sample without a label."""
        if not len(plan.needed):
            return
        unit_of = np.searchsorted(self.offsets, plan.arrival, side="right") - 1
        ordinal_of = plan.arrival - self.offsets[unit_of]
        runs = [(int(u), {int(ordinal_of[p]): int(p) for p in positions})
                for u, positions in itertools.groupby(np.sort(plan.needed), key=lambda p: unit_of[p])]
        arrived: queue.Queue[Any] = queue.Queue(maxsize=PREFETCH_SAMPLES)
        stop = threading.Event()
        threading.Thread(target=self._read, args=(runs, arrived, stop), daemon=True).start()
        pending: dict[int, Sample] = {}
        fallback: list[tuple[np.ndarray, int | None, str]] | None = None
        try:
            for start in range(0, len(plan.needed), self.layout.batch_size):
                images, labels, ids, skipped = [], [], [], []
                for pos in plan.needed[start : start + self.layout.batch_size].tolist():
                    while pos not in pending:
                        item = arrived.get()
                        if isinstance(item, Exception):
                            raise item
                        pending[item[0]] = item[1]
                    sample = pending.pop(pos)
                    unit = int(unit_of[pos])
                    try:
                        images.append(self._decode(sample, epoch))
                    except UnreadableImage as e:
                        log.warning("data: skipped %s in %s: %s", sample.id, self.units[unit].url, e)
                        skipped.append(unit)
                        continue
                    if self.labels and sample.label is None:
                        yield None, ids, skipped, None, f"{sample.id} in {self.units[unit].url}"
                        return
                    ids.append(sample.id)
                    labels.append(sample.label)
                if not images:
                    if fallback is None:
                        fallback = self._first_good(plan, unit_of, ordinal_of, epoch)
                    missing = [where for _, label, where in fallback if label is None] if self.labels else []
                    if missing:
                        yield None, ids, skipped, None, missing[0]
                        return
                    images, labels = [crop for crop, _, _ in fallback], [label for _, label, _ in fallback]
                batch, batch_labels = self._collate(images, labels)
                yield batch, ids, skipped, batch_labels, None
        finally:
            stop.set()

    def _first_good(self, plan: _ReaderPlan, unit_of: np.ndarray, ordinal_of: np.ndarray,
                    epoch: int) -> list[tuple[np.ndarray, int | None, str]]:
        """(crop, label, where) of up to a batch of the first samples of the reader's range, in
        storage order, that decode.

        Read apart from the prefetching thread, since a resumed reader streams only what is left;
        only a batch with no good sample needs them. Their failures were or will be counted in
        their own batches, so they are not counted here.
        """
        good: list[tuple[np.ndarray, int | None, str]] = []
        for u, positions in itertools.groupby(range(len(plan.arrival)), key=lambda p: unit_of[p]):
            unit = self.units[int(u)]
            fs = fsspec.core.url_to_fs(unit.url)[0]
            wanted = {int(ordinal_of[p]) for p in positions}
            for sample in read_unit(unit, fs, wanted, self.retries, labels=self.labels):
                with contextlib.suppress(UnreadableImage):
                    good.append((self._decode(sample, epoch), sample.label, f"{sample.id} in {unit.url}"))
                if len(good) == self.layout.batch_size:
                    return good
        return good

    def _read(self, runs: list[tuple[int, dict[int, int]]], arrived: queue.Queue[Any],
              stop: threading.Event) -> None:
        try:
            for unit_index, positions in runs:
                unit = self.units[unit_index]
                fs = fsspec.core.url_to_fs(unit.url)[0]
                for sample in read_unit(unit, fs, set(positions), self.retries, labels=self.labels):
                    if not _put(arrived, (positions[sample.ordinal], sample), stop):
                        return
            _put(arrived, RuntimeError("data: a reader ended before delivering its plan"), stop)
        except Exception as e:  # handed over so the worker re-raises it instead of waiting forever
            _put(arrived, e, stop)

    def _decode(self, sample: Sample, epoch: int) -> np.ndarray:
        """The sample's augmented crop. Raises UnreadableImage for a missing or undecodable image;
        anything else is a bug and propagates."""
        if sample.data is None:
            raise UnreadableImage(sample.error)
        return augment(sample.data, self.input_size, sample_rng(self.seed, epoch, sample.id), aug=self.aug)

    def _collate(self, images: list[np.ndarray],
                 labels: list[int | None]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(images, labels or None); skipped slots repeat good samples, labels with them, so every
        batch keeps its shape and every rank its batch count."""
        if not images:
            return None, None
        filled = [i % len(images) for i in range(self.layout.batch_size)]
        batch = normalise(np.stack([images[i] for i in filled]))
        return batch, (torch.tensor([labels[i] for i in filled], dtype=torch.int64) if self.labels else None)


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Blocking put that gives up once the consumer has gone."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class StreamingSource:
    """The BatchSource of a rank over tar shards or an image folder; see ``order`` for the plan.

    Iteration yields image batches, or with ``data.labels`` (images, labels) pairs: labels an int64
    tensor of the batch size, label i that of image i. The class names, in label order, are
    ``dataset.classes`` (None when unknown) and their count ``dataset.num_classes``. Images are
    random crops put through ``aug`` (pre-training's unless told).
    """

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world_size: int, seed: int,
                 batches_multiple: int = 1, aug: Augmentation = PRETRAINING) -> None:
        if cfg.url is None:
            if cfg.labels:
                raise ValueError(SYNTHETIC_HAS_NO_LABELS)
            raise ValueError("data.url is None; StreamingSource needs a URL (build_source serves synthetic data)")
        self.cfg, self.rank, self.seed, self.aug = cfg, rank, seed, aug
        self.dataset = resolve(cfg.url, cfg.files_per_read)
        if cfg.labels:
            check_labelled(self.dataset)
        self.layout = Layout(world_size, max(1, cfg.num_workers), batch_size, batches_multiple, cfg.shuffle_buffer)
        samples = self.dataset.samples
        declared = dataset_size(cfg)
        if declared is not None and declared != samples:
            raise ValueError(f"data.num_samples={declared} but data.url {self.dataset.description} holds {samples} "
                             "samples; remove data.num_samples or correct it")
        self.num_samples = samples
        self.batches_per_epoch = segment_batches(samples, self.layout)
        if self.batches_per_epoch == 0:
            raise ValueError(f"data.url {self.dataset.description} holds {samples} samples, fewer than one "
                             f"global batch ({self.layout.global_batch * batches_multiple}); add data or "
                             "lower the batch")
        log.info("data: %d samples in %d units from %s, %d batches per epoch per rank", samples,
                 len(self.dataset.units), self.dataset.description, self.batches_per_epoch)
        self.finished: list[Segment] = []  # earlier segments of this epoch, read under other layouts
        self.epoch, self.batches = 0, 0
        self.skipped = 0  # samples skipped in this rank's share of the current segment, and their units
        self.skipped_units: set[int] = set()

    def __iter__(self) -> Iterator[Any]:
        """Image batches, or (images, labels) with ``data.labels``."""
        for batch, _ in self.iter_with_ids():
            yield batch

    def iter_with_ids(self) -> Iterator[tuple[Any, list[str]]]:
        """Batches, as ``__iter__`` yields them, with the ids of the samples in them (skipped ones and
        their fill left out): the i-th id is the sample of row i. For checks and tools."""
        layout = self.layout
        items = segment_items(self.dataset.counts, self.seed, self.epoch, self.finished)
        total = segment_batches(len(items), layout)
        plans = [_reader_plan(items, layout, self.seed, self.epoch, len(self.finished), self.rank, worker,
                              self.batches) for worker in range(layout.workers)]
        stream = _RankStream(self.dataset.units, layout, self.rank, self.seed, self.cfg.input_size,
                             self.cfg.io_retries, self.epoch, self.batches, total, plans, self.cfg.labels,
                             self.aug)
        left = total - self.batches
        share = total * layout.batch_size  # this rank's samples in the segment
        loader = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers)
        for images, ids, skipped, labels, unlabelled_sample in loader:
            if left == 0:  # this batch opens the next epoch, read as one segment under this layout
                self.epoch, self.finished, self.batches, left = self.epoch + 1, [], 0, self.batches_per_epoch
                self.skipped, self.skipped_units = 0, set()
                share = self.batches_per_epoch * layout.batch_size
            self.batches += 1
            left -= 1
            if unlabelled_sample is not None:
                raise unlabelled(unlabelled_sample)
            self._count_skips(skipped, share)
            if images is None:
                raise DataError(f"data: no sample in a loader worker's share of epoch {self.epoch} on rank "
                                f"{self.rank} decodes, so a batch of unreadable samples has nothing to repeat; "
                                f"they are in {self._bad_shards()}; replace or remove those shards")
            if not self.cfg.labels:
                yield images, ids
            else:
                check_label_range(labels, ids, self.dataset.num_classes)
                yield (images, labels), ids

    def _count_skips(self, units: list[int], share: int) -> None:
        """Counted in the main process in plan order, so the same data fails at the same batch every time."""
        self.skipped += len(units)
        self.skipped_units.update(units)
        limit = self.cfg.max_skip_fraction
        if self.skipped > limit * share:
            raise DataError(f"data: rank {self.rank} skipped {self.skipped} of its {share} samples in epoch "
                            f"{self.epoch} as undecodable, more than data.max_skip_fraction={limit} allows; they "
                            f"are in {self._bad_shards()}; replace or remove those shards, or raise "
                            "data.max_skip_fraction")

    def _bad_shards(self) -> str:
        urls = sorted({self.dataset.units[u].url for u in self.skipped_units})
        more = len(urls) - SHOWN_SHARDS
        return ", ".join(urls[:SHOWN_SHARDS]) + (f" and {more} more" if more > 0 else "")

    def state_dict(self) -> dict[str, Any]:
        segments = [*self.finished, Segment(self.layout, self.batches)]
        return {
            "epoch": self.epoch,
            "consumed": sum(s.batches * s.layout.global_batch for s in segments),
            "segments": [asdict(s.layout) | {"batches": s.batches} for s in segments],
            "seed": self.seed,
            "samples": self.dataset.samples,
            "units": len(self.dataset.units),
            "skipped": self.skipped,
            "skipped_units": sorted(self.skipped_units),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        have = (self.dataset.samples, len(self.dataset.units))
        saved = (int(state["samples"]), int(state["units"]))
        if saved != have:
            raise ValueError(f"data state was saved for {saved[0]} samples in {saved[1]} units but data.url "
                             f"{self.dataset.description} has {have[0]} in {have[1]}; resume with the same "
                             "data.url and data.files_per_read, or start a new run")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']} but this run has seed {self.seed}; "
                             "resume with the same seed, or start a new run")
        names = [f.name for f in fields(Layout)]
        segments = [Segment(Layout(*(int(s[n]) for n in names)), int(s["batches"])) for s in state["segments"]]
        segments = [s for s in segments if s.batches]
        self.epoch = int(state["epoch"])
        if segments and segments[-1].layout == self.layout:
            self.finished, self.batches = segments[:-1], segments[-1].batches
            # .get: states saved before skips were checkpointed have neither key
            self.skipped, self.skipped_units = int(state.get("skipped", 0)), set(state.get("skipped_units", []))
        else:  # another layout reads the rest of the epoch as a new segment, with a count of its own
            self.finished, self.batches = segments, 0
            self.skipped, self.skipped_units = 0, set()

    def metrics(self) -> dict[str, float]:
        return {"data/skipped": float(self.skipped)}
