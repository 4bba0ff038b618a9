"""Reading the raw samples of one read unit (a tar shard or a group of image files), with retries.

A unit's samples are numbered by ordinal: in a tar, the n-th key (WebDataset layout) that has an
image member; in a file group, the n-th file. Readers fetch only the ordinals they are asked for.

Class labels, read only when asked for: in a tar, the integer in the sample's ``.cls`` member (one
of the members adjacent to its image under the same key, before or after it); in a file group, the
index of the image's class sub-folder, which the group carries.
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import IO, Any

from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Sequential ranged GETs of this size: one request per 16 MiB keeps per-request cost negligible
# while a 256 MiB shard is never held in memory whole.
STREAM_BLOCK = 16 * 2**20
# Errors that another attempt cannot fix: the data itself is missing, forbidden or corrupt.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, tarfile.TarError,
             EOFError)


@dataclass(frozen=True)
class Sample:
    ordinal: int
    id: str  # unique within the dataset; seeds the sample's augmentation
    data: bytes | None  # None when unreadable, with the reason in ``error``
    error: str | None = None
    label: int | None = None  # the class label, when asked for and the sample has one


def split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the path up to the first dot of the file name, the rest the field."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def image_members(tar: tarfile.TarFile) -> Iterator[tuple[int, str, tarfile.TarInfo]]:
    """(ordinal, key, member) of each sample's first image member, in tar order."""
    ordinal, previous = -1, None
    for member in tar:
        if not member.isfile():
            continue
        key, ext = split_member(member.name)
        # A sample's members are adjacent; a second image under the same key is another field.
        if ext not in IMAGE_EXTS or key == previous:
            continue
        ordinal, previous = ordinal + 1, key
        yield ordinal, key, member


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    extracted = tar.extractfile(member)
    if extracted is None:
        return None
    try:
        return extracted.read()
    except (tarfile.TarError, EOFError) as e:
        raise tarfile.ReadError(f"{e} in {member.name}") from e


def parse_label(data: bytes | None) -> int | None:
    """A ``.cls`` member's integer; None when it holds none."""
    try:
        return int(data) if data is not None else None
    except ValueError:
        return None


