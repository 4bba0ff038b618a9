"""Model FLOPs utilisation (MFU) of full MAE training steps: ViT-B/L/H, fp32 and bf16.

What: the images per second and the share of the device's peak FLOP/s that a whole training step
reaches, run the way mae_core.train runs it: ``init_distributed()`` (a one-rank group without a
launcher, the whole world under torchrun), ``parallelize()`` (activation checkpointing,
per-block ``torch.compile`` and FSDP2; with bf16, FSDP2 gathers bf16 parameters and reduces fp32
gradients, and there is no autocast, as in the trainer), fused AdamW from ``build_optimizer``, a
masked forward with ``mask_generator``'s masks, backward, optimizer step and ``zero_grad``.

Why: img/s alone cannot tell a slow model from a slow machine. MFU divides the model FLOPs the
step performs by the time it took and by the device's peak, so it says how much of the hardware a
configuration uses, and it compares across models, batch sizes and devices.

How it counts and times:

- Model FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward
  of an unwrapped copy of the model, plus the attention FLOPs the counter misses (on CPU it
  counts 0 for ``scaled_dot_product_attention``): 4*B*N^2*d forward per attention layer, twice
  that backward, with N and d read from each layer's input. The counter's own per-op table says
  how much attention it already counted, so nothing is counted twice. The optimizer step and
  activation-checkpoint recomputation are not model FLOPs (the usual MFU convention).
- Peak FLOP/s: ``--peak-tflops`` if given (the data-sheet figure), otherwise measured here by
  timing a large matmul in the run's dtype ("measured peak": what this device, library and
  ``float32_matmul_precision`` actually reach, so fp32 runs are compared with the fp32, or TF32,
  matmul rate they get).
- Step time: median of ``--steps`` steps after ``--warmup`` steps, with ``torch.cuda.synchronize``
  around each step on GPU. Under torchrun a step counts as long as the slowest rank's.
- Batch: ``--batch`` per device. Without it: 2 on CPU (a smoke test); on GPU it doubles from 8
  until a step runs out of memory or reaches ``--max-batch``, and keeps the largest that fit.
- The baseline from the same run: bf16 img/s / fp32 img/s for each model.

    python benchmarks/mfu.py --steps 3 --warmup 1          # CPU smoke test: ViT-B, batch 2, fp32 + bf16
    python benchmarks/mfu.py                                # GPU: ViT-B/L/H, batch sized to memory
    python benchmarks/mfu.py --models huge --precision bf16 --compile --peak-tflops bf16=989,fp32=67
    torchrun --nproc_per_node 8 benchmarks/mfu.py           # one node, FSDP2 over 8 ranks

Options: --models, --precision, --compile, --activation-checkpointing, --batch, --max-batch,
--steps, --warmup, --peak-tflops, --img-size, --mask-ratio, --threads, --seed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import OtherLoad
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mae_core.config import RuntimeConfig
from mae_core.distributed import DistEnv, init_distributed, parallelize, shutdown
from mae_core.model import Attention, MaskedAutoencoderViT, build_model
from mae_core.optim import build_optimizer, set_lr
from mae_core.train import mask_generator

MODELS = {"base": "mae_vit_base_patch16", "large": "mae_vit_large_patch16", "huge": "mae_vit_huge_patch14"}
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Paper-level training FLOPs per image (224 px, mask 0.75, 8x512 decoder; about 3x the masked forward).
PAPER_GFLOP_PER_IMAGE = {"base": 58.0, "large": 124.0, "huge": 290.0}
GPU_BATCH_START = 8


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs (forward + backward) for one image."""

    counted: int  # FlopCounterMode's total, whatever attention it saw included
    attention_expected: int  # 4*N^2*d forward + 8*N^2*d backward, summed over attention layers
    attention_counted: int  # the part of ``counted`` that the counter booked to attention kernels
    encoder_tokens: int
    decoder_tokens: int

    @property
    def attention_added(self) -> int:
        return max(0, self.attention_expected - self.attention_counted)

    @property
    def total(self) -> int:
        return self.counted + self.attention_added


@dataclass(frozen=True)
class Peak:
    tflops: float
    source: str  # "given" or "measured"


