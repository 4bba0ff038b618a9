"""Bad samples are skipped, counted and logged; transient read errors are retried."""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np
import pytest
from PIL import Image

from mae_core.data import DataConfig
from mae_core.data.readers import TarShard, read_unit
from mae_core.data.stream import StreamingSource

CORRUPT = {5: b"definitely not a jpeg", 17: b"", 30: None}  # None: a JPEG cut in half


def jpeg(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def tar_bytes(samples: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def damaged_shard() -> bytes:
    """40 samples with .cls fields; 3 corrupt images; the file cut inside the last image."""
    samples = []
    for i in range(40):
        data = CORRUPT.get(i, jpeg(i))
        samples += [(f"s{i:03d}.jpg", jpeg(i)[:300] if data is None else data), (f"s{i:03d}.cls", b"0")]
    whole = tar_bytes(samples[:-1])  # the last sample without its .cls, so the cut lands in its image
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        last = tar.getmembers()[-1]
    return whole[: last.offset_data + last.size // 2]

def test_corrupt_images_and_a_truncated_tail_are_skipped_and_counted(s3_bucket: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    url = f"{s3_bucket}/bad/shard-000000.tar"
    fsspec.core.url_to_fs(url)[0].pipe_file(url, damaged_shard())
    source = StreamingSource(DataConfig(url=url, input_size=32, shuffle_buffer=8), 8, 0, 1, seed=0)
    assert source.batches_per_epoch == 5  # the cut sample's header survives, so it is counted
    with caplog.at_level(logging.WARNING, logger="mae_core.data"):
        batches = list(itertools.islice(source.iter_with_ids(), 5))
    assert all(images.shape == (8, 3, 32, 32) and bool(images.isfinite().all()) for images, _ in batches)
    seen = {i for _, ids in batches for i in ids}
    corrupt = {f"shard-000000.tar/s{i:03d}" for i in CORRUPT}
    assert len(seen) == 36 and not seen & corrupt
    assert source.metrics() == {"data/skipped": 4.0}
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 4
    assert all(url in line for line in skipped)
    assert {c for c in corrupt if any(c in line for line in skipped)} == corrupt


class FlakyFS:
    """A local filesystem whose first ``failures`` opened files drop the connection mid-read."""

    def __init__(self, failures: int) -> None:
        self.failures, self.opens = failures, 0
        self.local = fsspec.filesystem("file")

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> IO[bytes]:
        self.opens += 1
        f = self.local.open(path, mode)
        if self.opens > self.failures:
            return f
        data = f.read()
        f.close()
        return Dropping(data[: len(data) // 2])


class Dropping(io.BytesIO):
    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if not chunk:
            raise ConnectionResetError("connection reset by peer")
        return chunk


def test_transient_errors_are_retried_without_repeating_samples(tmp_path: Path) -> None:
    path = tmp_path / "shard.tar"
    path.write_bytes(tar_bytes([(f"{i:03d}.jpg", jpeg(i)) for i in range(10)]))
    fs = FlakyFS(failures=2)
    samples = list(read_unit(TarShard(str(path), 10), fs, set(range(10)), retries=3, backoff=0))  # type: ignore[arg-type]
    assert [s.ordinal for s in samples] == list(range(10))
    assert all(s.data == jpeg(s.ordinal) for s in samples)
    assert fs.opens == 3


def test_retries_give_up_with_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "shard.tar"
    path.write_bytes(tar_bytes([(f"{i:03d}.jpg", jpeg(i)) for i in range(10)]))
    with pytest.raises(RuntimeError, match="still fails after 2 retries") as info:
        list(read_unit(TarShard(str(path), 10), FlakyFS(failures=5), {0, 9}, retries=2, backoff=0))  # type: ignore[arg-type]
    assert str(path) in str(info.value) and "\n" not in str(info.value)
