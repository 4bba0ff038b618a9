"""bf16 through FSDP2's mixed precision: parameters and optimizer state stay fp32, the loss
follows the fp32 run's."""

from __future__ import annotations

import pytest
import torch

from mae_core.config import RuntimeConfig
from mae_core.distributed import init_distributed, parallelize, shutdown
from mae_core.model import build_model
from mae_core.optim import build_optimizer
from mae_core.train import mask_generator

STEPS = 12


def train_losses(precision: str) -> tuple[list[float], torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    env = init_distributed()  # a one-rank group: the trainer's own FSDP2 code path
    try:
        model = parallelize(build_model("mae_vit_micro_patch4", norm_pix_loss=True), env,
                            RuntimeConfig(precision=precision))
        optimizer = build_optimizer(model, 0.05, (0.9, 0.95))
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        losses = []
        for step in range(STEPS):
            loss, _, _ = model(images, mask_ratio=0.75, generator=mask_generator(0, step, 0))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, model, optimizer
    finally:
        shutdown()


def test_bf16_keeps_fp32_master_weights_and_tracks_the_fp32_loss() -> None:
    fp32, _, _ = train_losses("fp32")
    bf16, model, optimizer = train_losses("bf16")
    # The master copy and the optimizer's moments stay fp32: only the gathered compute copies are bf16.
    assert {p.to_local().dtype for p in model.parameters()} == {torch.float32}
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.to_local().dtype for m in moments} == {torch.float32}
    # It computed in bf16 (the losses differ from fp32's), yet learned the same way. bf16 keeps 8
    # mantissa bits (relative rounding 2^-9 = 0.2% per operation); here the largest gap over 12
    # updates from the same start was 0.19%. 1% leaves room for other CPUs' kernels while catching
    # a broken policy (a bf16 loss reduction or bf16 master weights drift by several percent).
    assert bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=0.01)
    assert bf16[-1] < bf16[0] * 0.9