@dataclass
class Row:
    model: str
    precision: str
    batch: int  # per device
    world: int
    times: list[float]
    flops: FlopCount
    peak: Peak
    max_mem_gib: float | None
    other_load: float | None
    loss: float

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)

    @property
    def img_s(self) -> float:
        return self.batch * self.world / self.step_s

    @property
    def achieved_tflops(self) -> float:
        """Per device: each rank runs its own per-device batch through the whole model."""
        return self.flops.total * self.batch / self.step_s / 1e12

    @property
    def mfu(self) -> float:
        return self.achieved_tflops / self.peak.tflops


def is_attention_op(op: object) -> bool:
    """Ops where the counter books the attention core: the fused SDPA kernels (and their backward)
    it knows, or bmm, which is what SDPA's math fallback decomposes into. The MAE model has no
    other batched matmuls (its linears become mm/addmm), so bmm here is attention."""
    name = str(op)
    return "scaled_dot_product" in name or name in ("aten.bmm", "aten.baddbmm")


def count_flops(arch: str, img_size: int, mask_ratio: float, device: torch.device) -> FlopCount:
    """Training FLOPs per image, counted on an unwrapped fp32 copy at batch 1 (every counted op is
    linear in the batch). Not on the FSDP2 model: the counter would see DTensor plumbing and
    compiled blocks (whose insides it cannot see), and with activation checkpointing it would add
    the recomputed forward, which is not a model FLOP. Precision does not change the count."""
    model = build_model(arch, img_size=img_size).to(device).train()
    imgs = torch.randn(1, 3, img_size, img_size, device=device)
    shapes: list[tuple[int, int, int]] = []

    def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        b, n, d = inputs[0].shape
        shapes.append((b, n, d))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Attention)]
    try:
        with FlopCounterMode(display=False) as counter:
            loss, _, _ = model(imgs, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(0))
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    per_op = counter.get_flop_counts()["Global"]
    attention_counted = sum(flops for op, flops in per_op.items() if is_attention_op(op))
    # Forward: QK^T and AV, 2*N^2*d each. Backward: dV, dP, dQ, dK, the same size each (torch's own
    # sdpa_backward_flop_count is also 2x forward).
    attention_expected = sum(12 * b * n * n * d for b, n, d in shapes)
    encoder_tokens = shapes[0][1]
    decoder_tokens = shapes[-1][1]
    flops = FlopCount(counter.get_total_flops(), attention_expected, attention_counted, encoder_tokens,
                      decoder_tokens)
    del model, imgs, loss
    free_memory(device)
    return flops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_peak(dtype: torch.dtype, device: torch.device) -> float:
    """Best TFLOP/s of ``F.linear`` on square matrices in ``dtype``, over sizes doubling from 256
    while one product takes under 0.2 s (up to 8192 on GPU, 2048 on CPU).

    ``F.linear`` (a @ b.T), the layout of every nn.Linear forward, not ``a @ b``: on a CPU without
    bf16 instructions (AVX2 only) bf16 ``a @ b`` runs at ~1 GFLOP/s and ``F.linear`` at ~19, so a
    plain matmul would understate the bf16 peak tenfold. The best over all sizes, not the largest
    size's rate, for the same reason (small bf16 products can be the fastest there); on a GPU the
    largest size wins anyway. Each timing covers enough products to last ~20 ms."""
    cap = 8192 if device.type == "cuda" else 2048
    best, n = 0.0, 256
    while n <= cap:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        F.linear(a, b)  # warm-up: kernel selection, allocation, clocks
        synchronize(device)
        start = time.perf_counter()
        F.linear(a, b)
        synchronize(device)
        single = time.perf_counter() - start
        inner = max(1, int(0.02 / max(single, 1e-6)))
        spent, reps = 0.0, 0
        while reps < 3 or (spent < 0.5 and reps < 20):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                F.linear(a, b)
            synchronize(device)
            elapsed = time.perf_counter() - start
            best = max(best, 2 * n**3 * inner / elapsed)
            spent, reps = spent + elapsed, reps + 1
        if single >= 0.2:
            break
        n *= 2
    return best / 1e12


