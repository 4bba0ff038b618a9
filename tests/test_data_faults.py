"""Bad samples are skipped, counted and logged, and fail the run past data.max_skip_fraction; any
other error in decoding or augmentation stops the run; transient read errors are retried."""

from __future__ import annotations

import io
import itertools
import logging
import os
import tarfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from trainer_runs import launch, losses, write_config

from mae_core.data import DataConfig, augment
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
    config = DataConfig(url=url, input_size=32, shuffle_buffer=8, max_skip_fraction=0.2)  # 4 of 40 are bad
    source = StreamingSource(config, 8, 0, 1, seed=0)
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


BAD_JPEG = b"definitely not a jpeg"


def write_shards(directory: Path, bad: dict[int, Collection[int]], shards: int = 3, per_shard: int = 40) -> list[str]:
    """``shards`` tar files of ``per_shard`` JPEGs; ``bad[s]`` are the corrupt ordinals of shard s."""
    urls = []
    for s in range(shards):
        path = directory / f"shard-{s:06d}.tar"
        path.write_bytes(tar_bytes([(f"{s}-{i:03d}.jpg", BAD_JPEG if i in bad.get(s, ()) else jpeg(s * 1000 + i))
                                    for i in range(per_shard)]))
        urls.append(str(path))
    return urls


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_of_only_corrupt_images_repeats_good_ones_and_resumes_exactly(tmp_path: Path, workers: int) -> None:
    # A buffer of 1 keeps storage order: samples 8-15 make one batch with nothing decodable in it.
    urls = write_shards(tmp_path, {0: range(8, 16)}, shards=1)
    config = DataConfig(url=urls, input_size=32, shuffle_buffer=1, num_workers=workers, max_skip_fraction=0.25)
    source = StreamingSource(config, 8, 0, 1, seed=0)
    batches = list(itertools.islice(source.iter_with_ids(), 5))
    assert all(images.shape == (8, 3, 32, 32) for images, _ in batches)
    assert not any(bool((image == 0).all()) for images, _ in batches for image in images)
    empty = [t for t, (_, ids) in enumerate(batches) if not ids]
    assert len(empty) == 1
    # The reader's range starts with samples 0-7, batch 0: they stand in for the unreadable ones.
    assert torch.equal(batches[empty[0]][0], batches[0][0])
    assert source.metrics() == {"data/skipped": 8.0}
    assert len({i for _, ids in batches for i in ids}) == 32

    interrupted = StreamingSource(config, 8, 0, 1, seed=0)
    list(itertools.islice(interrupted.iter_with_ids(), empty[0]))  # stop just before the unreadable batch
    resumed = StreamingSource(config, 8, 0, 1, seed=0)
    resumed.load_state_dict(interrupted.state_dict())
    rest = list(itertools.islice(resumed.iter_with_ids(), 5 - empty[0]))
    assert all(torch.equal(a, b) and i == j for (a, i), (b, j) in zip(rest, batches[empty[0]:], strict=True))
    assert resumed.metrics() == source.metrics()


def raising(error: Exception) -> Callable[..., tuple[int, int, int, int]]:
    def broken_crop(*args: object) -> tuple[int, int, int, int]:
        raise error

    return broken_crop


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("error", [TypeError, OSError, ValueError])
def test_an_augmentation_bug_stops_iteration_with_its_own_exception(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture, workers: int,
                                                                    error: type[Exception]) -> None:
    # OSError and ValueError are what Pillow raises on bad bytes: raised anywhere else, they are bugs.
    monkeypatch.setattr(augment, "crop_box", raising(error("injected augmentation bug")))
    urls = write_shards(tmp_path, {}, shards=1)
    source = StreamingSource(DataConfig(url=urls, input_size=32, num_workers=workers), 8, 0, 1, seed=0)
    with caplog.at_level(logging.WARNING, logger="mae_core.data"), pytest.raises(error) as info:
        next(source.iter_with_ids())
    assert "injected augmentation bug" in str(info.value)
    # In-process the traceback is the original one; from a DataLoader worker it comes as text.
    assert any(entry.name == "broken_crop" for entry in info.traceback) or "in broken_crop" in str(info.value)
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]


