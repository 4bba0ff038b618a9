"""From data.url to read units: brace patterns, lists, manifests, image folders, and one-line errors."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable

import fsspec
import numpy as np
import pytest
from PIL import Image

from mae_core.data import DataConfig
from mae_core.data.readers import FileGroup, TarShard
from mae_core.data.shard import ShardWriter, parse_size, sample_key
from mae_core.data.sources import expand_braces, resolve
from mae_core.data.stream import StreamingSource


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def write_shards(url: str, samples: int = 30, shard_bytes: int = 12_000) -> list[str]:
    with ShardWriter(url, shard_bytes) as writer:
        for i in range(samples):
            writer.add(f"{i:04d}", "png", png(i))
    return [f"{url}/{s['name']}" for s in writer.manifest["shards"]]


def one_epoch_ids(url: str | list[str], batch: int = 2) -> list[str]:
    source = StreamingSource(DataConfig(url=url, input_size=16), batch, 0, 1, seed=0)
    return [i for _, ids in itertools.islice(source.iter_with_ids(), source.batches_per_epoch) for i in ids]


def test_brace_patterns() -> None:
    assert expand_braces("s3://b/train-{000..002}.tar") == [f"s3://b/train-{i:03d}.tar" for i in range(3)]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="backwards"):
        expand_braces("x-{5..1}.tar")


def test_sizes_and_keys() -> None:
    assert parse_size("256MB") == 256_000_000
    assert parse_size("16MiB") == 16 * 2**20
    assert parse_size("1.5k") == 1500
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="256MB"):
        parse_size("lots")
    assert sample_key("n014/img.v2.JPEG") == ("n014/img_v2", "jpeg")
    assert sample_key("flat.png") == ("flat", "png")


def test_every_way_to_name_shards_gives_the_same_units(s3_bucket: str) -> None:
    urls = write_shards(f"{s3_bucket}/ds")
    assert len(urls) >= 3
    by_manifest = resolve(f"{s3_bucket}/ds", 64)
    pattern = f"{s3_bucket}/ds/train-{{000000..{len(urls) - 1:06d}}}.tar"
    for other in (resolve(f"{s3_bucket}/ds/manifest.json", 64), resolve(urls, 64), resolve(pattern, 64)):
        assert other.units == by_manifest.units
    assert by_manifest.samples == 30 and all(isinstance(u, TarShard) for u in by_manifest.units)
    fs = fsspec.core.url_to_fs(s3_bucket)[0]
    fs.rm(f"{s3_bucket}/ds/manifest.json")
    assert resolve(f"{s3_bucket}/ds", 64).units == by_manifest.units  # counted from the tar headers
    assert len(one_epoch_ids(urls[1:], batch=1)) == 30 - by_manifest.units[0].samples


@pytest.mark.parametrize("layout", ["flat", "classes"])
def test_image_folders_with_and_without_classes(s3_bucket: str, layout: str) -> None:
    fs = fsspec.core.url_to_fs(s3_bucket)[0]
    names = [f"img{i:02d}.png" if layout == "flat" else f"class{i % 3}/img{i:02d}.png" for i in range(21)]
    for i, name in enumerate(names):
        fs.pipe_file(f"{s3_bucket}/folder/{name}", png(i))
    dataset = resolve(f"{s3_bucket}/folder", 8)
    assert all(isinstance(u, FileGroup) for u in dataset.units) and dataset.counts == [8, 8, 5]
    ids = one_epoch_ids(f"{s3_bucket}/folder", batch=3)
    assert sorted(ids) == sorted(names)


ERRORS: list[tuple[str, Callable[[str], str | list[str]], type[Exception]]] = [
    ("missing folder", lambda b: f"{b}/nowhere", FileNotFoundError),
    ("missing bucket", lambda b: "s3://maestro-no-such-bucket/x", FileNotFoundError),
    ("missing shard", lambda b: f"{b}/ds/train-{{000000..000099}}.tar", FileNotFoundError),
    ("missing manifest", lambda b: f"{b}/ds/other/manifest.json", FileNotFoundError),
    ("list with a folder", lambda b: [f"{b}/ds/train-000000.tar", f"{b}/ds"], ValueError),
    ("empty folder", lambda b: f"{b}/empty", ValueError),
    ("empty list", lambda b: [], ValueError),
]


@pytest.mark.parametrize(("case", "url_of", "error"), ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_urls_fail_at_construction_in_one_line(s3_bucket: str, case: str,
                                                   url_of: Callable[[str], str | list[str]],
                                                   error: type[Exception]) -> None:
    existing = write_shards(f"{s3_bucket}/ds", samples=4)
    fsspec.core.url_to_fs(s3_bucket)[0].pipe_file(f"{s3_bucket}/empty/readme.txt", b"no images")
    url = url_of(s3_bucket)
    with pytest.raises(error) as info:
        StreamingSource(DataConfig(url=url), 2, 0, 1, seed=0)
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.url")
    if case == "missing shard":
        assert f"shard {s3_bucket}/ds/train-{len(existing):06d}.tar " in message
    elif isinstance(url, str):
        assert url in message


def test_a_manifest_naming_a_missing_shard_is_refused(s3_bucket: str) -> None:
    urls = write_shards(f"{s3_bucket}/ds")
    fsspec.core.url_to_fs(s3_bucket)[0].rm(urls[1])
    with pytest.raises(FileNotFoundError, match=urls[1]):
        resolve(f"{s3_bucket}/ds", 64)


def test_too_little_data_for_one_global_batch(s3_bucket: str) -> None:
    write_shards(f"{s3_bucket}/ds", samples=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StreamingSource(DataConfig(url=f"{s3_bucket}/ds"), 4, 0, 2, seed=0)