def parse_peaks(text: str | None) -> dict[str, float]:
    """``989`` (every precision) or ``bf16=989,fp32=67``, in TFLOP/s."""
    if not text:
        return {}
    if "=" not in text:
        return dict.fromkeys(PRECISIONS, float(text))
    peaks = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in PRECISIONS:
            raise ValueError(f"--peak-tflops: unknown precision {key.strip()!r}; use {', '.join(PRECISIONS)}")
        peaks[key.strip()] = float(value)
    return peaks


def over_ranks(value: float, env: DistEnv, how: Literal["mean", "max", "min"]) -> float:
    """``value`` reduced over all ranks (every rank gets the result)."""
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    op = {"mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[how]
    dist.all_reduce(t, op=op)
    return t.item() / env.world_size if how == "mean" else t.item()


class Trainer:
    """One model under ``parallelize`` with its optimizer, and the trainer's step."""

    def __init__(self, arch: str, precision: str, batch: int, args: argparse.Namespace, env: DistEnv) -> None:
        if args.compile:
            torch._dynamo.reset()  # a fresh compile cache per configuration, far from the recompile limit
        torch.manual_seed(args.seed)  # identical initial weights on every rank, as in the trainer
        model = build_model(arch, img_size=args.img_size).to(env.device)
        runtime = RuntimeConfig(per_device_batch=batch, precision=precision,
                                activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                                threads=args.threads)
        self.model: MaskedAutoencoderViT = parallelize(model, env, runtime)
        self.optimizer = build_optimizer(self.model, weight_decay=0.05, betas=(0.9, 0.95))
        set_lr(self.optimizer, 1.5e-4)  # the value does not change the cost; 0 might let a kernel skip work
        self.model.train()
        self.env, self.mask_ratio, self.seed = env, args.mask_ratio, args.seed
        self.imgs = torch.randn(batch, 3, args.img_size, args.img_size, device=env.device)
        self.loss = torch.zeros((), device=env.device)
        self.count = 0

    def step(self) -> float:
        """One training step, as mae_core.train runs it with one micro-batch; returns seconds."""
        synchronize(self.env.device)
        start = time.perf_counter()
        # bf16 needs no autocast: FSDP2's MixedPrecisionPolicy casts parameters and inputs (as in mae_core.train).
        gen = mask_generator(self.seed, self.count, self.env.rank)
        loss, _, _ = self.model(self.imgs, mask_ratio=self.mask_ratio, generator=gen)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.env.device)
        elapsed = time.perf_counter() - start
        self.loss = loss.detach()
        self.count += 1
        return elapsed

    def close(self) -> None:
        del self.model, self.optimizer, self.imgs, self.loss
        free_memory(self.env.device)


def fits(arch: str, precision: str, batch: int, args: argparse.Namespace, env: DistEnv) -> bool:
    """Whether two training steps at ``batch`` run without CUDA OOM on every rank. Ranks run the
    same shapes, so they run out of memory at the same point; a rank that alone ran out in the
    middle of an FSDP collective would leave the others waiting (pass --batch to avoid the search)."""
    ok = 1.0
    trainer: Trainer | None = None
    try:
        trainer = Trainer(arch, precision, batch, args, env)
        trainer.step()
        trainer.step()  # the second step holds optimizer state and gradients at once
    except torch.OutOfMemoryError:
        ok = 0.0
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None
        free_memory(env.device)
    return over_ranks(ok, env, "min") > 0


def find_batch(arch: str, precision: str, args: argparse.Namespace, env: DistEnv, console: Console) -> int:
    """The largest power-of-two batch from GPU_BATCH_START up to --max-batch whose step fits (halving
    below the start when even that does not fit)."""
    batch = min(GPU_BATCH_START, args.max_batch)
    if not fits(arch, precision, batch, args, env):
        while batch > 1:
            batch //= 2
            if fits(arch, precision, batch, args, env):
                return batch
        raise RuntimeError(f"{arch} {precision}: a batch of 1 does not fit in device memory")
    while batch * 2 <= args.max_batch and fits(arch, precision, batch * 2, args, env):
        batch *= 2
        if env.is_main:
            console.print(f"  {arch} {precision}: batch {batch} fits")
    return batch


