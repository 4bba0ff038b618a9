"""Class labels (data.labels) and the validation reader: labels from .cls members and class
sub-folders, recorded in manifests, carried through shuffle, workers, skip-fill and resume, and
validation_batches covering a split once across ranks with the centre-crop transform."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_core.data import DataConfig, build_source, class_names, evaluation, num_classes
from mae_core.data.augment import MEAN, STD
from mae_core.data.demo import PHOTOS, build_demo, demo_classes
from mae_core.data.evaluation import ValidationSplit, validation_batches
from mae_core.data.readers import tar_samples
from mae_core.data.shard import ShardWriter, shard_folder
from mae_core.data.stream import DataError, StreamingSource

CLASSES = ["ant", "bee", "cat"]
FOLDER_IMAGES = 30
SIZE = 12  # the short side of every folder image, so its centre crop at SIZE is exact


def png(seed: int, width: int, height: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """30 PNGs in 3 class sub-folders, landscape (16x12) and portrait (12x16); the class of each path."""
    root = tmp_path_factory.mktemp("folder")
    classes = {}
    for i in range(FOLDER_IMAGES):
        rel = f"{CLASSES[(i * 7) % 3]}/img{i:02d}.png"
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(png(i, 16, 12) if i % 2 else png(i, 12, 16))
        classes[rel] = rel.split("/")[0]
    return root, classes


@pytest.fixture(scope="module")
def shards(folder: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> str:
    dest = str(tmp_path_factory.mktemp("shards"))
    manifest = shard_folder(str(folder[0]), dest, shard_bytes=12_000)
    assert len(manifest["shards"]) >= 3
    return dest


@pytest.fixture(scope="module")
def numbered(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, int]]:
    """48 samples in several shards, 5 classes, labels unrelated to position; 3 images corrupt."""
    dest = str(tmp_path_factory.mktemp("numbered"))
    labels = {}
    with ShardWriter(dest, shard_bytes=8_000, classes=[f"c{i}" for i in range(5)]) as writer:
        for i in range(48):
            label = (i * 7 + i // 5) % 5
            writer.add(f"{i:04d}", "png", b"not an image" if i in (9, 20, 33) else png(i, 10, 10), label)
            labels[f"{i:04d}"] = label
    return dest, labels


def key_of(sample_id: str) -> str:
    """A tar sample id is 'shard.tar/key'."""
    return sample_id.split("/", 1)[1]


def epoch(source: StreamingSource) -> list[tuple[tuple[torch.Tensor, torch.Tensor], list[str]]]:
    return list(itertools.islice(source.iter_with_ids(), source.batches_per_epoch))


def test_shard_folder_labels_every_sample_by_its_class_folder(folder: tuple[Path, dict[str, str]], shards: str,
                                                              tmp_path: Path) -> None:
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    assert manifest["num_classes"] == 3 and manifest["classes"] == CLASSES
    for url in (shards, str(folder[0])):  # the shards, and the image folder they were packed from
        cfg = DataConfig(url=url, input_size=8, labels=True)
        assert num_classes(cfg) == 3 and class_names(cfg) == CLASSES
        source = StreamingSource(cfg, 5, 0, 1, seed=0)
        seen = {}
        for (images, labels), ids in epoch(source):
            assert images.shape == (5, 3, 8, 8) and labels.shape == (5,) and labels.dtype == torch.int64
            for sample_id, label in zip(ids, labels.tolist(), strict=True):
                seen[key_of(sample_id) if url == shards else sample_id] = label
        assert seen == {rel.rsplit(".", 1)[0] if url == shards else rel: CLASSES.index(name)
                        for rel, name in folder[1].items()}
    # A manifest from before num_classes was recorded counts its class names.
    legacy = {k: v for k, v in manifest.items() if k != "num_classes"}
    legacy["shards"] = [s | {"name": f"{shards}/{s['name']}"} for s in manifest["shards"]]
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    assert num_classes(DataConfig(url=str(tmp_path))) == 3
    assert class_names(DataConfig(url=str(tmp_path / "manifest.json"))) == CLASSES
    flat = DataConfig(url=str(folder[0] / "ant"))  # images with no class sub-folder
    assert num_classes(flat) is None and class_names(flat) is None
    assert num_classes(DataConfig()) is None and class_names(DataConfig()) is None


@pytest.mark.parametrize("fmt", ["shards", "folder"])
def test_demo_samples_are_labelled_by_their_source_photo(tmp_path: Path, fmt: str) -> None:
    dest = str(tmp_path / "demo")
    build_demo(dest, 48, (20, 20), fmt, shard_bytes=20_000)
    cfg = DataConfig(url=dest, input_size=8, labels=True)
    names = demo_classes()
    assert names == sorted(p.split(".")[0] for p in PHOTOS)
    assert class_names(cfg) == names and num_classes(cfg) == len(PHOTOS) == 16
    if fmt == "shards":
        manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
        assert manifest["num_classes"] == 16 and manifest["classes"] == names and len(manifest["shards"]) > 1
    source = StreamingSource(cfg, 8, 0, 1, seed=0)
    seen = {}
    for (_, labels), ids in epoch(source):
        for sample_id, label in zip(ids, labels.tolist(), strict=True):
            # The key (or, in a folder, the file name) is "<photo>_<index>": the photo it was cut from.
            photo = sample_id.rsplit("/", 1)[1].rsplit("_", 1)[0]
            seen[sample_id] = photo
            assert names[label] == photo
    assert len(seen) == 48 and sorted(set(seen.values())) == names  # classes taken in turn: 3 of each


def test_labels_follow_images_through_shuffle_workers_and_skip_fill(numbered: tuple[str, dict[str, int]]) -> None:
    url, label_of = numbered
    cfg = DataConfig(url=url, input_size=8, num_workers=2, shuffle_buffer=6, max_skip_fraction=0.5)
    labelled = StreamingSource(cfg.model_copy(update={"labels": True}), 4, 1, 2, seed=3)
    plain = StreamingSource(cfg, 4, 1, 2, seed=3)
    n = labelled.batches_per_epoch
    with_labels = list(itertools.islice(labelled.iter_with_ids(), 2 * n))
    without = list(itertools.islice(plain.iter_with_ids(), 2 * n))
    filled = 0
    for ((images, labels), ids), (plain_images, plain_ids) in zip(with_labels, without, strict=True):
        assert ids == plain_ids and torch.equal(images, plain_images)  # labels change nothing else
        assert labels.tolist()[: len(ids)] == [label_of[key_of(i)] for i in ids]
        for row in range(len(ids), 4):  # a skipped slot repeats a good sample, label and all
            filled += 1
            assert labels[row] == labels[row % len(ids)] and torch.equal(images[row], images[row % len(ids)])
    assert filled > 0
    keys = [key_of(i) for _, ids in with_labels[:n] for i in ids]
    assert len(keys) == len(set(keys))  # the shuffle and both workers: no sample twice in an epoch
    assert keys != sorted(keys)


@pytest.mark.parametrize("stop", [3, 5])
def test_resume_gives_the_same_images_and_labels(numbered: tuple[str, dict[str, int]], stop: int) -> None:
    cfg = DataConfig(url=numbered[0], input_size=8, num_workers=2, shuffle_buffer=6, max_skip_fraction=0.5,
                     labels=True)
    reference = list(itertools.islice(StreamingSource(cfg, 4, 0, 1, seed=8).iter_with_ids(), stop + 4))
    interrupted = StreamingSource(cfg, 4, 0, 1, seed=8)
    list(itertools.islice(interrupted.iter_with_ids(), stop))
    resumed = StreamingSource(cfg, 4, 0, 1, seed=8)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    rest = list(itertools.islice(resumed.iter_with_ids(), 4))
    for ((images, labels), ids), ((ref_images, ref_labels), ref_ids) in zip(rest, reference[stop:], strict=True):
        assert ids == ref_ids and torch.equal(labels, ref_labels) and torch.equal(images, ref_images)
        assert labels.tolist()[: len(ids)] == [numbered[1][key_of(i)] for i in ids]


def test_a_batch_with_no_good_sample_takes_the_first_good_ones_with_their_labels(tmp_path: Path) -> None:
    url = str(tmp_path / "bad-start")
    with ShardWriter(url, shard_bytes=10**6) as writer:
        for i in range(12):
            writer.add(f"{i:02d}", "png", b"broken" if i < 4 else png(i, 10, 10), label=i)
    cfg = DataConfig(url=url, input_size=8, shuffle_buffer=1, max_skip_fraction=0.5, labels=True)
    source = StreamingSource(cfg, 4, 0, 1, seed=0)
    (fill, fill_labels), fill_ids = next(iter(source.iter_with_ids()))
    (first, first_labels), first_ids = next(itertools.islice(StreamingSource(cfg, 4, 0, 1, 0).iter_with_ids(), 1, 2))
    assert fill_ids == [] and [key_of(i) for i in first_ids] == ["04", "05", "06", "07"]
    assert fill_labels.tolist() == first_labels.tolist() == [4, 5, 6, 7] and torch.equal(fill, first)
    images, labels = next(iter(StreamingSource(cfg, 4, 0, 1, 0)))  # plain iteration: (images, labels) pairs
    assert torch.equal(images, fill) and torch.equal(labels, fill_labels)


def expected_crop(data: bytes) -> torch.Tensor:
    """The centre square of a 16x12 or 12x16 image at side 12: plain slicing, normalised by hand."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255
    h, w = pixels.shape[:2]
    top, left = (h - SIZE) // 2, (w - SIZE) // 2
    crop = (pixels[top : top + SIZE, left : left + SIZE] - np.array(MEAN)) / np.array(STD)
    return torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)


