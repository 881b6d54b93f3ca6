"""Discriminator for adversarial distillation: a frozen DiT trunk with small trainable heads.

As in LADD (Sauer et al. 2024, "Fast High-Resolution Image Synthesis with Latent Adversarial
Diffusion Distillation") and SDXL-Lightning (Lin et al. 2024): the teacher's own blocks are the
feature network, run on noised latents x_t; independent heads read the tokens of several
blocks, each conditioned on the noise level and the pooled text (and the guidance scale w of a
guidance-conditioned student: through the trunk where it embeds w, else through the heads' own
embedding of it).

The trunk is frozen (no parameter receives a gradient) but stays differentiable, so the
student's generator loss back-propagates through it to x_t. Only the heads (with their guidance
embedding, where they have one) are trainable: give the discriminator optimizer
`[p for p in disc.parameters() if p.requires_grad]`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from trainer.models.dit import DiT, TextEmbedding
from trainer.models.layers import ScalarEmbedder, modulate


class DiscriminatorHead(nn.Module):
    """Tokens (B, N, D) of one block -> (B,) logit, conditioned on c (B, D) two ways: adaLN
    modulation of the tokens, and a projection term <features, W c> (Miyato & Koyama 2018)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, 1)
        self.cond_proj = nn.Linear(width, hidden)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        feat = self.mlp(modulate(self.norm(h), shift, scale)).mean(dim=1)  # (B, hidden)
        projection = (feat * self.cond_proj(c)).sum(-1) / math.sqrt(feat.shape[-1])  # (B,)
        return self.out(feat).squeeze(-1) + projection  # (B,)


class DiscriminatorHeads(nn.Module):
    """Frozen `trunk` (a copy of the teacher DiT) + one trainable head per id in `block_ids`.

    `guidance`: the heads also embed the guidance scale w (B,) into their conditioning, for a
    guidance-conditioned student (Meng et al. 2023) whose trunk does not embed w (a teacher
    sampled with CFG): the real samples depend on w, so a discriminator blind to it would match
    the student's samples to the mixture over w only."""

    def __init__(self, trunk: DiT, block_ids: Sequence[int], hidden: int = 256, guidance: bool = False):
        super().__init__()
        depth = len(trunk.blocks)
        ids = sorted(set(block_ids))
        if not ids or ids[0] < 0 or ids[-1] >= depth:
            raise ValueError(f"block_ids {list(block_ids)} must be non-empty and within [0, {depth})")
        if guidance and trunk.spec.guidance:
            raise ValueError("the trunk embeds the guidance scale already; build the heads with guidance=False")
        self.trunk = trunk.requires_grad_(False).eval()
        self.block_ids = ids
        self.heads = nn.ModuleList(DiscriminatorHead(trunk.spec.preset.width, hidden) for _ in ids)
        self.guidance_embedder = ScalarEmbedder(trunk.spec.preset.width) if guidance else None

    def condition(self, c: Tensor, guidance: Optional[Tensor]) -> Tensor:
        """The heads' conditioning: the trunk's c (B, D), plus the embedded w (B,) where the
        heads embed it."""
        if self.guidance_embedder is None:
            return c
        if guidance is None:
            raise ValueError("these discriminator heads embed the guidance scale: pass `guidance`, shape (B,)")
        return c + self.guidance_embedder(guidance.float()).to(c.dtype)  # (B, D)

    def train(self, mode: bool = True) -> "DiscriminatorHeads":
        super().train(mode)
        self.trunk.eval()  # frozen feature network
        return self

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text: TextEmbedding,
        *,
        lowres: Optional[Tensor] = None,
        aug_level: Optional[Tensor] = None,
        guidance: Optional[Tensor] = None,
    ) -> Tensor:
        """x_t (B, C, [F,] H, W), t (B,) in [0, 1] -> logits (B, n_heads)."""
        features, c = self.trunk.block_features(x_t, t, text, self.block_ids, lowres=lowres, aug_level=aug_level,
                                                guidance=guidance)  # (B, N, D) each; c (B, D) embeds t and the pooled text
        c = self.condition(c, guidance)  # (B, D)
        return torch.stack([head(h, c) for head, h in zip(self.heads, features)], dim=1)  # (B, n_heads)


__all__ = ["DiscriminatorHead", "DiscriminatorHeads"]
