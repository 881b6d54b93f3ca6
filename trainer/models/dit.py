"""Diffusion transformer for text-to-image and text-to-video (Peebles & Xie 2023, "Scalable
Diffusion Models with Transformers"), as a plain stack of layers (distribution is
applied from outside: trainer/parallel.py).

    x (B, C, [F,] H, W) --patchify--> (B, N, pt p p C) --embed--> h (B, N, D) (+ sin-cos positions)
    t, pooled text [, aug level, guidance] ------------------------> c (B, D)  adaLN conditioning
    h --DiTBlock x depth--> h     each: adaLN-Zero self-attention (full space-time, or spatial
                                  then temporal as Latte / W.A.L.T.), cross-attention to the
                                  text tokens, adaLN-Zero MLP
    h --adaLN final layer--> (B, N, pt p p C_out) --unpatchify--> (B, C_out, [F,] H, W)

Images are 1-frame videos: frame 0 carries no temporal position, and factorized blocks skip
their temporal attention when there is one latent frame (Latte §3.3, joint image-video
training), so an image checkpoint runs unchanged inside a video model.

The empty caption (classifier-free guidance, Ho & Salimans 2022): with `model.text.null=learned`
the network owns a learned null caption - one token (1, Dt) and a pooled vector (Dp), zero at
init, as the learned "null" text embedding of Imagen / PixArt-style trainers - and puts it in
every row whose text mask has no real token, the form in which the frozen encoder gives the
empty caption (`TextEncoder.null_embedding`). So CFG dropout trains it (gradients reach it
through the rows it fills), the optimizer, ZeRO, the EMA and checkpoints treat it as any other
weight (`embed.null_tokens`, `embed.null_pooled`), and every sampler's unconditional branch gets
the (EMA) weights' null without knowing of it.

Super-resolution (cascades, Ho et al. 2021): the low-resolution input, upsampled to x's size
(bilinear for images; trilinear for videos, which also gives temporal super-resolution from
fewer frames), is concatenated to x's channels; its noise-augmentation level is embedded like t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.models.presets import DIT_PRESETS, DiTPreset, dit_preset
from trainer.models.layers import (
    FREQUENCY_DIM,
    CrossAttention,
    Grid,
    Mlp,
    Rope,
    ScalarEmbedder,
    SelfAttention,
    activation_dtype,
    gated_residual,
    modulate,
    patchify,
    rope_table,
    sincos_table,
    unpatchify,
    upsample_like,
)


class TextEmbedding(NamedTuple):
    """What a text encoder gives the DiT: per-token states, their mask, one pooled vector."""

    tokens: Tensor  # (B, L, Dt) float
    mask: Tensor  # (B, L) bool, True = real token
    pooled: Tensor  # (B, Dp) float

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype))


# ---------------------------------------------------------------------------------------------
# The resolved specification every layer is built from.


@dataclass(frozen=True)
class DiTSpec:
    """ModelConfig + preset + text widths, resolved once. text_dim 0: no cross-attention
    (the class-conditional DiT of the paper, for parameter and MAC checks)."""

    preset: DiTPreset
    in_channels: int
    out_channels: int
    text_dim: int
    pooled_dim: int
    video: bool = False
    temporal_patch: int = 1
    factorized: bool = True
    rope: bool = False
    qk_norm: bool = True
    superres: bool = False
    guidance: bool = False
    learned_null: bool = False  # the empty caption is a trained token + pooled vector (model.text.null)

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, text_dim: int, pooled_dim: int, preset: Optional[DiTPreset] = None
    ) -> "DiTSpec":
        return cls(
            preset=preset or dit_preset(cfg.preset),
            in_channels=cfg.in_channels,
            out_channels=cfg.in_channels * (2 if cfg.learn_sigma else 1),
            text_dim=text_dim,
            pooled_dim=pooled_dim,
            video=cfg.video,
            temporal_patch=cfg.temporal_patch if cfg.video else 1,
            factorized=cfg.attention == "factorized",
            rope=cfg.positions == "rope",
            qk_norm=cfg.qk_norm,
            superres=cfg.superres,
            guidance=cfg.guidance_embed,
            learned_null=cfg.text.null == "learned",
        )

    @property
    def temporal_blocks(self) -> bool:
        return self.video and self.factorized

    @property
    def patch_features_in(self) -> int:
        channels = self.in_channels * (2 if self.superres else 1)  # + upsampled low-res input
        return self.temporal_patch * self.preset.patch**2 * channels

    @property
    def patch_features_out(self) -> int:
        return self.temporal_patch * self.preset.patch**2 * self.out_channels


# ---------------------------------------------------------------------------------------------
# Layers. Plain modules of plain tensors: the embedding gives the token state, each block maps
# h to h, the head maps h back to x's shape. Distribution (pipeline stages, activation
# checkpointing, sequence parallelism) is applied to them from outside: trainer/parallel.py.


class Tokens(NamedTuple):
    """The embedding's output, what every block reads."""

    h: Tensor  # (B, N, D) patch tokens
    c: Tensor  # (B, D) adaLN conditioning
    text: Tensor  # (B, L, Dt) text tokens
    mask: Tensor  # (B, L) float, 1 = real token
    grid: Grid  # (F', H', W')
    held: int  # x's dims where x was one frame held for one temporal patch, which the head averages
    # away: 4 an image (B, C, H, W), 5 a one-frame clip (B, C, 1, H, W); 0 a clip


