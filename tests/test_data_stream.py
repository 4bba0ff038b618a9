"""StreamingSource over tar shards on S3 (moto): partition across ranks and workers, order, resume."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_core.data import DataConfig, build_source
from mae_core.data.order import epoch_items, reader_emissions
from mae_core.data.shard import ShardWriter
from mae_core.data.stream import StreamingSource

SAMPLES = 200
SIZE = 32


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=80)
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(s3_endpoint: str) -> str:
    """200 samples in about 10 shards of unequal size, with a manifest."""
    import s3fs

    bucket = f"maestro-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    url = f"s3://{bucket}/shards"
    with ShardWriter(url, shard_bytes=30_000) as writer:
        for i in range(SAMPLES):
            writer.add(f"{i:05d}", "jpg", jpeg(i), label=i % 3)
    return url


def ids_in(url: str) -> set[str]:
    """Every sample id, read back with plain tarfile rather than the code under test."""
    import fsspec

    fs = fsspec.core.url_to_fs(url)[0]
    manifest = json.loads(fs.cat_file(f"{url}/manifest.json"))
    ids = set()
    for shard in manifest["shards"]:
        with fs.open(f"{url}/{shard['name']}", "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            ids |= {f"{shard['name']}/{m.name.split('.')[0]}" for m in tar if m.name.endswith(".jpg")}
    return ids


def take(batches: Iterator[tuple[torch.Tensor, list[str]]], n: int) -> list[tuple[torch.Tensor, list[str]]]:
    return list(itertools.islice(batches, n))


def flat_ids(batches: list[tuple[torch.Tensor, list[str]]]) -> list[str]:
    return [i for _, ids in batches for i in ids]


def cfg(url: str, workers: int = 2) -> DataConfig:
    return DataConfig(url=url, num_workers=workers, input_size=SIZE, shuffle_buffer=24)


def test_two_ranks_with_two_workers_each_cover_the_epoch_once(shards: str) -> None:
    seen: list[str] = []
    for rank in (0, 1):
        source = StreamingSource(cfg(shards), 8, rank, 2, seed=0)
        assert source.batches_per_epoch == SAMPLES // 16
        batches = take(source.iter_with_ids(), source.batches_per_epoch)
        assert all(images.shape == (8, 3, SIZE, SIZE) and images.dtype == torch.float32 for images, _ in batches)
        assert all(len(ids) == 8 for _, ids in batches)
        assert source.state_dict()["consumed"] == SAMPLES // 16 * 16
        seen += flat_ids(batches)
    assert len(seen) == len(set(seen)) == SAMPLES - SAMPLES % 16
    assert set(seen) <= ids_in(shards)


def test_batch_count_is_a_multiple_of_the_accumulation_steps(shards: str) -> None:
    source = StreamingSource(cfg(shards, workers=0), 8, 0, 2, seed=0, batches_multiple=5)
    assert source.batches_per_epoch == 10
    assert isinstance(build_source(cfg(shards, workers=0), 8, 0, 2, 0, 5), StreamingSource)


def test_same_seed_same_order_and_each_epoch_its_own(shards: str) -> None:
    first = StreamingSource(cfg(shards), 8, 1, 2, seed=3)
    second = StreamingSource(cfg(shards), 8, 1, 2, seed=3)
    n = first.batches_per_epoch
    a, b = take(first.iter_with_ids(), 2 * n), take(second.iter_with_ids(), 2 * n)
    assert flat_ids(a) == flat_ids(b)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))
    assert flat_ids(a[:n]) != flat_ids(a[n:])
    other_seed = StreamingSource(cfg(shards), 8, 1, 2, seed=4)
    assert flat_ids(take(other_seed.iter_with_ids(), n)) != flat_ids(a[:n])


def test_batches_follow_the_planned_order_across_epochs(shards: str) -> None:
    """25 batches an epoch from 2 workers: epoch 1 starts on the other worker, and still in plan order."""
    source = StreamingSource(cfg(shards), 8, 0, 1, seed=2)
    assert source.batches_per_epoch == 25
    delivered = [ids for _, ids in take(source.iter_with_ids(), 50)]
    offsets = np.cumsum([0, *source.dataset.counts])
    names = [f"{unit.name}/{i:05d}" for u, unit in enumerate(source.dataset.units)  # type: ignore[union-attr]
             for i in range(offsets[u], offsets[u + 1])]
    planned = []
    for epoch in (0, 1):
        items = epoch_items(source.dataset.counts, 2, epoch)
        for t in range(25):
            start, emitted = reader_emissions(len(items), source.layout, 2, epoch, 0, 0, t % 2)
            batch = items[start + emitted[t // 2 * 8 : (t // 2 + 1) * 8]]
            planned.append([names[i] for i in batch])
    assert delivered == planned


@pytest.mark.parametrize("stop", [3, 25])
def test_resume_in_process_at_any_batch_including_the_epoch_end(shards: str, stop: int) -> None:
    reference = take(StreamingSource(cfg(shards), 8, 0, 1, seed=6).iter_with_ids(), stop + 4)
    interrupted = StreamingSource(cfg(shards), 8, 0, 1, seed=6)
    take(interrupted.iter_with_ids(), stop)
    resumed = StreamingSource(cfg(shards), 8, 0, 1, seed=6)
    resumed.load_state_dict(interrupted.state_dict())
    rest = take(resumed.iter_with_ids(), 4)
    assert [ids for _, ids in rest] == [ids for _, ids in reference[stop:]]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(rest, reference[stop:], strict=True))


RESUME = """
import json, sys, torch
from mae_core.data import DataConfig
from mae_core.data.stream import StreamingSource
args = json.loads(sys.argv[1])
source = StreamingSource(DataConfig(**args["cfg"]), args["batch"], args["rank"], args["world"], args["seed"])
source.load_state_dict(args["state"])
batches = iter(source)
torch.save([next(batches) for _ in range(args["count"])], args["out"])
"""


def test_resume_in_a_new_process_gives_the_same_tensors(shards: str, tmp_path: Path) -> None:
    config = cfg(shards)
    reference = StreamingSource(config, 8, 1, 2, seed=5)
    per_epoch = reference.batches_per_epoch
    stop, count = 5, per_epoch  # the rest of epoch 0 and the start of epoch 1
    expected = [images for images, _ in take(reference.iter_with_ids(), stop + count)][stop:]
    interrupted = StreamingSource(config, 8, 1, 2, seed=5)
    take(interrupted.iter_with_ids(), stop)
    state = json.loads(json.dumps(interrupted.state_dict()))
    out = tmp_path / "resumed.pt"
    args = {"cfg": config.model_dump(), "batch": 8, "rank": 1, "world": 2, "seed": 5, "state": state,
            "count": count, "out": str(out)}
    subprocess.run([sys.executable, "-c", RESUME, json.dumps(args)], check=True, timeout=120)
    resumed = torch.load(out)
    assert len(resumed) == len(expected)
    assert all(torch.equal(x, y) for x, y in zip(resumed, expected, strict=True))


def run_ranks(url: str, world: int, batch: int, state: dict | None, count: int | None) -> tuple[list[str], dict]:
    """Every rank of a world for ``count`` batches (the epoch's rest when None); the ids and rank 0's state."""
    seen, states = [], []
    for rank in range(world):
        source = StreamingSource(cfg(url), batch, rank, world, seed=11)
        if state is not None:
            source.load_state_dict(state)
        if count is not None:
            ids = flat_ids(take(source.iter_with_ids(), count))
        else:  # up to the first batch of the next epoch, which is left out
            ids = []
            for _, batch_ids in source.iter_with_ids():
                if source.state_dict()["epoch"] > 0:
                    break
                ids += batch_ids
        seen += ids
        states.append(source.state_dict())
    assert all(s == states[0] for s in states)
    return seen, states[0]


@pytest.mark.parametrize(("before", "after"), [((2, 8), (1, 16)), ((1, 16), (2, 8)), ((2, 8), (1, 8))])
def test_elastic_resume_sees_each_sample_of_the_epoch_once(shards: str, before: tuple[int, int],
                                                           after: tuple[int, int]) -> None:
    first, state = run_ranks(shards, *before, None, 5)
    assert state["consumed"] == 5 * before[0] * before[1]
    rest, _ = run_ranks(shards, *after, json.loads(json.dumps(state)), None)
    seen = first + rest
    assert len(seen) == len(set(seen))
    global_batch = after[0] * after[1]
    left = SAMPLES - len(seen)
    assert 0 <= left < global_batch
    assert left == (SAMPLES - len(first)) % global_batch


def test_a_resumed_epoch_is_followed_by_a_full_one(shards: str) -> None:
    _, state = run_ranks(shards, 2, 8, None, 3)
    source = StreamingSource(cfg(shards), 16, 0, 1, seed=11)
    source.load_state_dict(state)
    batches = source.iter_with_ids()
    rest = (SAMPLES - 3 * 16) // 16
    take(batches, rest)
    assert source.state_dict()["epoch"] == 0
    next_epoch = take(batches, source.batches_per_epoch)
    assert source.state_dict()["epoch"] == 1 and source.state_dict()["segments"][0]["world_size"] == 1
    assert len(set(flat_ids(next_epoch))) == source.batches_per_epoch * 16


def test_state_of_another_dataset_is_refused(shards: str) -> None:
    source = StreamingSource(cfg(shards, workers=0), 8, 0, 1, seed=0)
    with pytest.raises(ValueError, match="same data.url"):
        source.load_state_dict(source.state_dict() | {"samples": SAMPLES + 1})
    with pytest.raises(ValueError, match="same seed"):
        source.load_state_dict(source.state_dict() | {"seed": 1})


def test_the_source_trains_on_the_sample_count_the_plan_shows(shards: str) -> None:
    from mae_core.config import OptimConfig
    from mae_core.data import dataset_size
    from mae_core.schedule import Schedule

    planned = dataset_size(cfg(shards, workers=0))  # what `maestro plan` reads: the manifest
    source = StreamingSource(cfg(shards, workers=0), 8, 0, 2, seed=0)
    assert planned == source.num_samples == SAMPLES
    optim = OptimConfig(global_batch=16)
    assert Schedule.derive(optim, 8, 2, planned).steps_per_epoch == source.batches_per_epoch
    # A declared count the data contradicts is refused, not silently replaced.
    wrong = cfg(shards, workers=0).model_copy(update={"num_samples": SAMPLES + 8})
    with pytest.raises(ValueError, match=f"data.num_samples={SAMPLES + 8}"):
        StreamingSource(wrong, 8, 0, 2, seed=0)
