"""The evaluation optimizers (paper appendix A): layer-wise lr decay groups and LARS; the recipe per model size."""

from __future__ import annotations

import pytest
import torch

from mae_core.config import RuntimeConfig
from mae_core.data.config import RandAugmentConfig
from mae_core.evaluate.config import EvalConfig
from mae_core.model import build_model
from mae_core.optim import LARS, layer_decay_groups, layer_id, set_lr
from orchestrator.spec import EvaluationOf, ExperimentSpec


@pytest.mark.parametrize("decay", [0.75, 0.65])
def test_each_block_learns_at_base_times_decay_to_its_distance_from_the_top(decay: float) -> None:
    model = build_model("mae_vit_micro_patch4", img_size=32)
    depth = len(model.blocks)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, 0.05, decay, depth))
    set_lr(optimizer, 1e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            assert lr_of[id(p)] == pytest.approx(1e-3 * decay ** (depth - i)), name
        elif name.split(".")[0] in ("cls_token", "patch_embed"):
            assert lr_of[id(p)] == pytest.approx(1e-3 * decay ** (depth + 1)), name
        elif name.startswith("norm."):
            assert lr_of[id(p)] == pytest.approx(1e-3), name  # after the last block: the base lr
        assert wd_of[id(p)] == (0.0 if p.ndim <= 1 or name in ("cls_token", "mask_token") else 0.05), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert [layer_id(n, 12) for n in ("pos_embed", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.bias",
                                      "fc_norm.weight", "head.weight")] == [0, 1, 12, 13, 13]


def test_lars_step_is_the_trust_ratio_times_the_weight_norm_whatever_the_gradient_scale() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    for scale in (1e-3, 1.0, 1e3):
        p = torch.nn.Parameter(w.clone())
        p.grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)) * scale
        LARS([p], lr=0.5, weight_decay=0.0, momentum=0.9, trust=0.001).step()
        step = torch.linalg.vector_norm(p.detach() - w)
        assert step.item() == pytest.approx(0.5 * 0.001 * torch.linalg.vector_norm(w).item(), rel=1e-5)


def test_lars_leaves_biases_and_norms_to_plain_momentum_sgd() -> None:
    bias = torch.nn.Parameter(torch.ones(4))
    optimizer = LARS([bias], lr=0.1, weight_decay=0.5, momentum=0.9)
    for expected in (1 - 0.1 * 2, 1 - 0.1 * 2 - 0.1 * (0.9 * 2 + 2)):
        bias.grad = torch.full((4,), 2.0)
        optimizer.step()
        torch.testing.assert_close(bias.detach(), torch.full((4,), expected))


@pytest.mark.parametrize(("arch", "layer_decay", "drop_path", "probe_epochs"), [
    ("mae_vit_base_patch16", 0.65, 0.1, 90), ("mae_vit_large_patch16", 0.75, 0.2, 50),
    ("mae_vit_huge_patch14", 0.75, 0.3, 50)])
def test_an_eval_section_starts_from_the_official_recipe_of_the_model_size(
        arch: str, layer_decay: float, drop_path: float, probe_epochs: int) -> None:
    spec = ExperimentSpec.model_validate({"name": "x", "model": {"arch": arch}, "data": {"url": "train"},
                                          "eval": {"val_url": "val", "linprobe": {}, "finetune": {"epochs": 3}}})
    runtime = RuntimeConfig(per_device_batch=32)
    tune = spec.eval_config("out/x/r.finetune", runtime, EvaluationOf(job="finetune", run_id="r"))
    assert (tune.optim.layer_decay, tune.drop_path, tune.optim.min_lr) == (layer_decay, drop_path, 1e-6)
    assert (tune.optim.epochs, tune.pool, tune.label_smoothing, tune.mixup, tune.cutmix) == (3, "avg", 0.1, 0.8, 1.0)
    assert tune.rand_augment == RandAugmentConfig(layers=2, magnitude=9, magnitude_std=0.5)  # rand-m9-mstd0.5-inc1
    assert tune.random_erase == 0.25
    probe = spec.eval_config("out/x/r.linprobe", runtime, EvaluationOf(job="linprobe", run_id="r"))
    assert (probe.optim.epochs, probe.optim.blr, probe.optim.global_batch, probe.pool) == (probe_epochs, 0.1, 16384,
                                                                                           "cls")
    assert probe.init.url == "out/x/r" and probe.val.url == "val" and probe.data.url == "train"


def test_a_moved_registry_does_not_block_an_evaluation_resume() -> None:
    # The fingerprint a resume must match covers what the job computes, not where the encoder came from.
    base = {"job": "linprobe", "output": "o", "model": {}, "init": {"url": "s3://a/exp/r"}, "data": {"url": "d"},
            "val": {"url": "v"}}
    moved = EvalConfig.model_validate({**base, "init": {"url": "s3://b/exp/r"}})
    assert EvalConfig.model_validate(base).fingerprint() == moved.fingerprint()
    for changed in ({"init": {"url": "s3://a/exp/r", "step": 3}}, {"val": {"url": "other"}}, {"seed": 1}):
        assert EvalConfig.model_validate({**base, **changed}).fingerprint() != moved.fingerprint()