def storage_order(url: str) -> Iterator[tuple[bytes, int]]:
    """(image bytes, label) of every sample in manifest and tar order, read with plain tarfile."""
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    for shard in manifest["shards"]:
        with tarfile.open(Path(url) / shard["name"]) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            images = [tar.extractfile(m).read() for m in members if not m.name.endswith(".cls")]  # type: ignore[union-attr]
            labels = [int(tar.extractfile(m).read()) for m in members if m.name.endswith(".cls")]  # type: ignore[union-attr]
            yield from zip(images, labels, strict=True)


def test_validation_batches_cover_the_split_once_across_ranks(shards: str) -> None:
    cfg = DataConfig(url=shards, input_size=SIZE)  # data.labels is not needed for validation
    assert ValidationSplit(cfg).samples == FOLDER_IMAGES
    batches = {rank: list(validation_batches(cfg, 4, rank, 2)) for rank in (0, 1)}
    assert [len(b[1]) for b in batches[0]] == [len(b[1]) for b in batches[1]] == [4, 4, 4, 3]
    images = torch.cat([b[0] for rank in (0, 1) for b in batches[rank]])
    labels = torch.cat([b[1] for rank in (0, 1) for b in batches[rank]])
    expected = list(storage_order(shards))
    assert len(expected) == FOLDER_IMAGES and labels.dtype == torch.int64
    assert labels.tolist() == [label for _, label in expected]
    assert torch.allclose(images, torch.stack([expected_crop(data) for data, _ in expected]), atol=1e-5)
    # More ranks than batches: every sample once, some ranks with none, the last batch short.
    many = [list(validation_batches(cfg, 8, rank, 40)) for rank in range(40)]
    assert sum(not b for b in many) == 10 and sum(len(x[1]) for b in many for x in b) == FOLDER_IMAGES
    assert [int(x[1]) for b in many for x in b] == labels.tolist()


