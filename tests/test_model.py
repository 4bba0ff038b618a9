"""The MAE model as the paper defines it: shapes, loss on masked patches only, parameter counts."""

from __future__ import annotations

import pytest
import torch

from mae_core.model import Block, build_model, drop_path
from mae_core.optim import param_groups
from mae_core.schedule import lr_at


def tiny(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mae_vit_tiny_patch4", **kw)


def test_forward_contract_and_patchify_roundtrip() -> None:
    model = tiny()
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert loss.ndim == 0 and pred.shape == (3, 64, 48) and mask.shape == (3, 64)
    assert torch.all(mask.sum(dim=1) == 48)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def test_encoder_sees_visible_tokens_only() -> None:
    model = tiny()
    mask = model.sample_mask(2, 0.75, torch.Generator().manual_seed(0))
    latent = model.forward_encoder(torch.randn(2, 3, 32, 32), mask)
    assert latent.shape[1] == 1 + 16  # cls + 25% of 64 patches
    baseline = tiny(mask_tokens_in_encoder=True)
    assert baseline.forward_encoder(torch.randn(2, 3, 32, 32), mask).shape[1] == 1 + 64


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_ignores_visible_patches_and_matches_direct_computation(norm_pix: bool) -> None:
    model = tiny(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32)
    mask = model.sample_mask(2, 0.75, torch.Generator().manual_seed(0)).mask
    pred = torch.randn(2, 64, 48)
    loss = model.forward_loss(imgs, pred, mask)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # visible patches only
    assert torch.equal(model.forward_loss(imgs, changed, mask), loss)

    target = model.patchify(imgs)
    if norm_pix:
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mu) / torch.sqrt(var + 1e-6)
    removed = mask.bool()
    direct = ((pred[removed] - target[removed]) ** 2).mean()
    torch.testing.assert_close(loss, direct)


def expected_params(width: int, depth: int, patch: int, dec_width: int = 512, dec_depth: int = 8) -> int:
    """Trainable parameters from the architecture, fixed sin-cos position embeddings excluded."""
    def block(d: int) -> int:  # 2 norms, qkv, proj, mlp fc1/fc2 (ratio 4), all with biases
        return 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)

    pixels = patch * patch * 3
    encoder = (pixels * width + width) + width + depth * block(width) + 2 * width
    decoder = (width * dec_width + dec_width) + dec_width + dec_depth * block(dec_width) + 2 * dec_width \
        + (dec_width * pixels + pixels)
    return encoder + decoder


@pytest.mark.parametrize(("name", "width", "depth", "patch"), [
    ("mae_vit_base_patch16", 768, 12, 16),
    ("mae_vit_large_patch16", 1024, 24, 16),
    ("mae_vit_huge_patch14", 1280, 32, 14),
])
def test_parameter_counts_match_the_architecture(name: str, width: int, depth: int, patch: int) -> None:
    with torch.device("meta"):
        model = build_model(name)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == expected_params(width, depth, patch)
    assert model.num_patches == (224 // patch) ** 2


def test_decoder_shape_is_overridable() -> None:
    with torch.device("meta"):
        model = build_model("mae_vit_base_patch16", decoder_depth=1, decoder_embed_dim=256, decoder_num_heads=8)
    assert len(model.decoder_blocks) == 1 and model.mask_token.shape[-1] == 256


def test_unknown_model_name_is_one_clear_line() -> None:
    with pytest.raises(ValueError, match="unknown; use one of"):
        build_model("mae_vit_gigantic")


def test_weight_decay_skips_biases_norms_and_tokens() -> None:
    model = tiny()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "cls_token" not in decayed and "mask_token" not in decayed
    assert not any(n.endswith("bias") or "norm" in n for n in decayed)
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.weight" in decayed
    assert no_decay["weight_decay"] == 0.0
    assert not any("pos_embed" in n for n, _ in model.named_parameters())  # fixed, not trained


def test_schedule_warms_up_linearly_then_follows_half_cosine() -> None:
    assert lr_at(0, 1.0, 0.0, 10, 110) == 0.0
    assert lr_at(5, 1.0, 0.0, 10, 110) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 0.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 0.1, 10, 110) == pytest.approx(0.55)
    assert lr_at(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)


def test_bf16_autocast_trains_on_cpu() -> None:
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].attn.qkv.weight.grad is not None


def test_drop_path_keeps_a_bf16_residual_stream_in_bf16() -> None:
    # Fine-tuning with drop path under bf16 (FSDP's bf16 compute): the stream must stay bf16, or
    # the next block's bf16 LayerNorm and Linear fail on fp32 input.
    block = Block(16, 2, drop_path=0.5).to(torch.bfloat16).train()
    torch.manual_seed(0)
    out = block(torch.randn(8, 5, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert block(out).dtype == torch.bfloat16
    kept = drop_path(torch.ones(64, 3, dtype=torch.bfloat16), 0.5, training=True)
    assert kept.dtype == torch.bfloat16 and set(kept.unique().tolist()) == {0.0, 2.0}
