"""A pre-trained MAE's encoder with a classification head, for linear probing and fine-tuning.

The encoder is the MAE's own modules (patch embedding, class token, fixed position embeddings,
blocks, norm), run on every patch: no masking at evaluation. The heads follow the paper:
- linear probe (A.3): the class token after the encoder's norm, a BatchNorm without affine
  parameters (it normalises the features, which a linear classifier on frozen features needs),
  then a linear layer; the encoder is frozen;
- fine-tune (A.2): the average of the patch tokens, a LayerNorm, then a linear layer; stochastic
  depth rising linearly to ``drop_path`` at the last block.
"""

from __future__ import annotations

import torch
from torch import nn

from mae_core.evaluate.config import EvalJob
from mae_core.model import MaskedAutoencoderViT, run_blocks


class EncoderClassifier(nn.Module):
    def __init__(self, mae: MaskedAutoencoderViT, num_classes: int, job: EvalJob, pool: str,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.patch_embed, self.cls_token, self.blocks = mae.patch_embed, mae.cls_token, mae.blocks
        # Average pooling has its own norm (fc_norm); the encoder's would be a parameter without a gradient.
        self.norm = mae.norm if pool == "cls" else None
        self.register_buffer("pos_embed", mae.pos_embed.clone(), persistent=False)
        self.pool = pool
        self.grad_checkpointing = False
        for i, block in enumerate(self.blocks):
            block.drop_path = drop_path * i / max(1, len(self.blocks) - 1)
        dim = self.cls_token.shape[-1]
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if pool == "avg" else None
        linear = nn.Linear(dim, num_classes)
        # Small initial weights (as the official code: 0.01 for the probe, 2e-5 for fine-tuning), so
        # the first steps do not undo what the encoder learned.
        nn.init.trunc_normal_(linear.weight, std=0.01 if job == "linprobe" else 2e-5)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear) if job == "linprobe" \
            else nn.Sequential(linear)
        if job == "linprobe":
            for name, p in self.named_parameters():
                p.requires_grad = name.startswith("head.")

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = run_blocks(self.blocks, torch.cat([cls, x], dim=1), self.grad_checkpointing and self.training)
        if self.fc_norm is not None:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        assert self.norm is not None
        return self.norm(x)[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(imgs))

    def encoder_parameters(self) -> dict[str, torch.Tensor]:
        """The encoder's parameters by name (what a linear probe must leave untouched)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith(("head.", "fc_norm."))}
