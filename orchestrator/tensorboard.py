"""TensorBoard for runs in the registry.

On a local registry nothing needs copying: ``tensorboard --logdir <root>`` reads it directly, and
each run appears as ``<experiment>/<run_id>/tb``. TensorBoard cannot list an ``s3://`` registry
(nor any other object store), so ``maestro sync-tb DEST`` copies the event files of every run into
``DEST/<experiment>/<run_id>/`` and ``tensorboard --logdir DEST`` shows them labelled the same way.

Run it again to follow training runs: only files that are new or whose size changed are fetched.
On object stores a run's event files roll over at a few tens of KiB (``mae_core.metrics``), so a
long run has hundreds of closed files, and a re-sync fetches just the open one and any new ones.
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mae_core import storage
from mae_core.metrics_log import TB_DIR
from orchestrator.registry import BATCH, Registry, RunState

# Bytes fetched into memory at once: local event files are not rolled and can be large.
CHUNK_BYTES = 64 << 20
# Runs listed at once: each listing is one latency-bound request on object stores.
LISTERS = 8


def _event_files(registry: Registry, state: RunState) -> list[dict[str, Any]]:
    """The run's TensorBoard event files as listed (name, size); temp files of local writes skipped."""
    entries = storage.listdir(storage.join(registry.run_url(state.experiment, state.run_id), TB_DIR))
    return [e for e in entries if e["type"] == "file" and ".tmp-" not in e["name"]
            and "tfevents" in e["name"].rsplit("/", 1)[-1]]


def _write(path: str, data: bytes) -> None:
    # A temp name without "tfevents", so a TensorBoard reading DEST meanwhile never loads a half file.
    tmp = os.path.join(os.path.dirname(path), f".sync-{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def sync(registry: Registry, states: list[RunState], destination: str) -> int:
    """Copy the runs' event files into ``destination/<experiment>/<run_id>/``; returns how many
    were copied (those missing there or of another size than in the registry)."""
    with ThreadPoolExecutor(LISTERS) as pool:
        listings = list(pool.map(lambda s: _event_files(registry, s), states))
    todo: list[tuple[str, int, str]] = []  # (path in the registry's filesystem, size, local path)
    for state, entries in zip(states, listings, strict=True):
        folder = os.path.join(destination, state.experiment, state.run_id)
        for e in entries:
            local = os.path.join(folder, e["name"].rsplit("/", 1)[-1])
            # An event file only grows while open, so equal sizes mean equal contents.
            if not (os.path.isfile(local) and os.path.getsize(local) == e["size"]):
                todo.append((e["name"], e["size"], local))

    fs, _ = storage.filesystem(registry.root)
    # As Registry._get_many: max_concurrency=1 spares s3fs a HEAD before each GET of a small file.
    options = {} if storage.is_local(fs) else \
        {"batch_size": BATCH, **({"max_concurrency": 1} if "s3" in fs.protocol else {})}
    chunk: list[tuple[str, int, str]] = []
    for i, item in enumerate(todo):
        chunk.append(item)
        if i + 1 < len(todo) and sum(size for _, size, _ in chunk) + todo[i + 1][1] <= CHUNK_BYTES:
            continue
        # One concurrent fetch of the chunk's files (a GET each on object stores).
        blobs = fs.cat([path for path, _, _ in chunk], **options)
        for path, _, local in chunk:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            _write(local, blobs[path])
        chunk = []
    return len(todo)
