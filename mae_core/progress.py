"""``<output>/progress.json``: the trainer's newest step in one small object, importable without torch.

Rank 0 rewrites it on every metrics flush: a constant-size PUT however long the run is. The
runner, ``maestro ls`` and ``watch`` read it instead of the metrics history, so watching a run
costs one small GET whatever its length. ``heartbeat`` is the wall time of that flush, so a
stale heartbeat means the training loop stopped advancing. ``checkpoint_step`` is the newest
committed checkpoint, where a resume would start now.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mae_core import storage

PROGRESS_FILE = "progress.json"


def progress_url(output: str) -> str:
    return storage.join(output, PROGRESS_FILE)


def write_progress(output: str, step: int, **values: Any) -> None:
    storage.write_json(progress_url(output), {"step": step, "heartbeat": time.time(), **values})


def read_progress(output: str) -> dict[str, Any] | None:
    """The last progress record, or None before the first flush."""
    try:
        return parse_progress(storage.read_bytes(progress_url(output)))
    except FileNotFoundError:
        return None


def parse_progress(blob: bytes | None) -> dict[str, Any] | None:
    """A progress record from its bytes (as a batch of GETs returns them), or None for a missing,
    torn or foreign file: it must not stop a listing."""
    try:
        record = json.loads(blob) if blob is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None