def tar_samples(fileobj: IO[bytes], wanted: Container[int], last: int,
                labels: bool = False) -> Iterator[tuple[int, str, bytes, int | None]]:
    """(ordinal, key, image bytes, label) of the wanted samples of a tar stream; stops after ordinal
    ``last`` without reading further. Without ``labels`` the label is None and no ``.cls`` is read."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        if labels:
            yield from _labelled_samples(tar, wanted, last)
            return
        for ordinal, key, member in image_members(tar):
            if ordinal in wanted:
                data = _read_member(tar, member)
                if data is not None:
                    yield ordinal, key, data, None
            if ordinal >= last:
                return


def _labelled_samples(tar: tarfile.TarFile, wanted: Container[int],
                      last: int) -> Iterator[tuple[int, str, bytes, int | None]]:
    """``tar_samples`` with each sample's ``.cls``: the same ordinals as ``image_members``; a sample
    is complete, and yielded, at the first member under another key (or the end of the tar)."""
    ordinal, previous = -1, None
    current: list[Any] | None = None  # [ordinal, key, data, label] of the wanted sample being read
    early: tuple[str, int | None] | None = None  # a .cls met before its sample's image
    for member in tar:
        if not member.isfile():
            continue
        key, ext = split_member(member.name)
        if current is not None and key != current[1]:
            yield current[0], current[1], current[2], current[3]
            current = None
            if ordinal >= last:
                return
        if early is not None and early[0] != key:
            early = None
        if ext in IMAGE_EXTS and key != previous:
            ordinal, previous = ordinal + 1, key
            if ordinal in wanted:
                data = _read_member(tar, member)
                if data is not None:
                    current = [ordinal, key, data, early[1] if early is not None else None]
            early = None
            if current is None and ordinal >= last:
                return
        elif ext == "cls":
            if current is not None:  # same key, by the check above
                current[3] = parse_label(_read_member(tar, member))
            elif key != previous:
                early = key, parse_label(_read_member(tar, member))
    if current is not None:
        yield current[0], current[1], current[2], current[3]


def count_tar_samples(fs: AbstractFileSystem, url: str) -> int:
    """Samples in a tar, from its headers alone (data is seeked over); a damaged tail ends the count."""
    count = 0
    with fs.open(url, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tar:
                for ordinal, _, _ in image_members(tar):
                    count = ordinal + 1
        except (tarfile.TarError, EOFError) as e:
            log.warning("data: %s is damaged after %d samples (%s); reading stops there", url, count, e)
    return count


@dataclass(frozen=True)
class TarShard:
    url: str
    samples: int

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def sample_name(self, ordinal: int) -> str:
        return f"{self.name}#{ordinal}"

    def stream(self, fs: AbstractFileSystem, wanted: set[int], labels: bool = False) -> Iterator[Sample]:
        with fs.open(self.url, "rb", block_size=STREAM_BLOCK) as f:
            for ordinal, key, data, label in tar_samples(f, wanted, max(wanted), labels):
                yield Sample(ordinal, f"{self.name}/{key}", data, label=label)


@dataclass(frozen=True)
class FileGroup:
    """Image-folder files read together; ``root`` is the filesystem path the relative paths hang off."""

    url: str  # the folder's URL, for messages
    root: str
    paths: tuple[str, ...]
    # The class label of each path (its class sub-folder's index), -1 for an image at the root;
    # empty when not known.
    labels: tuple[int, ...] = ()

    def label(self, ordinal: int) -> int | None:
        return self.labels[ordinal] if self.labels and self.labels[ordinal] >= 0 else None

    @property
    def samples(self) -> int:
        return len(self.paths)

    def sample_name(self, ordinal: int) -> str:
        return self.paths[ordinal]

    def stream(self, fs: AbstractFileSystem, wanted: set[int], labels: bool = False) -> Iterator[Sample]:
        """``labels`` costs nothing here: a path's label is known without reading."""
        ordinals = sorted(wanted)
        full = [f"{self.root}/{self.paths[o]}" for o in ordinals]
        fetched = fs.cat(full, on_error="return")
        transient = [v for v in fetched.values() if isinstance(v, Exception) and not isinstance(v, PERMANENT)]
        if transient:
            raise transient[0]
        for ordinal, path in zip(ordinals, full, strict=True):
            data = fetched.get(path)
            if isinstance(data, bytes):
                yield Sample(ordinal, self.paths[ordinal], data, label=self.label(ordinal))
            else:
                yield Sample(ordinal, self.paths[ordinal], None, f"unreadable: {data!r}", self.label(ordinal))


Unit = TarShard | FileGroup


def read_unit(unit: Unit, fs: AbstractFileSystem, wanted: set[int], retries: int,
              backoff: float = 0.5, labels: bool = False) -> Iterator[Sample]:
    """Every wanted ordinal exactly once: its bytes, or a Sample with ``data=None`` saying why not;
    with ``labels``, its class label too (None when it has none). Delivered samples come in
    storage order, the undelivered after them.

    A transient failure (network, throttling) re-opens the unit after an exponential backoff and
    skips what was delivered; a permanent one (missing, corrupt, truncated) gives up on the rest.
    """
    delivered: set[int] = set()
    attempt, reason = 0, "the shard holds fewer samples than its index says"
    while wanted - delivered:
        try:
            for sample in unit.stream(fs, wanted - delivered, labels):
                delivered.add(sample.ordinal)
                yield sample
            break
        except PERMANENT as e:
            reason = f"{type(e).__name__}: {e}"
            break
        except Exception as e:  # botocore and aiohttp errors share no base class with OSError
            attempt += 1
            if attempt > retries:
                raise RuntimeError(f"data: reading {unit.url} still fails after {retries} retries ({e!r}); "
                                   "check the storage endpoint, or raise data.io_retries") from e
            delay = backoff * 2 ** (attempt - 1)
            log.warning("data: retrying %s in %.1fs after %r", unit.url, delay, e)
            time.sleep(delay)
    for ordinal in sorted(wanted - delivered):
        yield Sample(ordinal, unit.sample_name(ordinal), None, reason)
