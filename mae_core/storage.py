"""Reading and writing small objects at any fsspec URL (local paths, s3://, ...).

Object stores make a single PUT atomic; a local file is written beside its target and renamed
over it. Either way a concurrent reader sees the old object or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem behind ``url`` and the path inside it. Credentials come from the
    environment (AWS_* variables, instance roles), never from a URL or a config file."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(fs: AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    if is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, sort_keys=True).encode())


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    # Another process may have written it since this one listed its folder: s3fs would otherwise
    # take the size, or the absence, from that cached listing.
    fs.invalidate_cache(path)
    # Objects read whole here are small (states, markers, progress): s3fs would otherwise send a
    # HEAD before each GET to decide on a ranged parallel download, doubling the requests.
    return fs.cat_file(path, **({"max_concurrency": 1} if "s3" in fs.protocol else {}))


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    fs.invalidate_cache(path)  # as in read_bytes: not from a listing cached before another process wrote
    return fs.exists(path)


def listdir(url: str) -> list[dict[str, Any]]:
    """Fresh listing (no cached view of an object store): entries with name, size, type."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return fs.ls(path, detail=True)


def fresh_listing(fs: AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """``listdir`` of a path inside ``fs`` without its existence check, which costs object stores a
    HEAD and another listing: empty when nothing is there."""
    fs.invalidate_cache(path)
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError:
        return []


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