def iterate_until_error(config: DataConfig, batches: int, state: dict[str, Any] | None = None) -> tuple[int, str]:
    """(batches delivered, the error's message) over at most ``batches`` batches of rank 0 of 1."""
    source = StreamingSource(config, 8, 0, 1, seed=1)
    if state is not None:
        source.load_state_dict(state)
    delivered = 0
    with pytest.raises(ValueError, match="max_skip_fraction") as info:
        for _ in itertools.islice(source.iter_with_ids(), batches):
            delivered += 1
    return delivered, str(info.value)


def test_more_skips_than_allowed_fail_at_the_same_batch_naming_the_shards(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, {1: (0, 39)})  # 2 of 120 samples: 1.7%, over the default 1%
    config = DataConfig(url=urls, input_size=32, shuffle_buffer=16, num_workers=2)
    delivered, message = iterate_until_error(config, 15)
    assert (delivered, message) == iterate_until_error(config, 15)
    assert "\n" not in message and "data.max_skip_fraction=0.01" in message
    assert urls[1] in message and urls[0] not in message and urls[2] not in message
    # The count is part of the state: a run resumed between the two bad samples fails at the same batch.
    source = StreamingSource(config, 8, 0, 1, seed=1)
    counts = [source.metrics()["data/skipped"] for _ in itertools.islice(source.iter_with_ids(), delivered)]
    first = counts.index(1.0) + 1  # batches up to and including the first bad sample's
    interrupted = StreamingSource(config, 8, 0, 1, seed=1)
    list(itertools.islice(interrupted.iter_with_ids(), first))
    assert iterate_until_error(config, 15, interrupted.state_dict()) == (delivered - first, message)

    allowing = config.model_copy(update={"max_skip_fraction": 0.02})
    source = StreamingSource(allowing, 8, 0, 1, seed=1)
    list(itertools.islice(source.iter_with_ids(), 2 * source.batches_per_epoch))
    assert source.metrics() == {"data/skipped": 2.0}  # the count is per epoch: two epochs read, two skipped


def trainer_data(tmp_path: Path, bad: dict[int, Collection[int]]) -> dict[str, Any]:
    """64 samples in 2 shards: 2 steps of 32 per epoch."""
    (tmp_path / "data").mkdir()
    urls = write_shards(tmp_path / "data", bad, shards=2, per_shard=32)
    return {"url": urls, "num_samples": None, "input_size": 32, "num_workers": 2, "shuffle_buffer": 16}


def test_an_augmentation_bug_ends_the_trainer_with_its_traceback(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    # Loaded by every Python process started with this PYTHONPATH: the trainer ranks and their workers.
    (inject / "sitecustomize.py").write_text(
        "import mae_core.data.augment\n"
        "def broken_crop(*args):\n"
        "    raise TypeError('injected augmentation bug')\n"
        "mae_core.data.augment.crop_box = broken_crop\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")])))
    cfg = write_config(tmp_path, "run", str(tmp_path / "run"), data=trainer_data(tmp_path, {}))
    proc = launch(cfg)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "TypeError" in proc.stderr
    assert "in broken_crop" in proc.stderr and "injected augmentation bug" in proc.stderr
    assert "data: skipped" not in proc.stderr


def test_the_trainer_fails_in_one_line_past_the_skip_limit_and_trains_through_below_it(tmp_path: Path) -> None:
    data = trainer_data(tmp_path, {1: range(3, 5)})  # 2 of 64: 3%
    proc = launch(write_config(tmp_path, "strict", str(tmp_path / "strict"), data=data))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data: rank 0 skipped") and data["url"][1] in last and data["url"][0] not in last
    assert "Traceback" not in proc.stderr
    lenient = write_config(tmp_path, "lenient", str(tmp_path / "lenient"), data={**data, "max_skip_fraction": 0.05})
    proc = launch(lenient)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(losses(str(tmp_path / "lenient"))) == 2