class PatchEmbedder(nn.Linear):
    """The patch embedding plus the fixed positions, computed in float32 and rounded once to
    the compute dtype (autocast's, else the weights'): under bf16 the linear's output and a bf16
    position table would each be rounded before their sum is. The matmul is the network's
    smallest (pt p p C input features, 16 in a DiT-XL/2), so float32 costs nothing measurable,
    and it also keeps x_t's own low bits, which a bf16 input would drop. An nn.Linear with the
    same parameters and keys, called as a module, so ZeRO-3 gathers its weights first."""

    def forward(self, patches: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        """patches (B, N, K), positions (N, D) float32 or None -> (B, N, D) in the compute dtype."""
        dtype = activation_dtype(self.weight)
        with torch.autocast(patches.device.type, enabled=False):
            h = F.linear(patches.float(), self.weight.float(), self.bias.float())  # (B, N, D) float32
            if positions is not None:
                h = h + positions  # (B, N, D)
        return h.to(dtype)


class DiTEmbed(nn.Module):
    """Patch embedding (+ sin-cos positions) and the conditioning vector c of t, the pooled text
    and, when the spec has them, the super-resolution level and the guidance scale."""

    def __init__(self, spec: DiTSpec):
        super().__init__()
        self.spec = spec
        width = spec.preset.width
        self.x_embedder = PatchEmbedder(spec.patch_features_in, width)
        self.t_embedder = ScalarEmbedder(width)
        self.pooled_embedder = nn.Linear(spec.pooled_dim, width) if spec.pooled_dim else None
        self.aug_embedder = ScalarEmbedder(width) if spec.superres else None
        self.guidance_embedder = ScalarEmbedder(width) if spec.guidance else None
        self.null_tokens: Optional[nn.Parameter] = None
        self.null_pooled: Optional[nn.Parameter] = None
        if spec.learned_null:
            self.null_tokens = nn.Parameter(torch.zeros(1, spec.text_dim))  # (1, Dt)
            self.null_pooled = nn.Parameter(torch.zeros(spec.pooled_dim))  # (Dp,)

    def conditioning(self, x: Tensor, t: Tensor, lowres: Optional[Tensor] = None, aug_level: Optional[Tensor] = None,
                     guidance: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """t as (B,) float32, and the optional inputs this spec needs, checked, by name:
        lowres and aug_level (None: no augmentation) for super-resolution, guidance (B,).

        The scalars stay float32 whatever x's dtype: in bf16, t in [0.5, 1) is a multiple of
        2^-8, so about four of the 1000 DDPM steps would share one value before the sinusoids
        (computed in float32, as diffusers' `get_timestep_embedding`) are taken of them."""
        B = x.shape[0]
        t = t.float().expand(B) if t.ndim == 0 else t.float()  # (B,)
        extra: dict[str, Tensor] = {}
        if self.spec.superres:
            if lowres is None:
                raise ValueError("a super-resolution DiT needs `lowres`, the low-resolution input")
            extra["lowres"] = lowres
            extra["aug_level"] = torch.zeros_like(t) if aug_level is None else aug_level.float()  # (B,)
        if self.spec.guidance:
            if guidance is None:
                raise ValueError("a guidance-conditioned DiT (model.guidance_embed) needs `guidance`, shape (B,)")
            extra["guidance"] = guidance.float()  # (B,)
        return t, extra

    def forward(self, x: Tensor, t: Tensor, text: TextEmbedding, lowres: Optional[Tensor] = None,
                aug_level: Optional[Tensor] = None, guidance: Optional[Tensor] = None) -> Tokens:
        t, extra = self.conditioning(x, t, lowres, aug_level, guidance)
        tokens, mask, pooled = text.tokens.to(x.dtype), text.mask.to(x.dtype), text.pooled.to(x.dtype)
        if self.null_tokens is not None:
            tokens, mask, pooled = self.fill_null(tokens, mask, pooled)
        if self.spec.superres:
            x = torch.cat([x, upsample_like(extra["lowres"], x)], dim=1)  # (B, 2C, [F,] H, W)
        held = x.ndim if x.ndim == 4 or x.shape[2] == 1 else 0
        patches, grid = patchify(self._as_video(x), self.spec.preset.patch, self.spec.temporal_patch)
        positions = None if self.spec.rope else sincos_table(grid, self.spec.preset.width, x.device, torch.float32)
        h = self.x_embedder(patches, positions)  # (B, N, D), N = F' H' W'; positions (N, D) float32
        c = self.t_embedder(t).float()  # (B, D), the terms summed in float32 and rounded once
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(pooled).float()  # (B, D)
        if self.aug_embedder is not None:
            c = c + self.aug_embedder(extra["aug_level"]).float()  # (B, D)
        if self.guidance_embedder is not None:
            c = c + self.guidance_embedder(extra["guidance"]).float()  # (B, D)
        return Tokens(h, c.to(h.dtype), tokens, mask, grid, held)

    def fill_null(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rows with no real token (the empty caption) get the learned null: its token first,
        marked real (attention needs a key), zero padding after it, and its pooled vector.
        tokens (B, L, Dt), mask (B, L) float, pooled (B, Dp) -> the same shapes."""
        assert self.null_tokens is not None and self.null_pooled is not None
        empty = mask.amax(dim=1) < 0.5  # (B,)
        L, n = tokens.shape[1], self.null_tokens.shape[0]
        null_tokens = F.pad(self.null_tokens.to(tokens.dtype), (0, 0, 0, L - n))  # (L, Dt)
        null_mask = (torch.arange(L, device=mask.device) < n).to(mask.dtype)  # (L,)
        return (
            torch.where(empty[:, None, None], null_tokens, tokens),  # (B, L, Dt)
            torch.where(empty[:, None], null_mask, mask),  # (B, L)
            torch.where(empty[:, None], self.null_pooled.to(pooled.dtype), pooled),  # (B, Dp)
        )

    def _as_video(self, x: Tensor) -> Tensor:
        """(B, C, [F,] H, W) -> (B, C, F, H, W); one frame (an image, a one-frame clip: the stills
        of joint image-video training) is held for one temporal patch."""
        if x.ndim == 5 and not self.spec.video:
            raise ValueError("a video (B, C, F, H, W) was given to an image model; set model.video=true")
        x = x.unsqueeze(2) if x.ndim == 4 else x  # (B, C, F, H, W)
        return x.expand(-1, -1, self.spec.temporal_patch, -1, -1) if x.shape[2] == 1 else x  # (B, C, pt, H, W)


class TemporalAttention(nn.Module):
    """adaLN-Zero attention across frames at each spatial position (Latte, W.A.L.T.)."""

    def __init__(self, spec: DiTSpec):
        super().__init__()
        width = spec.preset.width
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, spec.preset.heads, spec.qk_norm)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, h: Tensor, c: Tensor, grid: Grid, rope: Optional[Rope]) -> Tensor:
        """h holds whole frames: F' = N / (H' W') of them (all of the clip's, or a run of them)."""
        B, N, D = h.shape
        area = grid[1] * grid[2]
        shift, scale, gate = self.adaLN_modulation(c)[:, None].chunk(3, dim=-1)  # (B, 1, D) each
        x = modulate(self.norm(h), shift, scale)  # (B, N, D)
        x = x.view(B, -1, area, D).transpose(1, 2).reshape(B * area, -1, D)  # (B S, F', D)
        x = self.attn(x, rope)  # (B S, F', D)
        x = x.view(B, area, -1, D).transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return gated_residual(h, gate, x)


class DiTBlock(nn.Module):
    """adaLN-Zero block (Peebles & Xie §3.2) with cross-attention to text (their §3.2
    "cross-attention block", PixArt-alpha) and, in factorized video models, temporal attention.

    Each attention is its own submodule (`attn`, `temporal`, `cross_attn`): the unit an
    activation checkpointing policy wraps from outside (trainer/parallel.py)."""

    def __init__(self, spec: DiTSpec):
        super().__init__()
        p = spec.preset
        self.spec = spec
        self.norm1 = nn.LayerNorm(p.width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(p.width, p.heads, spec.qk_norm)
        self.temporal = TemporalAttention(spec) if spec.temporal_blocks else None
        self.norm_cross = nn.LayerNorm(p.width, eps=1e-6) if spec.text_dim else None
        self.cross_attn = CrossAttention(p.width, spec.text_dim, p.heads, spec.qk_norm) if spec.text_dim else None
        self.norm2 = nn.LayerNorm(p.width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(p.width, int(p.width * p.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(p.width, 6 * p.width))

    def forward(self, h: Tensor, c: Tensor, tokens: Tensor, mask: Tensor, grid: Grid) -> Tensor:
        """h (B, N, D), c (B, D), text tokens (B, L, Dt), mask (B, L) float -> h (B, N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)  # (B, 1, D)
        x = modulate(self.norm1(h), shift1, scale1)  # (B, N, D)
        h = gated_residual(h, gate1, self._self_attention(x, grid))  # (B, N, D)
        if self.temporal is not None and grid[0] > 1:
            h = self.temporal(h, c, grid, self._rope(grid, "t", h))  # (B, N, D)
        elif self.temporal is not None:
            h = self.idle_temporal(h, c)  # (B, N, D)
        if self.cross_attn is not None:
            h = h + self.cross_attn(self.norm_cross(h), tokens, mask > 0.5)  # (B, N, D)
        x = modulate(self.norm2(h), shift2, scale2)  # (B, N, D)
        return gated_residual(h, gate2, self.mlp(x))  # (B, N, D)

    def idle_temporal(self, h: Tensor, c: Tensor) -> Tensor:
        """Where a clip's temporal attention runs, an image (one frame: nothing to attend across)
        passes unchanged; h (B, N, D). The place a trainer ties the idle temporal parameters into
        the graph (trainer/parallel.py)."""
        return h

    def _self_attention(self, x: Tensor, grid: Grid) -> Tensor:
        """Full space-time attention, or per-frame spatial attention in factorized models (over
        the whole sequence of an image, its one frame). x holds whole frames, N / (H' W') of them."""
        if self.temporal is None or grid[0] == 1:
            return self.attn(x, self._rope(grid, "thw", x))  # (B, N, D)
        B, N, D = x.shape
        area = grid[1] * grid[2]
        out = self.attn(x.reshape(-1, area, D), self._rope(grid, "hw", x))  # (B F', S, D)
        return out.view(B, N, D)

    def _rope(self, grid: Grid, axes: str, like: Tensor) -> Optional[Rope]:
        if not self.spec.rope:
            return None
        head_dim = self.spec.preset.width // self.spec.preset.heads
        # in the dtype of q and k (the projection's): a float32 table would promote them to float32
        return rope_table(grid, axes, head_dim, like.device, activation_dtype(like))


class DiTHead(nn.Module):
    """Last layer: adaLN final layer (zero-initialized) and unpatchify -> x's shape."""

    def __init__(self, spec: DiTSpec):
        super().__init__()
        self.spec = spec
        width = spec.preset.width
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, spec.patch_features_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, h: Tensor, c: Tensor, grid: Grid, held: int) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        out = self.linear(modulate(self.norm_final(h), shift, scale))  # (B, N, pt p p C_out)
        s = self.spec
        x = unpatchify(out, grid, s.out_channels, s.preset.patch, s.temporal_patch)  # (B, C, F, H, W)
        return x.mean(dim=2, keepdim=held == 5) if held else x  # (B, C, H, W) or (B, C, 1, H, W) for held frames


# ---------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """The network: a plain function of (x_t, t, text[, lowres, aug_level, guidance])."""

    def __init__(self, spec: DiTSpec):
        super().__init__()
        self.spec = spec
        self.embed = DiTEmbed(spec)
        self.blocks = nn.ModuleList(DiTBlock(spec) for _ in range(spec.preset.depth))
        self.head = DiTHead(spec)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linear, N(0, 0.02) embedders, zero adaLN modulation and output
        (adaLN-Zero: every block starts as the identity, the network's output as exactly 0)."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        for emb in (self.embed.t_embedder, self.embed.aug_embedder, self.embed.guidance_embedder):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        if self.embed.pooled_embedder is not None:
            nn.init.normal_(self.embed.pooled_embedder.weight, std=0.02)
        zero = [self.head.linear, self.head.adaLN_modulation[-1]]
        for block in self.blocks:
            zero.append(block.adaLN_modulation[-1])
            if block.temporal is not None:
                zero.append(block.temporal.adaLN_modulation[-1])
            if block.cross_attn is not None:
                zero.append(block.cross_attn.proj)  # ungated branch: zero so the block is the identity
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: TextEmbedding,
        *,
        lowres: Optional[Tensor] = None,
        aug_level: Optional[Tensor] = None,
        guidance: Optional[Tensor] = None,
    ) -> Tensor:
        """x (B, C, H, W) or (B, C, F, H, W), t (B,) in [0, 1] -> prediction shaped like x
        (channels doubled when learn_sigma)."""
        s = self.embed(x, t, text, lowres=lowres, aug_level=aug_level, guidance=guidance)
        h = s.h  # (B, N, D)
        for block in self.blocks:
            h = block(h, s.c, s.text, s.mask, s.grid)  # (B, N, D)
        return self.head(h, s.c, s.grid, s.held)

    def block_features(self, x: Tensor, t: Tensor, text: TextEmbedding, block_ids: Sequence[int],
                       **extras: Optional[Tensor]) -> tuple[list[Tensor], Tensor]:
        """The token features (B, N, D) after each block of the sorted `block_ids` (the blocks
        after the last one do not run) and the conditioning c (B, D): what discriminator heads read."""
        s = self.embed(x, t, text, **extras)
        h, features = s.h, []
        for i, block in enumerate(self.blocks[: block_ids[-1] + 1]):
            h = block(h, s.c, s.text, s.mask, s.grid)  # (B, N, D)
            if i in block_ids:
                features.append(h)
        return features, s.c

    def count_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def token_grid(self, shape: Sequence[int]) -> tuple[int, int]:
        """(temporal, spatial) token counts of one sample of an input x of `shape` (B, C, [F,] H,
        W): one frame (an image, a still of joint training) is held for one temporal patch
        (`_as_video`), so it is one temporal token, not F // temporal_patch = 0 of them."""
        s, p = self.spec, self.spec.preset
        frames = shape[2] if len(shape) == 5 and shape[2] > 1 else s.temporal_patch
        return frames // s.temporal_patch, (shape[-2] // p.patch) * (shape[-1] // p.patch)

    def macs(self, shape: Sequence[int], text_len: int = 0) -> int:
        """Analytic forward multiply-accumulates for an input x of `shape` (B, C, [F,] H, W)
        and `text_len` text tokens: every Linear (embedders and adaLN included) and the two
        attention matmuls, as fvcore counts them for the DiT paper; norms, activations and
        softmax are not counted. Cross-attention counts when the model has it and text_len > 0.
        Training costs about 3x this (forward + backward)."""
        s, p = self.spec, self.spec.preset
        B, (f, area) = shape[0], self.token_grid(shape)
        N, D, hidden = f * area, p.width, int(p.width * p.mlp_ratio)
        scalars = 1 + int(s.superres) + int(s.guidance)
        total = N * s.patch_features_in * D + scalars * (FREQUENCY_DIM * D + D * D) + s.pooled_dim * D
        block = 6 * D * D + 2 * N * hidden * D + self._attention_macs(f, area, text_len)
        total += p.depth * block + 2 * D * D + N * D * s.patch_features_out
        return B * total

    def attention_macs(self, shape: Sequence[int], text_len: int = 0) -> int:
        """The part of `macs` inside the blocks' attention submodules (`attn`, `temporal`,
        `cross_attn`): what checkpoint_policy=attention runs again in backward."""
        f, area = self.token_grid(shape)
        return shape[0] * self.spec.preset.depth * self._attention_macs(f, area, text_len)

    def _attention_macs(self, f: int, area: int, text_len: int) -> int:
        """Forward MACs of one block's attentions for one sample of f x area tokens: projections
        and the two attention matmuls of the self-attention, the temporal one (its adaLN too)
        and the cross-attention."""
        s, D = self.spec, self.spec.preset.width
        N = f * area
        macs = 4 * N * D * D  # qkv and output projections
        if s.temporal_blocks:
            macs += 2 * f * area * area * D  # spatial attention matmuls
            if f > 1:
                macs += 3 * D * D + 4 * N * D * D + 2 * area * f * f * D  # temporal attention
        else:
            macs += 2 * N * N * D
        if s.text_dim and text_len:
            macs += 2 * N * D * D + 2 * text_len * s.text_dim * D + 2 * N * text_len * D
        return macs


def build_dit(cfg: ModelConfig, text_dim: int, pooled_dim: int, preset: Optional[DiTPreset] = None) -> DiT:
    """The DiT of `cfg` (preset by name, or an explicit `preset` overriding it)."""
    return DiT(DiTSpec.from_config(cfg, text_dim, pooled_dim, preset))


__all__ = [
    "DIT_PRESETS",
    "DiT",
    "DiTBlock",
    "DiTEmbed",
    "DiTHead",
    "DiTPreset",
    "DiTSpec",
    "PatchEmbedder",
    "Tokens",
    "TextEmbedding",
    "build_dit",
    "dit_preset",
    "patchify",
    "unpatchify",
]
