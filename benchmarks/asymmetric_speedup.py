"""Training-step speed-up of MAE's asymmetric design: encoder on the visible patches only.

MAE's main efficiency claim (He et al. 2021, Table 2) is that an encoder which never sees mask
tokens trains ViT-L 2.8x faster (8-block decoder) and 3.7x faster (1-block decoder) than the same
model whose encoder processes every position, removed ones as a mask token (Table 1c baseline,
``mask_tokens_in_encoder=True``). This script measures that ratio for mae_core's model: the
baseline is the same architecture, same mask ratio, same masks and the same input, timed in the
same run, so only the encoder's token count differs.

One training step is forward + backward in fp32 on CPU, timed after warm-up, median of several
iterations. MAE and baseline steps alternate (and swap order every iteration) so machine drift
hits both alike. Alongside the wall-clock ratio it prints the ratio of counted training FLOPs
(matmuls, convolutions and attention, forward + backward), which is the speed-up a machine with
no per-step overheads would see; the paper quotes 3.3x for ViT-L with the 8-block decoder
(Table 1c).

    python benchmarks/asymmetric_speedup.py [--archs large,base] [--batch 2] [--iters 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import OtherLoad
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mae_core.model import MaskedAutoencoderViT, build_model

ARCHS = {"large": "mae_vit_large_patch16", "base": "mae_vit_base_patch16", "huge": "mae_vit_huge_patch14"}
# He et al. 2021, Table 2 (128 TPU-v3 cores, TensorFlow, 800 epochs, mask ratio 0.75).
PAPER_SPEEDUP = {("large", 8): 2.8, ("large", 1): 3.7, ("huge", 8): 3.5, ("huge", 1): 4.1}


@dataclass
class Result:
    arch: str
    decoder_depth: int
    tokens: tuple[int, int]
    mae: list[float]
    baseline: list[float]
    flops: tuple[int, int]
    other_load: float | None


def _sdpa_flops(q: torch.Size, k: torch.Size, v: torch.Size, *args: object, out_shape: object = None,
                **kwargs: object) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_backward_flops(grad_out: torch.Size, q: torch.Size, k: torch.Size, v: torch.Size, *args: object,
                         out_shape: object = None, **kwargs: object) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# torch's counter knows only the GPU attention kernels; without these, attention (quadratic in the
# token count, so the part that favours MAE most) would count as zero on CPU.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


def make_step(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float, seed: int,
              optimizer: torch.optim.Optimizer | None) -> Callable[[], float]:
    """A closure running one training step and returning its wall-clock seconds."""
    # Both models draw from identically seeded generators, so iteration i masks the same patches in each.
    generator = torch.Generator().manual_seed(seed)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _, _ = model(imgs, mask_ratio=mask_ratio, generator=generator)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return time.perf_counter() - start

    return step


def count_flops(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float) -> int:
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        loss, _, _ = model(imgs, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(0))
        loss.backward()
    return counter.get_total_flops()


def measure(arch: str, decoder_depth: int, args: argparse.Namespace, console: Console) -> Result:
    torch.manual_seed(args.seed)
    models = {name: build_model(ARCHS[arch], decoder_depth=decoder_depth, img_size=args.img_size,
                                mask_tokens_in_encoder=name == "baseline").train()
              for name in ("mae", "baseline")}
    imgs = torch.rand(args.batch, 3, args.img_size, args.img_size)
    flops = {name: count_flops(model, imgs, args.mask_ratio) for name, model in models.items()}
    steps = {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if args.optimizer == "adamw" else None
        steps[name] = make_step(model, imgs, args.mask_ratio, args.seed, optimizer)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {"mae": [], "baseline": []}
    with OtherLoad() as load:
        for i in range(args.iters):
            for name in ("mae", "baseline") if i % 2 == 0 else ("baseline", "mae"):
                times[name].append(steps[name]())
    mae = models["mae"]
    visible = mae.sample_mask(1, args.mask_ratio).ids_keep.shape[1]
    result = Result(arch, decoder_depth, (visible + 1, mae.num_patches + 1), times["mae"], times["baseline"],
                    (flops["mae"], flops["baseline"]), load.share)
    console.print(f"ViT-{arch[0].upper()} dec {decoder_depth}: MAE {', '.join(f'{t:.2f}' for t in times['mae'])} s; "
                  f"baseline {', '.join(f'{t:.2f}' for t in times['baseline'])} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="large,base", help=f"comma-separated, of {', '.join(ARCHS)}")
    parser.add_argument("--decoder-depths", default="8,1", help="comma-separated decoder depths")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per model and config")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and config")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    # Off by default: at the paper's batch of 4096 the optimizer step is a negligible share of a step,
    # at batch 2 on a CPU it is not, and it costs the same in both models, so it would only dilute the ratio.
    parser.add_argument("--optimizer", choices=("none", "adamw"), default="none",
                        help="also time an AdamW step (same cost in both models)")
    args = parser.parse_args()
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown arch {', '.join(unknown)}; use {', '.join(ARCHS)}")
    depths = [int(d) for d in args.decoder_depths.split(",")]

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # Off a terminal (pipes, logs) rich would squeeze the table into 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    began = time.perf_counter()
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
                  f"{args.img_size} px, mask ratio {args.mask_ratio}, optimizer {args.optimizer}, "
                  f"{args.warmup} warm-up + {args.iters} timed steps each")
    results = [measure(arch, depth, args, console) for arch in archs for depth in depths]

    table = Table(title="Training step (forward + backward), fp32, median seconds")
    for col in ("model", "dec. depth", "enc. tokens MAE/base", "MAE s/step", "baseline s/step",
                "speed-up", "FLOP ratio", "paper (TPU)", "other load"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        mae, base = statistics.median(r.mae), statistics.median(r.baseline)
        paper = PAPER_SPEEDUP.get((r.arch, r.decoder_depth))
        table.add_row(f"ViT-{r.arch[0].upper()}/{ARCHS[r.arch][-2:]}", str(r.decoder_depth),
                      f"{r.tokens[0]}/{r.tokens[1]}", f"{mae:.3f}", f"{base:.3f}", f"{base / mae:.2f}x",
                      f"{r.flops[1] / r.flops[0]:.2f}x", "-" if paper is None else f"{paper:.1f}x",
                      "n/a" if r.other_load is None else f"{100 * r.other_load:.0f}%")
    console.print(table)
    console.print("speed-up = baseline / MAE (baseline: encoder also sees mask tokens, Table 1c); FLOP ratio = "
                  "counted training FLOPs baseline / MAE; paper = He et al. 2021 Table 2, wall-clock on TPU-v3; "
                  "other load = CPU share other processes took during the timed steps (above ~10%, rerun)")
    console.print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
