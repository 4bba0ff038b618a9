"""Packing images into WebDataset tar shards at any fsspec URL, indexed by a manifest.json.

Shards are built in memory and uploaded by a thread pool while the next one fills; the manifest is
written last, so a half-finished upload is never mistaken for a dataset.
"""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import fsspec

from mae_core.data.sources import MANIFEST, list_images

Progress = Callable[[int, int, int], None]  # (samples done, samples in all, bytes of the last sample)

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_BLOCK = 512  # tar header and padding unit
_READ_BATCH = 64  # source files fetched per request batch (concurrently on object stores)


def parse_size(text: str) -> int:
    """'256MB' -> 256_000_000, '16MiB' -> 16_777_216, '4096' -> 4096."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"size {text!r} is not a size; write it like 256MB, 64MiB or 1000000")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def sample_key(path: str) -> tuple[str, str]:
    """(WebDataset key, lower-case extension) of a relative image path; dots in the file stem become
    underscores because a member's key ends at its first dot."""
    folder, _, base = path.rpartition("/")
    stem, _, ext = base.rpartition(".")
    stem = stem.replace(".", "_")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class ShardWriter:
    """Samples in, ``<prefix>-NNNNNN.tar`` shards of at most ``shard_bytes`` (or one sample) out.

    The manifest records ``classes`` (names in label order) and ``num_classes``: the names' count,
    or without names one more than the largest label written (0: no sample has a label).
    """

    def __init__(self, dest: str, shard_bytes: int, prefix: str = "train", jobs: int = 4,
                 classes: Sequence[str] = ()) -> None:
        self.fs, root = fsspec.core.url_to_fs(dest)
        self.root = root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)
        self.shard_bytes, self.prefix, self.jobs, self.classes = shard_bytes, prefix, jobs, list(classes)
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.uploads: list[Future[Any]] = []
        self.shards: list[dict[str, Any]] = []
        self.buffer = io.BytesIO()
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.top_label = -1  # the largest label written
        self.manifest: dict[str, Any] = {}

    def add(self, key: str, ext: str, data: bytes, label: int | None = None) -> None:
        members = [(f"{key}.{ext}", data)]
        if label is not None:
            if label < 0 or (self.classes and label >= len(self.classes)):
                allowed = f"0..{len(self.classes) - 1}, the classes given" if self.classes else "0 and up"
                raise ValueError(f"sample {key}: label {label} is outside {allowed}")
            self.top_label = max(self.top_label, label)
            members.append((f"{key}.cls", str(label).encode()))
        size = sum(_BLOCK + -(-len(d) // _BLOCK) * _BLOCK for _, d in members)
        # A closed tar ends with two empty blocks, padded to whole 10 KiB records.
        closed = -(-(self.buffer.tell() + size + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
        if self.tar is not None and closed > self.shard_bytes:
            self._flush()
        if self.tar is None:
            self.buffer = io.BytesIO()
            self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.USTAR_FORMAT)
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(payload), 0o644
            self.tar.addfile(info, io.BytesIO(payload))
        self.count += 1

    def _flush(self) -> None:
        assert self.tar is not None
        self.tar.close()
        data = self.buffer.getvalue()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.shards.append({"name": name, "samples": self.count, "bytes": len(data)})
        self.tar, self.count = None, 0
        # Bounded in flight: memory stays at ``jobs`` shards however many there are.
        while len(self.uploads) >= self.jobs:
            self.uploads.pop(0).result()
        self.uploads.append(self.pool.submit(self.fs.pipe_file, f"{self.root}/{name}", data))

    def close(self) -> dict[str, Any]:
        if self.tar is not None:
            self._flush()
        for upload in self.uploads:
            upload.result()
        self.pool.shutdown()
        self.manifest = {
            "format": "webdataset",
            "samples": sum(s["samples"] for s in self.shards),
            "bytes": sum(s["bytes"] for s in self.shards),
            "num_classes": len(self.classes) if self.classes else self.top_label + 1,
            "classes": self.classes,
            "shards": self.shards,
        }
        self.fs.pipe_file(f"{self.root}/{MANIFEST}", json.dumps(self.manifest, indent=1).encode())
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:  # leave no manifest behind a failed run
            self.pool.shutdown(cancel_futures=True)


def shard_folder(src: str, dest: str, shard_bytes: int, prefix: str = "train", seed: int = 0, jobs: int = 4,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Pack an image folder (class sub-folders become ``.cls`` labels, their sorted names the manifest's
    ``classes`` in label order, and their count its ``num_classes``) into shards; returns the manifest.

    Samples are shuffled once here: a reader's shuffle buffer mixes only within a shard's
    neighbourhood, so shards must not hold one class each.
    """
    fs, root, images, classes = list_images(src)
    label_of = {name: index for index, name in enumerate(classes)}
    keys: dict[str, str] = {}
    for path in images:
        key = sample_key(path)[0]
        if key in keys:
            raise ValueError(f"{src}: {keys[key]} and {path} both become sample key {key}; rename one")
        keys[key] = path
    random.Random(seed).shuffle(images)
    done = 0
    with ShardWriter(dest, shard_bytes, prefix, jobs, classes) as writer:
        for start in range(0, len(images), _READ_BATCH):
            batch = images[start : start + _READ_BATCH]
            fetched = fs.cat([f"{root}/{p}" for p in batch])
            for path in batch:
                data = fetched[f"{root}/{path}"]
                key, ext = sample_key(path)
                writer.add(key, ext, data, label_of.get(path.split("/", 1)[0]) if "/" in path else None)
                done += 1
                if progress is not None:
                    progress(done, len(images), len(data))
    return writer.manifest
