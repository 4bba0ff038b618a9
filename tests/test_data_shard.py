"""The ``shard`` and ``demo`` commands: shards on S3 hold the source bytes; the demo data reads back."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from mae_core.data import DataConfig
from mae_core.data.__main__ import main
from mae_core.data.demo import PHOTOS
from mae_core.data.shard import sample_key
from mae_core.data.stream import StreamingSource


def make_folder(root: Path, classes: bool) -> dict[str, bytes]:
    """Mixed formats and awkward names: upper-case extensions, dots inside the stem."""
    files = {}
    for i in range(24):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8)
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("JPEG", "JPEG"), ("WEBP", "webp")][i % 4]
        name = f"photo.{i:02d}.{ext}" if i % 5 == 0 else f"photo{i:02d}.{ext}"
        rel = f"{['cat', 'dog', 'eel'][i % 3]}/{name}" if classes else name
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, fmt)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(out.getvalue())
        files[rel] = out.getvalue()
    return files


def read_back(url: str) -> tuple[dict, dict[str, bytes], dict[str, int]]:
    """(manifest, image bytes by key, label by key) read with plain tarfile."""
    fs = fsspec.core.url_to_fs(url)[0]
    manifest = json.loads(fs.cat_file(f"{url}/manifest.json"))
    images, labels = {}, {}
    for shard in manifest["shards"]:
        data = fs.cat_file(f"{url}/{shard['name']}")
        assert len(data) == shard["bytes"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            assert len([m for m in members if not m.name.endswith(".cls")]) == shard["samples"]
            for m in members:
                key, _, ext = m.name.partition(".")
                payload = tar.extractfile(m).read()  # type: ignore[union-attr]
                if ext == "cls":
                    labels[key] = int(payload)
                else:
                    images[key] = payload
    return manifest, images, labels


@pytest.mark.parametrize("classes", [True, False], ids=["classes", "flat"])
def test_shard_command_writes_byte_identical_images_to_s3(tmp_path: Path, s3_bucket: str, classes: bool) -> None:
    files = make_folder(tmp_path / "src", classes)
    dest = f"{s3_bucket}/shards"
    done = subprocess.run([sys.executable, "-m", "mae_core.data", "shard", str(tmp_path / "src"), dest,
                           "--shard-size", "20KB", "--jobs", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest, images, labels = read_back(dest)
    assert manifest["samples"] == len(files) == len(images) and len(manifest["shards"]) > 2
    assert all(s["bytes"] <= 20_000 for s in manifest["shards"])
    for rel, data in files.items():
        assert images[sample_key(rel)[0]] == data
    if classes:
        assert manifest["classes"] == ["cat", "dog", "eel"]
        assert all(labels[sample_key(rel)[0]] == manifest["classes"].index(rel.split("/")[0]) for rel in files)
    else:
        assert not labels and manifest["classes"] == []
    source = StreamingSource(DataConfig(url=dest, input_size=16), 4, 0, 1, seed=0)
    ids = [i for _, b in itertools.islice(source.iter_with_ids(), source.batches_per_epoch) for i in b]
    assert len(set(ids)) == len(files) and source.metrics()["data/skipped"] == 0


def test_shard_command_names_a_missing_source_in_one_line(tmp_path: Path, s3_bucket: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shard", str(tmp_path / "absent"), f"{s3_bucket}/x"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "absent") in last


@pytest.mark.parametrize("fmt", ["shards", "folder"])
def test_demo_dataset_reads_back(s3_bucket: str, fmt: str) -> None:
    dest = f"{s3_bucket}/demo"
    assert main(["demo", dest, "--images", "48", "--size", "40", "--format", fmt, "--shard-size", "30KB"]) == 0
    source = StreamingSource(DataConfig(url=dest, input_size=32), 8, 0, 1, seed=0)
    assert source.batches_per_epoch == 6
    batches = list(itertools.islice(source.iter_with_ids(), 6))
    ids = [i for _, b in batches for i in b]
    assert len(set(ids)) == 48 and source.metrics()["data/skipped"] == 0
    photos = {p.split(".")[0] for p in PHOTOS}
    if fmt == "folder":
        assert {i.split("/")[0] for i in ids} == photos
    else:
        manifest, images, labels = read_back(dest)
        assert manifest["classes"] == sorted(photos) and len(manifest["shards"]) > 1
        assert all(manifest["classes"][labels[k]] == k.rsplit("_", 1)[0] for k in images)
        assert Image.open(io.BytesIO(next(iter(images.values())))).size == (40, 40)
