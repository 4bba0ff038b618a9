"""From ``data.url`` to the dataset's read units and their sample counts, resolved once at start-up.

Accepted: a brace pattern or list of tar shards, a folder (or its ``manifest.json``) of shards, a
single shard, or an image folder with class sub-folders or flat. Anything missing fails here, in
one line naming the URL, rather than inside a DataLoader worker hours later.
"""

from __future__ import annotations

import json
import logging
import posixpath
import random
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
from fsspec import AbstractFileSystem

from mae_core.data.readers import IMAGE_EXTS, TAR_SUFFIXES, FileGroup, TarShard, Unit, count_tar_samples

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


@dataclass(frozen=True)
class Dataset:
    description: str
    units: tuple[Unit, ...]
    # Class names in label order, when known (an image folder's class sub-folders, a manifest's list).
    classes: tuple[str, ...] | None = None
    # Labels run 0..num_classes-1; 0: the data holds no labels; None: only reading the data could tell.
    num_classes: int | None = None

    @property
    def counts(self) -> list[int]:
        return [u.samples for u in self.units]

    @property
    def samples(self) -> int:
        return sum(self.counts)


def expand_braces(pattern: str) -> list[str]:
    """``{000..011}`` (zero padding kept) and ``{a,b}`` alternatives, any number of them, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    span = _RANGE.fullmatch(body)
    if span:
        lo, hi = span.groups()
        width = len(lo) if lo.startswith("0") else 0
        if int(lo) > int(hi):
            raise ValueError(f"data.url range {{{body}}} in {pattern} runs backwards; write {{{hi}..{lo}}}")
        choices = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [url for choice in choices for url in expand_braces(head + choice + tail)]


def is_tar(url: str) -> bool:
    return url.lower().endswith(TAR_SUFFIXES)


def image_ext(path: str) -> str:
    return posixpath.splitext(path)[1][1:].lower()


def resolve(url: str | list[str], files_per_read: int) -> Dataset:
    patterns = [url] if isinstance(url, str) else list(url)
    if not patterns:
        raise ValueError("data.url is an empty list; give shard URLs, a brace pattern or a folder")
    urls = [u for p in patterns for u in expand_braces(p)]
    if len(urls) == 1 and not is_tar(urls[0]):
        return _resolve_path(urls[0], files_per_read)
    not_tar = [u for u in urls if not is_tar(u)]
    if not_tar:
        raise ValueError(f"data.url entry {not_tar[0]} is not a .tar shard; a list or brace pattern must "
                         "name shards only (give a folder's URL on its own instead)")
    source = patterns[0] if len(patterns) == 1 else f"a list of {len(patterns)} URLs"
    _check_exist(urls, source)
    return Dataset(source, _count_shards(urls))


def _resolve_path(url: str, files_per_read: int) -> Dataset:
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    fs.invalidate_cache(path)  # another process may have written it since this process last listed
    if path.endswith(MANIFEST):
        return _resolve_manifest(fs, url)
    if not fs.exists(path):
        raise FileNotFoundError(f"data.url {url} does not exist; check the bucket and path")
    if not fs.isdir(path):
        raise ValueError(f"data.url {url} is a file but neither a .tar shard nor a {MANIFEST}")
    if fs.exists(f"{path}/{MANIFEST}"):
        return _resolve_manifest(fs, f"{url.rstrip('/')}/{MANIFEST}")
    files = fs.find(path)
    shards = sorted(f for f in files if is_tar(f) and posixpath.dirname(f) == path)
    if shards:
        return Dataset(url, _count_shards([fs.unstrip_protocol(f) for f in shards]))
    images = _relative_images(path, files)
    if not images:
        raise ValueError(f"data.url {url} holds no images ({', '.join(sorted(IMAGE_EXTS))}) and no .tar shards; "
                         "point it at an image folder, tar shards or a manifest.json")
    classes = image_classes(images)
    label_of = {name: index for index, name in enumerate(classes)}
    # A fixed shuffle before grouping, so a read unit mixes classes instead of holding one folder.
    random.Random(0).shuffle(images)
    groups = [FileGroup(url, path, tuple(chunk), tuple(image_label(p, label_of) for p in chunk))
              for chunk in (images[i : i + files_per_read] for i in range(0, len(images), files_per_read))]
    log.info("data: %d images in %s", len(images), url)
    return Dataset(url, tuple(groups), tuple(classes), len(classes))


def _relative_images(root: str, files: list[str]) -> list[str]:
    return sorted(f[len(root) + 1 :] for f in files if image_ext(f) in IMAGE_EXTS)


def image_classes(images: list[str]) -> list[str]:
    """The class names of an image folder's relative image paths: the sorted first-level folder names."""
    return sorted({p.split("/", 1)[0] for p in images if "/" in p})


def image_label(path: str, label_of: dict[str, int]) -> int:
    """The label of a relative image path: its class sub-folder's index; -1 for an image at the root."""
    return label_of[path.split("/", 1)[0]] if "/" in path else -1


