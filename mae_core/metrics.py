"""Training scalars from rank 0: ``metrics.jsonl`` plus TensorBoard, at any fsspec URL.

Object stores cannot append, so the JSONL is rewritten whole on each flush (one atomic put).
On resume, records past the resumed step are dropped: they came from steps the checkpoint did
not keep and will be recomputed, so the file always holds one clean loss curve.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from mae_core import storage


class MetricsWriter:
    def __init__(self, output: str, enabled: bool, resume_step: int = 0, flush_seconds: float = 10.0) -> None:
        self.enabled = enabled
        self.url = storage.join(output, "metrics.jsonl")
        self.tb_url = storage.join(output, "tb")
        self.flush_seconds = flush_seconds
        self.records: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        if not enabled:
            return
        if storage.exists(self.url):
            lines = storage.read_bytes(self.url).decode().splitlines()
            self.records = [r for r in map(json.loads, lines) if r["step"] <= resume_step]
        fs, _ = storage.filesystem(output)
        # TensorBoard writes event files itself only to local disk; elsewhere it writes to a
        # scratch dir that is uploaded on flush.
        self._tb_local = storage.is_local(fs)
        self._tb_dir = storage.filesystem(self.tb_url)[1] if self._tb_local else tempfile.mkdtemp(prefix="tb-")
        self.tb = SummaryWriter(self._tb_dir, purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.records.append({"step": step, "time": time.time(), **values})
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.enabled:
            return
        body = "".join(json.dumps(r) + "\n" for r in self.records)
        storage.write_bytes(self.url, body.encode())
        self.tb.flush()
        if not self._tb_local:
            fs, path = storage.filesystem(self.tb_url)
            for event_file in Path(self._tb_dir).iterdir():
                fs.put_file(str(event_file), f"{path}/{event_file.name}")
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.tb.close()