def test_a_validation_split_is_listed_once_however_many_epochs_read_it(shards: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation reads its split after every epoch: listing it again each time would cost a
    listing of ImageNet's validation set per epoch."""
    listed: list[str] = []
    real = evaluation.resolve
    monkeypatch.setattr(evaluation, "resolve", lambda *a, **k: listed.append(a[0]) or real(*a, **k))
    split = ValidationSplit(DataConfig(url=shards, input_size=SIZE))
    epochs = [[labels.tolist() for _, labels in split.share(4, 0, 1)[1]] for _ in range(3)]
    assert listed == [shards]
    assert epochs[0] == epochs[1] == epochs[2] and sum(map(len, epochs[0])) == FOLDER_IMAGES


def test_shards_without_labels_fail_in_one_line_naming_the_fix(tmp_path: Path) -> None:
    url = str(tmp_path / "unlabelled")
    with ShardWriter(url, shard_bytes=4_000) as writer:
        for i in range(16):
            writer.add(f"{i:02d}", "png", png(i, 10, 10), label=None if i == 13 else 1)
    # The manifest counts the labels it wrote (none named): it cannot tell that one is missing.
    assert json.loads((tmp_path / "unlabelled" / "manifest.json").read_text())["num_classes"] == 2
    for workers in (0, 2):
        source = StreamingSource(DataConfig(url=url, input_size=8, num_workers=workers, labels=True), 4, 0, 1, 0)
        with pytest.raises(DataError) as info:
            list(itertools.islice(source, source.batches_per_epoch))
        message = str(info.value)
        assert "\n" not in message and "/13 in " in message and "class sub-folders" in message
    with pytest.raises(DataError, match="/13 in .*data.labels false"):
        list(validation_batches(DataConfig(url=url, input_size=8), 4, 0, 1))
    flat = str(tmp_path / "flat")
    with ShardWriter(flat, shard_bytes=4_000) as writer:
        for i in range(8):
            writer.add(f"{i:02d}", "png", png(i, 10, 10))
    assert json.loads((tmp_path / "flat" / "manifest.json").read_text())["num_classes"] == 0
    for make in (lambda c: StreamingSource(c, 4, 0, 1, 0), lambda c: validation_batches(c, 4, 0, 1)):
        with pytest.raises(DataError, match="holds no class labels .*data.labels false") as info:
            make(DataConfig(url=flat, input_size=8, labels=True))  # refused before reading any shard
        assert "\n" not in str(info.value)


def test_image_folders_without_class_folders_and_synthetic_data_are_refused(tmp_path: Path) -> None:
    (tmp_path / "mixed" / "ant").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "mixed" / "ant" / f"{i}.png").write_bytes(png(i, 10, 10))
    (tmp_path / "mixed" / "stray.png").write_bytes(png(9, 10, 10))
    with pytest.raises(DataError, match="stray.png .* no class sub-folder"):
        StreamingSource(DataConfig(url=str(tmp_path / "mixed"), labels=True), 2, 0, 1, 0)
    with pytest.raises(DataError, match="sit in no class sub-folder"):
        StreamingSource(DataConfig(url=str(tmp_path / "mixed" / "ant"), labels=True), 2, 0, 1, 0)
    synthetic = DataConfig(labels=True)
    for make in (lambda: build_source(synthetic, 4, 0, 1, 0), lambda: StreamingSource(synthetic, 4, 0, 1, 0),
                 lambda: validation_batches(DataConfig(), 4, 0, 1), lambda: ValidationSplit(DataConfig())):
        with pytest.raises(ValueError, match=r"needs a data.url with labels \(tar shards with .cls members"):
            make()
    assert next(iter(build_source(DataConfig(), 4, 0, 1, 0))).shape == (4, 3, 32, 32)  # unchanged without labels