def list_images(url: str) -> tuple[AbstractFileSystem, str, list[str], list[str]]:
    """(filesystem, root path, image paths relative to root, class names) of an image folder.

    Classes are the sorted first-level folder names; images directly under the root have none.
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{url} is not an existing folder; check the bucket and path")
    images = _relative_images(root, fs.find(root))
    if not images:
        raise ValueError(f"{url} holds no images ({', '.join(sorted(IMAGE_EXTS))}); point it at an image folder")
    return fs, root, images, image_classes(images)


@dataclass(frozen=True)
class Manifest:
    shards: list[tuple[str, int]]  # (shard name, samples) of each shard
    classes: tuple[str, ...] | None  # names in label order; None when it lists none
    num_classes: int | None  # see Dataset.num_classes


def read_manifest_doc(fs: AbstractFileSystem, url: str) -> Manifest:
    """A ``manifest.json``: the one reader of manifests. Manifests written before ``num_classes``
    was recorded count their class names, or say nothing when they list none."""
    fix = "rebuild it with `python -m mae_core.data shard`"
    try:
        doc = json.loads(fs.cat_file(url))
        shards = [(str(e["name"]), int(e["samples"])) for e in doc["shards"]]
        classes = tuple(str(c) for c in doc.get("classes") or ()) or None
        count = doc.get("num_classes")
        num_classes = int(count) if count is not None else (len(classes) if classes else None)
        if classes is not None and num_classes != len(classes):
            raise ValueError(f"num_classes is {num_classes} but {len(classes)} classes are named")
    except FileNotFoundError:
        raise FileNotFoundError(f"data.url {url} does not exist; check the bucket and path") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"data.url {url} is not a shard manifest ({type(e).__name__}: {e}); {fix}") from None
    return Manifest(shards, classes, num_classes)


def read_manifest(fs: AbstractFileSystem, url: str) -> list[tuple[str, int]]:
    """(shard name, samples) of each shard a ``manifest.json`` lists."""
    return read_manifest_doc(fs, url).shards


def manifest_samples(url: str) -> int | None:
    """Samples listed by the manifest of a data URL (a folder or the manifest itself); None when
    the URL is a pattern, a list or a folder without a manifest."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    manifest = path if path.endswith(MANIFEST) else f"{path}/{MANIFEST}"
    fs.invalidate_cache(posixpath.dirname(manifest))
    if not fs.exists(manifest):
        return None
    return sum(samples for _, samples in read_manifest(fs, fs.unstrip_protocol(manifest)))


def dataset_classes(url: str | list[str]) -> tuple[tuple[str, ...] | None, int | None]:
    """(class names, number of classes) of a data URL, as ``Dataset.classes`` and ``num_classes``
    define them, read cheaply: from a manifest, or by listing an image folder. (None, None) for a
    pattern, a list, a single shard or a folder of shards without a manifest."""
    if not isinstance(url, str) or "{" in url or is_tar(url):
        return None, None
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    manifest = path if path.endswith(MANIFEST) else f"{path}/{MANIFEST}"
    fs.invalidate_cache(posixpath.dirname(manifest))
    if fs.exists(manifest):
        doc = read_manifest_doc(fs, fs.unstrip_protocol(manifest))
        return doc.classes, doc.num_classes
    if not fs.exists(path):
        raise FileNotFoundError(f"data.url {url} does not exist; check the bucket and path")
    if not fs.isdir(path):
        raise ValueError(f"data.url {url} is a file but neither a .tar shard nor a {MANIFEST}")
    files = fs.find(path)
    if any(is_tar(f) and posixpath.dirname(f) == path for f in files):
        return None, None
    classes = image_classes(_relative_images(path, files))
    return tuple(classes), len(classes)


def _resolve_manifest(fs: AbstractFileSystem, url: str) -> Dataset:
    doc = read_manifest_doc(fs, url)
    base = url.rsplit("/", 1)[0]
    shards = [TarShard(name if "://" in name or name.startswith("/") else f"{base}/{name}", samples)
              for name, samples in doc.shards]
    _check_exist([s.url for s in shards], url)
    return Dataset(url, tuple(shards), doc.classes, doc.num_classes)


def _check_exist(urls: list[str], source: str) -> None:
    """One listing per folder instead of one request per shard."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_folder[posixpath.dirname(url) or "."].append(url)
    for folder, members in by_folder.items():
        fs, path = fsspec.core.url_to_fs(folder)
        fs.invalidate_cache(path)
        try:
            listed = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
        except FileNotFoundError:
            listed = set()
        for url in members:
            if posixpath.basename(url) not in listed:
                raise FileNotFoundError(f"data.url: shard {url} (from {source}) does not exist; "
                                        "fix the URL or upload the shard")


def _count_shards(urls: list[str]) -> tuple[TarShard, ...]:
    log.info("data: counting the samples of %d shards by reading their headers (a %s skips this)",
             len(urls), MANIFEST)

    def count(url: str) -> int:
        return count_tar_samples(fsspec.core.url_to_fs(url)[0], url)

    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        counts = list(pool.map(count, urls))
    return tuple(TarShard(url, n) for url, n in zip(urls, counts, strict=True))
