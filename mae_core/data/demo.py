"""A real-photo dataset built offline: random crops of the photographs bundled with scikit-image.

Each sample is a random crop (15-100% of the photo's area) rescaled to the requested size and saved
as JPEG, labelled by its source photo. Only the image files are read, with Pillow; scikit-image is
never imported.
"""

from __future__ import annotations

import importlib.util
import io
import math
import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import fsspec
from PIL import Image

from mae_core.data.shard import Progress, ShardWriter

# The natural photographs among the bundled images (no charts, scans, masks or duplicates).
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
          "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
          "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
Format = Literal["shards", "folder"]


def photo_folder() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo dataset is cut from scikit-image's bundled photos; "
                           "install it with pip install 'maestro[demo]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def demo_classes() -> list[str]:
    """The demo dataset's class names in label order: its source photos' names, sorted."""
    return sorted(name.split(".")[0] for name in PHOTOS)


def parse_image_size(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '500x375' -> (500, 375), width first."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size {text!r} is not an image size; write it like 64 or 500x375")
    return int(parts[0]), int(parts[-1])


def demo_samples(count: int, size: tuple[int, int], seed: int = 0) -> Iterator[tuple[str, str, bytes]]:
    """(class, key, JPEG bytes) of ``count`` samples, classes taken in turn so they stay balanced."""
    folder = photo_folder()
    photos = {name.split(".")[0]: Image.open(folder / name).convert("RGB") for name in PHOTOS}
    names = sorted(photos)
    rng = random.Random(seed)
    aspect = size[0] / size[1]
    for index in range(count):
        name = names[index % len(names)]
        photo = photos[name]
        area = photo.width * photo.height * rng.uniform(0.15, 1.0)
        # The crop has the output's aspect, shrunk to fit the photo, so nothing is stretched.
        w = math.sqrt(area * aspect)
        fit = min(1.0, photo.width / w, photo.height * aspect / w)
        w, h = w * fit, w * fit / aspect
        left, top = rng.uniform(0, max(0.0, photo.width - w)), rng.uniform(0, max(0.0, photo.height - h))
        crop = photo.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        out = io.BytesIO()
        crop.save(out, "JPEG", quality=90)
        yield name, f"{name}_{index:06d}", out.getvalue()


def build_demo(dest: str, count: int, size: tuple[int, int], fmt: Format = "shards", seed: int = 0,
               shard_bytes: int = 64 * 2**20, jobs: int = 4, progress: Progress | None = None) -> int:
    """Write the demo dataset to ``dest``: tar shards with ``.cls`` labels and a manifest, or an image
    folder with one sub-folder per photo. A sample's class is its source photo: the label is the
    photo's index among the sorted photo names (``demo_classes``), the class name the photo's name,
    and the manifest records them (``classes``, ``num_classes``). Returns the bytes written."""
    classes = demo_classes()
    label_of = {name: index for index, name in enumerate(classes)}
    written = 0
    if fmt == "shards":
        with ShardWriter(dest, shard_bytes, "train", jobs, classes) as writer:
            for done, (name, key, data) in enumerate(demo_samples(count, size, seed), 1):
                writer.add(key, "jpg", data, label_of[name])
                written += len(data)
                if progress is not None:
                    progress(done, count, len(data))
        return written
    fs, root = fsspec.core.url_to_fs(dest)
    root = root.rstrip("/")
    for name in classes:
        fs.makedirs(f"{root}/{name}", exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        uploads: list[Future[None]] = []
        for done, (name, key, data) in enumerate(demo_samples(count, size, seed), 1):
            while len(uploads) >= 4 * jobs:  # bounded in flight, however large the dataset
                uploads.pop(0).result()
            uploads.append(pool.submit(fs.pipe_file, f"{root}/{name}/{key}.jpg", data))
            written += len(data)
            if progress is not None:
                progress(done, count, len(data))
        for upload in uploads:
            upload.result()
    return written