def test_a_cls_member_before_or_after_its_image_and_a_writer_refusing_bad_labels(tmp_path: Path) -> None:
    out = io.BytesIO()
    members = [("a.cls", b"3"), ("a.png", b"A"), ("b.png", b"B"), ("b.cls", b"4\n"), ("c.png", b"C"),
               ("d.png", b"D"), ("d.cls", b"x"), ("e.cls", b"0"), ("e.png", b"E")]
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    def read(wanted: set[int], labels: bool) -> list[tuple[int, str, bytes, int | None]]:
        return list(tar_samples(io.BytesIO(out.getvalue()), wanted, max(wanted), labels))

    assert read({0, 1, 2, 3, 4}, True) == [(0, "a", b"A", 3), (1, "b", b"B", 4), (2, "c", b"C", None),
                                           (3, "d", b"D", None), (4, "e", b"E", 0)]
    assert read({1, 3}, True) == [(1, "b", b"B", 4), (3, "d", b"D", None)]
    assert read({0, 4}, False) == [(0, "a", b"A", None), (4, "e", b"E", None)]
    with ShardWriter(str(tmp_path / "w"), 10**6, classes=["x", "y"]) as writer:
        with pytest.raises(ValueError, match="label 2 is outside 0..1"):
            writer.add("k", "png", b"", 2)
        writer.add("k", "png", png(0, 4, 4), 1)
