"""Training scalars from rank 0, at any fsspec URL: the curve's segments (``mae_core.metrics_log``),
TensorBoard and ``progress.json``.

Every flush uploads only what is bounded: the open metrics segment, the open TensorBoard event
file and the small progress record, three PUTs of at most a few tens of KiB however long the run
has been going. Records of steps past the resumed step are not deleted; the reader and
TensorBoard let this attempt's records replace them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from mae_core import storage
from mae_core.goodput import AttemptClock
from mae_core.metrics_log import SEGMENT_BYTES, TB_DIR, SegmentWriter, tb_event_name
from mae_core.progress import write_progress

# A record's 6 scalars take ~280 bytes of events: a 32 KiB event file holds ~115 records, ~220 files
# for a 500k-step run logged every 20 steps.
TB_SEGMENT_BYTES = 32 * 1024


class MetricsWriter:
    def __init__(self, output: str, enabled: bool, flush_s: float, resume_step: int = 0,
                 segment_bytes: int = SEGMENT_BYTES, tb_segment_bytes: int = TB_SEGMENT_BYTES,
                 clock: AttemptClock | None = None, checkpoint_step: Callable[[], int | None] | None = None) -> None:
        self.enabled, self.output, self.flush_s = enabled, output, flush_s
        self.checkpoint_step = checkpoint_step
        self.tb_segment_bytes, self.clock, self.resume_step = tb_segment_bytes, clock, resume_step
        self._last: dict[str, Any] | None = None  # newest record not yet flushed
        self._newest: dict[str, Any] | None = None  # newest record of this attempt
        self._last_flush = time.monotonic()
        if not enabled:
            return
        self.segments = SegmentWriter(output, resume_step, segment_bytes)
        tb_url = storage.join(output, TB_DIR)
        fs, tb_path = storage.filesystem(tb_url)
        # TensorBoard appends to its event file in place, which only a local disk allows; elsewhere
        # it writes to a scratch dir, and each flush uploads the open event file, which rolls over
        # at tb_segment_bytes so an upload stays small.
        self._tb_local = storage.is_local(fs)
        self._tb_dir = tb_path if self._tb_local else tempfile.mkdtemp(prefix="tb-")
        self._tb_url, self._tb_index, self._tb_uploaded = tb_url, 0, 0
        # The first event file starts with a purge of every step past the resume step: TensorBoard
        # drops what earlier attempts logged there, as read_records does (also from step 0, when an
        # attempt died before its first checkpoint).
        self.tb = SummaryWriter(self._tb_dir, purge_step=resume_step + 1)
        if not self._tb_local:  # the purge, like the metrics cut, shows from the start of the attempt
            self.tb.flush()
            self._upload_tb()

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._last = self._newest = {"step": step, "time": time.time(), **values}
        self.segments.append(self._last)
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)
        if time.monotonic() - self._last_flush > self.flush_s:
            self.flush()

    def flush(self, force: bool = False) -> None:
        """Upload what was logged since the last flush; nothing if nothing was, unless ``force``
        (the attempt's clock changed: progress.json is rewritten alone)."""
        if not self.enabled or (self._last is None and not force):
            return
        if self._last is not None:
            self.segments.flush()
            self.tb.flush()
            if not self._tb_local:
                self._upload_tb()
        newest = self._newest or {"step": self.resume_step}
        # Last: progress.json never names a step whose record is not stored yet.
        committed = self.checkpoint_step() if self.checkpoint_step else None
        write_progress(self.output, newest["step"], **{k: newest[k] for k in ("loss", "lr", "img_s") if k in newest},
                       **({"goodput": self.clock.report()} if self.clock else {}),
                       **({"checkpoint_step": committed} if committed is not None else {}))
        self._last = None
        self._last_flush = time.monotonic()

    def _upload_tb(self) -> None:
        # The scratch dir holds the one open event file (none right after a roll, until the next scalar).
        for event_file in Path(self._tb_dir).iterdir():
            size = event_file.stat().st_size
            if size == self._tb_uploaded:
                continue
            storage.write_bytes(storage.join(self._tb_url, tb_event_name(self.segments.segment.writer,
                                                                         self._tb_index)), event_file.read_bytes())
            self._tb_uploaded = size
            if size >= self.tb_segment_bytes:
                # Closing ends the file; the next scalar opens a new one, without a second purge
                # (SummaryWriter applies purge_step to its first file only).
                self.tb.close()
                event_file.unlink()
                self._tb_index, self._tb_uploaded = self._tb_index + 1, 0

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush(force=True)
        self.tb.close()
        if not self._tb_local:
            shutil.rmtree(self._tb_dir, ignore_errors=True)
