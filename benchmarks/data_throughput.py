"""Images per second through the data pipeline (decode + RandomResizedCrop + flip + normalise).

Three sources, same worker count, same run: tar shards on a moto S3 server started here on
127.0.0.1, the same shards on local disk, and decode + augmentation alone from memory (the floor:
no storage, no tar parsing). Sources are measured in interleaved rounds so machine drift hits
them alike. Images are ImageNet-size (500x375) JPEGs cut from the demo photos.

    python benchmarks/data_throughput.py [--workers 2] [--seconds 6] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from common import start_moto
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mae_core.data import DataConfig
from mae_core.data.augment import PRETRAINING, augment, normalise, sample_rng
from mae_core.data.config import Augmentation
from mae_core.data.demo import demo_samples
from mae_core.data.shard import ShardWriter
from mae_core.data.stream import StreamingSource

PUBLISHED_PER_CORE = 300  # img/s/core, decode + RandomResizedCrop of ImageNet JPEGs with Pillow


class InMemory(IterableDataset):
    """Decode + augment + normalise of in-memory JPEGs, split across workers like the real readers."""

    def __init__(self, images: list[bytes], batch: int, size: int) -> None:
        self.images, self.batch, self.size = images, batch, size

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.images[worker::workers]
        for epoch in range(10**9):
            for start in range(0, len(mine) - self.batch + 1, self.batch):
                crops = [augment(data, self.size, sample_rng(0, epoch, str(start + i)))
                         for i, data in enumerate(mine[start : start + self.batch])]
                yield normalise(np.stack(crops))


def rate(batches: Iterator[torch.Tensor], seconds: float) -> float:
    """Images/s after a warm-up batch (worker start-up and first reads are not throughput)."""
    next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches))
    return count / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_core_rate(images: list[bytes], size: int, seconds: float, aug: Augmentation = PRETRAINING,
                  epoch: int = 0) -> float:
    """Decode + augmentation (pre-training's: RandomResizedCrop + flip) on one core, no
    normalisation or batching."""
    torch.set_num_threads(1)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        augment(images[count % len(images)], size, sample_rng(0, epoch, str(count)), aug=aug)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--shard-mib", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0, help="per source per round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    began = time.perf_counter()
    samples = list(demo_samples(args.images, (500, 375), seed=0))
    images = [data for _, _, data in samples]
    print(f"{len(images)} JPEGs 500x375, mean {np.mean([len(d) for d in images]) / 1024:.0f} KiB, "
          f"built in {time.perf_counter() - began:.1f}s")
    server = start_moto()
    try:
        import s3fs

        s3fs.S3FileSystem().mkdir("bench")
        with tempfile.TemporaryDirectory() as tmp:
            urls = {"local": f"{tmp}/shards", "s3": "s3://bench/shards"}
            for url in urls.values():
                with ShardWriter(url, args.shard_mib * 2**20) as writer:
                    for _, key, data in samples:
                        writer.add(key, "jpg", data)
            print(f"{len(writer.manifest['shards'])} shards of <= {args.shard_mib} MiB, local and on moto S3")

            def stream(url: str) -> Callable[[], Iterator[torch.Tensor]]:
                cfg = DataConfig(url=url, input_size=args.size, num_workers=args.workers)
                return lambda: iter(StreamingSource(cfg, args.batch, 0, 1, seed=0))

            def memory() -> Iterator[torch.Tensor]:
                loader = DataLoader(InMemory(images, args.batch, args.size), batch_size=None,
                                    num_workers=args.workers)
                return iter(loader)

            sources = {"memory": memory, "local": stream(urls["local"]), "s3": stream(urls["s3"])}
            results: dict[str, list[float]] = {name: [] for name in sources}
            server_cpu = s3_wall = 0.0
            for _ in range(args.rounds):
                for name, make in sources.items():
                    cpu, wall = cpu_seconds(server.pid), time.perf_counter()
                    results[name].append(rate(make(), args.seconds))
                    if name == "s3":
                        server_cpu += cpu_seconds(server.pid) - cpu
                        s3_wall += time.perf_counter() - wall
    finally:
        server.terminate()
        server.wait(timeout=10)
    core = per_core_rate(images, args.size, min(args.seconds, 5.0))

    best = {name: statistics.median(r) for name, r in results.items()}
    print(f"\nworkers={args.workers} batch={args.batch} size={args.size} cores={os.cpu_count()} "
          f"torch={torch.__version__}")
    print(f"{'source':<8} {'img/s (median)':>15}  rounds")
    for name, value in best.items():
        print(f"{name:<8} {value:>15.0f}  {', '.join(f'{r:.0f}' for r in results[name])}")
    print(f"S3/local     {best['s3'] / best['local']:.2f}  (target >= 0.90); the moto server used "
          f"{100 * server_cpu / s3_wall:.0f}% of a core of this machine during the S3 rounds")
    print(f"local/memory {best['local'] / best['memory']:.2f}")
    print(f"one core: decode + RandomResizedCrop + flip {core:.0f} img/s "
          f"({core / PUBLISHED_PER_CORE:.1f}x the published ~{PUBLISHED_PER_CORE} img/s/core)")
    print(f"total {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