def run_one(model: str, precision: str, flops: FlopCount, peak: Peak, args: argparse.Namespace, env: DistEnv,
            console: Console) -> Row:
    arch = MODELS[model]
    if args.batch is not None:
        batch = args.batch
    elif env.device.type == "cuda":
        batch = find_batch(arch, precision, args, env, console)
    else:
        batch = 2
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    trainer = Trainer(arch, precision, batch, args, env)
    began = time.perf_counter()
    for _ in range(args.warmup):
        trainer.step()
    warm_s = time.perf_counter() - began
    with OtherLoad() as load:
        times = [trainer.step() for _ in range(args.steps)]
    loss = trainer.loss.float().item()
    trainer.close()
    # A step lasts as long as its slowest rank (FSDP collectives keep ranks in step anyway).
    times = [over_ranks(t, env, "max") for t in times]
    max_mem = torch.cuda.max_memory_allocated(env.device) / 2**30 if env.device.type == "cuda" else None
    if env.is_main:
        console.print(f"ViT-{model[0].upper()} {precision} batch {batch}: warm-up {warm_s:.1f} s, steps "
                      f"{', '.join(f'{t:.3f}' for t in times)} s, loss {loss:.4f}")
    return Row(model, precision, batch, env.world_size, times, flops, peak, max_mem, load.share, loss)


def print_tables(rows: list[Row], flops: dict[str, FlopCount], env: DistEnv, console: Console) -> None:
    ft = Table(title="Model FLOPs per image per training step (forward + backward), GFLOP")
    for col in ("model", "tokens enc/dec", "FlopCounterMode", "attention expected", "attention counted",
                "attention added", "total GFLOP/img", "paper ~", "total / paper"):
        ft.add_column(col, justify="left" if col == "model" else "right")
    for model, f in flops.items():
        paper = PAPER_GFLOP_PER_IMAGE[model]
        ft.add_row(f"ViT-{model[0].upper()}", f"{f.encoder_tokens}/{f.decoder_tokens}", f"{f.counted / 1e9:.2f}",
                   f"{f.attention_expected / 1e9:.2f}", f"{f.attention_counted / 1e9:.2f}",
                   f"{f.attention_added / 1e9:.2f}", f"{f.total / 1e9:.2f}", f"{paper:.0f}",
                   f"{f.total / 1e9 / paper:.3f}")
    console.print(ft)

    gpu = env.device.type == "cuda"
    t = Table(title=f"Training step (FSDP2 x{env.world_size}, fused AdamW), median over the timed steps")
    cols = ["model", "precision", "batch/dev", "step s", "img/s", "GFLOP/step/dev", "achieved TFLOP/s/dev",
            "peak TFLOP/s", "MFU"]
    cols += ["max mem GiB"] if gpu else []
    cols += ["other load"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "precision") else "right")
    for r in rows:
        cells = [f"ViT-{r.model[0].upper()}", r.precision, str(r.batch), f"{r.step_s:.3f}", f"{r.img_s:.2f}",
                 f"{r.flops.total * r.batch / 1e9:.1f}", f"{r.achieved_tflops:.4g}",
                 f"{r.peak.tflops:.4g} ({r.peak.source})", f"{100 * r.mfu:.1f}%"]
        cells += [f"{r.max_mem_gib:.1f}"] if gpu and r.max_mem_gib is not None else (["-"] if gpu else [])
        cells += ["n/a" if r.other_load is None else f"{100 * r.other_load:.0f}%"]
        t.add_row(*cells)
    console.print(t)

    for r in rows:
        if r.mfu > 1:
            console.print(f"[bold]warning[/bold]: ViT-{r.model[0].upper()} {r.precision} MFU {100 * r.mfu:.0f}% "
                          f"> 100%: the {r.peak.source} peak is not this device's peak for {r.precision}")
    by_key = {(r.model, r.precision): r for r in rows}
    pairs = [(m, by_key[m, "fp32"], by_key[m, "bf16"]) for m in flops
             if (m, "fp32") in by_key and (m, "bf16") in by_key]
    if pairs:
        rt = Table(title="bf16 against the fp32 baseline of the same run")
        for col in ("model", "fp32 img/s", "bf16 img/s", "bf16 / fp32"):
            rt.add_column(col, justify="left" if col == "model" else "right")
        for model, fp32, bf16 in pairs:
            rt.add_row(f"ViT-{model[0].upper()}", f"{fp32.img_s:.2f}", f"{bf16.img_s:.2f}",
                       f"{bf16.img_s / fp32.img_s:.2f}x")
        console.print(rt)
    console.print("GFLOP/img = FlopCounterMode on forward+backward of an unwrapped model + attention it missed "
                  "(4*N^2*d fwd, 2x that bwd per layer); optimizer and checkpoint recompute not counted. "
                  "MFU = achieved / peak, per device; peak: bf16 for bf16 runs, fp32 (float32_matmul_precision="
                  f"{torch.get_float32_matmul_precision()}) for fp32 runs. other load = CPU share of other "
                  "processes while timing (above ~10%, rerun).")


