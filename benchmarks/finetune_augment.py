"""What the fine-tune's augmentation costs per image, against pre-training's, on one core.

Both decode ImageNet-size (500x375) JPEGs cut from the demo photos and take a random crop to
``--size`` with a flip. Pre-training's stops there (scale 0.2-1). The fine-tune's (the official
recipe: scale 0.08-1, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) goes on. The two run
in interleaved rounds so that machine drift hits them alike; the ratio is fine-tune over
pre-training time per image, from the same run.

    python benchmarks/finetune_augment.py [--images 200] [--size 224] [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

from data_throughput import per_core_rate

from mae_core.data.augment import PRETRAINING
from mae_core.data.config import EVAL_CROP_SCALE, Augmentation, RandAugmentConfig
from mae_core.data.demo import demo_samples

FINETUNE = Augmentation(crop_scale=EVAL_CROP_SCALE, rand_augment=RandAugmentConfig(), erase=0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=4.0, help="per augmentation per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    images = [data for _, _, data in demo_samples(args.images, (500, 375), seed=0)]
    rates: dict[str, list[float]] = {"pre-training": [], "fine-tune": []}
    for epoch in range(args.rounds):
        rates["pre-training"].append(per_core_rate(images, args.size, args.seconds, PRETRAINING, epoch))
        rates["fine-tune"].append(per_core_rate(images, args.size, args.seconds, FINETUNE, epoch))
    for name, values in rates.items():
        print(f"{name:>12}: {statistics.median(values):7.1f} img/s on one core "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(rates["pre-training"]) / statistics.median(rates["fine-tune"])
    print(f"fine-tune augmentation costs {ratio:.2f}x pre-training's per image at {args.size} px")


if __name__ == "__main__":
    main()
