"""Masked autoencoder with a ViT backbone (He et al. 2021, arXiv 2111.06377), in one file.

Read it next to the paper: the encoder sees only the visible patches, a light decoder gets the
encoded tokens plus a shared learned mask token, and the loss is MSE on the removed patches only.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mae_core.masking import MASK_STRATEGIES, Mask, MaskStrategy, sample_mask


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding: half the channels encode rows, half columns."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # The official code encodes the column coordinate first; keep that order so weights interoperate.
    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (fine-tuning, paper A.2): drop a residual branch for whole samples, scaling
    the kept ones so the expectation is unchanged. The identity at rate 0 or in eval mode."""
    if rate == 0.0 or not training:
        return x
    # In x's dtype: an fp32 mask would promote a bf16 residual stream to fp32 inside the block.
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """The blocks in order; with ``recompute``, each block's activations are recomputed in backward."""
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
    return x


class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        mask_strategy: MaskStrategy = "random",
        mask_tokens_in_encoder: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask_strategy {mask_strategy!r} is unknown; use one of {', '.join(MASK_STRATEGIES)}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.norm_pix_loss = norm_pix_loss
        self.mask_strategy: MaskStrategy = mask_strategy
        self.mask_tokens_in_encoder = mask_tokens_in_encoder
        self.grad_checkpointing = False

        # Encoder. A stride-p convolution is the linear patch projection, computed without unfold.
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid), persistent=False)
        # Paper Table 1c baseline: the encoder sees every position, removed ones as a mask token.
        self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_tokens_in_encoder else None
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        # Decoder.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, self.grid),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for token in (self.cls_token, self.mask_token, self.enc_mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # (N, C, H, W) <-> (N, L, p*p*C), the official layout.
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        p, (h, w), c = self.patch_size, self.grid, self.in_chans
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, (h, w), c = self.patch_size, self.grid, self.in_chans
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def sample_mask(self, batch: int, mask_ratio: float, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> Mask:
        return sample_mask(self.mask_strategy, batch, self.grid, mask_ratio, generator, device)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(blocks, x, self.grad_checkpointing and self.training)

    def forward_encoder(self, imgs: torch.Tensor, mask: Mask) -> torch.Tensor:
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:, :]
        if self.enc_mask_token is not None:
            removed = mask.mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - removed) + (self.enc_mask_token + self.pos_embed[:, 1:, :]) * removed
        else:
            x = torch.gather(x, 1, mask.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.norm(self._run_blocks(self.blocks, x))

    def forward_decoder(self, latent: torch.Tensor, mask: Mask) -> torch.Tensor:
        x = self.decoder_embed(latent)
        if self.enc_mask_token is None:
            visible = x[:, 1:, :]
            fill = self.mask_token.expand(x.shape[0], self.num_patches - visible.shape[1], -1)
            x_ = torch.cat([visible, fill], dim=1)
            x_ = torch.gather(x_, 1, mask.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        x = self.decoder_norm(self._run_blocks(self.decoder_blocks, x))
        return self.decoder_pred(x[:, 1:, :])

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_patch = ((pred.float() - self.target(imgs).float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = self.sample_mask(imgs.shape[0], mask_ratio, generator, imgs.device)
        latent = self.forward_encoder(imgs, mask)
        pred = self.forward_decoder(latent, mask)
        return self.forward_loss(imgs, pred, mask.mask), pred, mask.mask

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Prediction as an image. With norm-pix loss each patch is de-normalised with its own
        statistics, so reconstructions are not grey (official issue #12)."""
        if self.norm_pix_loss:
            target = self.patchify(imgs)
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        return self.unpatchify(pred)


def _arch(**kwargs: int) -> Callable[..., MaskedAutoencoderViT]:
    return partial(MaskedAutoencoderViT, **kwargs)


MODELS: dict[str, Callable[..., MaskedAutoencoderViT]] = {
    "mae_vit_base_patch16": _arch(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mae_vit_large_patch16": _arch(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": _arch(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # Small shapes for tests and CPU demos: 32 px images in 4 px patches (64 tokens).
    "mae_vit_tiny_patch4": _arch(img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3,
                                 decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "mae_vit_micro_patch4": _arch(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
}


def build_model(name: str, **overrides: object) -> MaskedAutoencoderViT:
    """Build a registered MAE by name; any constructor argument can be overridden."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is unknown; use one of {', '.join(sorted(MODELS))}")
    return MODELS[name](**overrides)