def split(text: str, allowed: tuple[str, ...], flag: str, parser: argparse.ArgumentParser) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown or not items:
        parser.error(f"{flag}: unknown {', '.join(unknown) or 'empty list'}; use {', '.join(allowed)}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help=f"comma-separated, of {', '.join(MODELS)} (default: all on GPU, base on CPU)")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated, of fp32, bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (RuntimeConfig.compile)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, default=None,
                        help="per device (default: 2 on CPU; on GPU the largest power of two that fits)")
    parser.add_argument("--max-batch", type=int, default=1024, help="cap of the GPU batch search")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPU, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 GPU, 2 CPU)")
    parser.add_argument("--peak-tflops", default=None,
                        help="device peak in TFLOP/s, one number or per precision (bf16=989,fp32=67); "
                             "default: measured with a large matmul")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.models = split(args.models or ("base,large,huge" if gpu else "base"), tuple(MODELS), "--models", parser)
    args.precision = split(args.precision, PRECISIONS, "--precision", parser)
    args.steps = args.steps if args.steps is not None else (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    if args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1) or args.max_batch < 1:
        parser.error("--steps and --batch must be positive, --warmup not negative")
    try:
        args.peaks = parse_peaks(args.peak_tflops)
    except ValueError as e:
        parser.error(str(e))
    return args


@contextlib.contextmanager
def process_group() -> Iterator[DistEnv]:
    env = init_distributed()
    try:
        yield env
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    # As mae_core.train does; it is part of what a training step costs.
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Off a terminal (pipes, logs) rich would squeeze the tables into 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)
    began = time.perf_counter()
    with process_group() as env:
        device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "CPU"
        if env.is_main:
            console.print(f"torch {torch.__version__}, {device_name}, world {env.world_size}, "
                          f"{torch.get_num_threads()} threads, {args.img_size} px, mask {args.mask_ratio}, "
                          f"compile {args.compile}, activation checkpointing {args.activation_checkpointing}, "
                          f"{args.warmup} warm-up + {args.steps} timed steps")
        peaks: dict[str, Peak] = {}
        for precision in args.precision:
            if precision in args.peaks:
                peaks[precision] = Peak(args.peaks[precision], "given")
            else:
                measured = over_ranks(measure_peak(DTYPES[precision], env.device), env, "mean")
                peaks[precision] = Peak(measured, "measured")
            if env.is_main:
                console.print(f"{precision} peak: {peaks[precision].tflops:.4g} TFLOP/s ({peaks[precision].source})")
        flops = {model: count_flops(MODELS[model], args.img_size, args.mask_ratio, env.device)
                 for model in args.models}
        if env.is_main:
            for model, f in flops.items():
                console.print(f"ViT-{model[0].upper()}: {f.total / 1e9:.2f} GFLOP per image per training step "
                              f"(paper ~{PAPER_GFLOP_PER_IMAGE[model]:.0f})")
        rows = [run_one(model, precision, flops[model], peaks[precision], args, env, console)
                for model in args.models for precision in args.precision]
        if env.is_main:
            print_tables(rows, flops, env, console)
            console.print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
