"""Diffusion transformer for text-to-image and text-to-video (Peebles & Xie 2023, "Scalable
Diffusion Models with Transformers"), as a flat stack of pipeline-friendly layers.

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
from torch.utils.checkpoint import checkpoint

from trainer.config import ModelConfig
from trainer.models.layers import (
    FREQUENCY_DIM,
    CrossAttention,
    Grid,
    Mlp,
    Rope,
    ScalarEmbedder,
    SelfAttention,
    gated_residual,
    modulate,
    rope_table,
    sincos_table,
)


class TextEmbedding(NamedTuple):
    """What a text encoder gives the DiT: per-token states, their mask, one pooled vector."""

    tokens: Tensor  # (B, L, Dt) float
    mask: Tensor  # (B, L) bool, True = real token
    pooled: Tensor  # (B, Dp) float

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype))


# ---------------------------------------------------------------------------------------------
# Presets (DiT Table 1), registered by name as DiT's `DiT_models`.


@dataclass(frozen=True)
class DiTPreset:
    depth: int
    width: int
    heads: int
    patch: int
    mlp_ratio: float = 4.0


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS: dict[str, DiTPreset] = {
    f"DiT-{name}/{patch}": DiTPreset(depth, width, heads, patch)
    for name, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}
DIT_PRESETS["DiT-T/2"] = DiTPreset(depth=4, width=128, heads=4, patch=2)  # tests, demo
DIT_PRESETS["DiT-Tiny/1"] = DiTPreset(depth=2, width=64, heads=4, patch=1)  # unit tests


def dit_preset(name: str) -> DiTPreset:
    if name not in DIT_PRESETS:
        raise KeyError(f"unknown DiT preset '{name}' (model.preset); known: {', '.join(DIT_PRESETS)}")
    return DIT_PRESETS[name]


# ---------------------------------------------------------------------------------------------
# Patches. Tokens are ordered (frame, row, col); features within a patch (pt, p, p, C), as
# DiT's unpatchify einsum "nhwpqc->nchpwq" extended with time.


def patchify(x: Tensor, patch: int, temporal_patch: int = 1) -> tuple[Tensor, Grid]:
    """(B, C, H, W) or (B, C, F, H, W) -> tokens (B, N, pt p p C) and the grid (F', H', W').

    An image is a 1-frame video with pt = 1: N = H W / p^2.
    """
    video = x.ndim == 5
    x = x if video else x.unsqueeze(2)  # (B, C, F, H, W)
    pt = temporal_patch if video else 1
    B, C, Fr, H, W = x.shape
    if Fr % pt or H % patch or W % patch:
        raise ValueError(
            f"input {tuple(x.shape)} does not split into patches of {pt}x{patch}x{patch} "
            "(frames x height x width); pick sizes that are multiples of the patch"
        )
    f, h, w = Fr // pt, H // patch, W // patch
    x = x.reshape(B, C, f, pt, h, patch, w, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, F', H', W', pt, p, p, C)
    return x.reshape(B, f * h * w, pt * patch * patch * C), (f, h, w)  # (B, N, pt p p C)


def unpatchify(tokens: Tensor, grid: Grid, channels: int, patch: int, temporal_patch: int = 1) -> Tensor:
    """(B, N, pt p p C) -> (B, C, F' pt, H' p, W' p): the inverse of `patchify` on videos."""
    f, h, w = grid
    B, pt = tokens.shape[0], temporal_patch
    x = tokens.reshape(B, f, h, w, pt, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F', pt, H', p, W', p)
    return x.reshape(B, channels, f * pt, h * patch, w * patch)  # (B, C, F, H, W)


def token_grid(grid_marker: Tensor) -> Grid:
    """The (F', H', W') grid from the marker tensor carried between layers (see `DiTEmbed`)."""
    shape = tuple(grid_marker.shape)
    return (1, *shape) if len(shape) == 2 else shape  # type: ignore[return-value]


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
    checkpointing: str = "none"  # activation checkpointing per block: none | attention | full
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
            checkpointing="full" if cfg.activation_checkpointing else cfg.checkpoint_policy,
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
# Layers. Each takes and returns a tuple of tensors so the stack is also a flat list for a
# DeepSpeed PipelineModule. Between layers the state is
#   (h (B, N, D), c (B, D), tokens (B, L, Dt), mask (B, L) float, grid marker)
# where the grid marker is a zeros tensor shaped (F', H', W') for video input or (H', W') for
# image input: the shape carries the token grid across pipeline stages without a host sync.

State = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


class DiTEmbed(nn.Module):
    """Layer 0: patch embedding (+ sin-cos positions) and the conditioning vector c.

    Input tuple: (x, t, tokens, mask, pooled[, lowres, aug_level][, guidance]), the optional
    entries present when the model is super-resolution / guidance-conditioned.
    """

    def __init__(self, spec: DiTSpec):
        super().__init__()
        self.spec = spec
        width = spec.preset.width
        self.x_embedder = nn.Linear(spec.patch_features_in, width)
        self.t_embedder = ScalarEmbedder(width)
        self.pooled_embedder = nn.Linear(spec.pooled_dim, width) if spec.pooled_dim else None
        self.aug_embedder = ScalarEmbedder(width) if spec.superres else None
        self.guidance_embedder = ScalarEmbedder(width) if spec.guidance else None
        self.null_tokens: Optional[nn.Parameter] = None
        self.null_pooled: Optional[nn.Parameter] = None
        if spec.learned_null:
            self.null_tokens = nn.Parameter(torch.zeros(1, spec.text_dim))  # (1, Dt)
            self.null_pooled = nn.Parameter(torch.zeros(spec.pooled_dim))  # (Dp,)

    def forward(self, inputs: Sequence[Tensor]) -> State:
        x, t, tokens, mask, pooled, *extra = inputs
        if self.null_tokens is not None:
            tokens, mask, pooled = self.fill_null(tokens, mask, pooled)
        if self.spec.superres:
            lowres, aug_level, *extra = extra
            x = torch.cat([x, upsample_like(lowres, x)], dim=1)  # (B, 2C, [F,] H, W)
        image = x.ndim == 4
        patches, grid = patchify(self._as_video(x), self.spec.preset.patch, self.spec.temporal_patch)
        h = self.x_embedder(patches)  # (B, N, D), N = F' H' W'
        if not self.spec.rope:
            h = h + sincos_table(grid, h.shape[-1], h.device, h.dtype)  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(pooled)  # (B, D)
        if self.aug_embedder is not None:
            c = c + self.aug_embedder(aug_level)  # (B, D)
        if self.guidance_embedder is not None:
            c = c + self.guidance_embedder(extra[0])  # (B, D)
        marker = h.new_zeros(grid[1:] if image else grid)  # (H', W') or (F', H', W')
        return h, c.to(h.dtype), tokens, mask, marker

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
        """(B, C, [F,] H, W) -> (B, C, F, H, W); an image is held for one temporal patch."""
        if x.ndim == 5 and not self.spec.video:
            raise ValueError("a video (B, C, F, H, W) was given to an image model; set model.video=true")
        if x.ndim == 5:
            return x
        return x.unsqueeze(2).expand(-1, -1, self.spec.temporal_patch, -1, -1)  # (B, C, pt, H, W)


def upsample_like(lowres: Tensor, x: Tensor) -> Tensor:
    """Resize the low-resolution image/video to x's (F,) H, W: bilinear / trilinear."""
    if lowres.ndim != x.ndim:
        raise ValueError(f"lowres has {lowres.ndim} dims but x has {x.ndim}: both images or both videos")
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(lowres.to(x.dtype), size=x.shape[2:], mode=mode, align_corners=False)


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
    "cross-attention block", PixArt-alpha) and, in factorized video models, temporal attention."""

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

    def forward(self, state: State) -> State:
        h = self._recomputed("full", self._forward, *state)
        return (h, *state[1:])  # type: ignore[return-value]

    def _recomputed(self, policy: str, fn, *args: Tensor) -> Tensor:
        """fn(*args), its activations dropped and recomputed in backward when the block's
        checkpointing policy is `policy` (Chen et al. 2016, "Training Deep Nets with Sublinear
        Memory Cost"): "full" keeps only the block's input, "attention" each attention's input."""
        if self.spec.checkpointing == policy and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _forward(self, h: Tensor, c: Tensor, tokens: Tensor, mask: Tensor, marker: Tensor) -> Tensor:
        grid = token_grid(marker)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)  # (B, 1, D)
        x = modulate(self.norm1(h), shift1, scale1)  # (B, N, D)
        h = gated_residual(h, gate1, self._recomputed("attention", self._self_attention, x, marker))  # (B, N, D)
        if self.temporal is not None and grid[0] > 1:
            h = self._recomputed("attention", self._temporal_attention, h, c, marker)  # (B, N, D)
        elif self.temporal is not None and torch.is_grad_enabled():
            # An image batch skips temporal attention, but its parameters still get a (zero)
            # gradient: data-parallel ranks reduce the same gradients every step, and in joint
            # image-video training one rank may hold images while another holds clips.
            h = h + 0.0 * sum(p.sum() for p in self.temporal.parameters())  # (B, N, D), unchanged
        if self.cross_attn is not None:
            h = h + self._recomputed("attention", self._cross_attention, h, tokens, mask)  # (B, N, D)
        x = modulate(self.norm2(h), shift2, scale2)  # (B, N, D)
        return gated_residual(h, gate2, self.mlp(x))  # (B, N, D)

    def _self_attention(self, x: Tensor, marker: Tensor) -> Tensor:
        """Full space-time attention, or per-frame spatial attention in factorized models (over
        the whole sequence of an image, its one frame). x holds whole frames, N / (H' W') of them."""
        grid = token_grid(marker)
        if self.temporal is None or grid[0] == 1:
            return self.attn(x, self._rope(grid, "thw", x))  # (B, N, D)
        B, N, D = x.shape
        area = grid[1] * grid[2]
        out = self.attn(x.reshape(-1, area, D), self._rope(grid, "hw", x))  # (B F', S, D)
        return out.view(B, N, D)

    def _temporal_attention(self, h: Tensor, c: Tensor, marker: Tensor) -> Tensor:
        assert self.temporal is not None
        grid = token_grid(marker)
        return self.temporal(h, c, grid, self._rope(grid, "t", h))  # (B, N, D)

    def _cross_attention(self, h: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        assert self.cross_attn is not None
        return self.cross_attn(self.norm_cross(h), tokens, mask > 0.5)  # (B, N, D)

    def _rope(self, grid: Grid, axes: str, like: Tensor) -> Optional[Rope]:
        if not self.spec.rope:
            return None
        head_dim = self.spec.preset.width // self.spec.preset.heads
        return rope_table(grid, axes, head_dim, like.device, like.dtype)


class DiTHead(nn.Module):
    """Last layer: adaLN final layer (zero-initialized) and unpatchify -> x's shape."""

    def __init__(self, spec: DiTSpec):
        super().__init__()
        self.spec = spec
        width = spec.preset.width
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, spec.patch_features_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, state: State) -> Tensor:
        h, c, _, _, marker = state
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        out = self.linear(modulate(self.norm_final(h), shift, scale))  # (B, N, pt p p C_out)
        s = self.spec
        x = unpatchify(out, token_grid(marker), s.out_channels, s.preset.patch, s.temporal_patch)  # (B, C, F, H, W)
        return x.mean(dim=2) if marker.ndim == 2 else x  # an image input: (B, C, H, W)


class PipelineEmbed(nn.Module):
    """`DiTEmbed` as the first pipeline layer, its pass-through tensors tied into the graph.

    The first stage runs `backward` on every floating-point tensor it sends on
    (deepspeed/runtime/pipe/engine.py, `_exec_backward_pass`); text tokens, mask and the grid
    marker pass through untouched and would have no grad_fn, so they are tied to c at weight
    0: values unchanged, exact zero gradient contribution.
    """

    def __init__(self, embed: DiTEmbed):
        super().__init__()
        self.embed = embed

    def forward(self, inputs: Sequence[Tensor]) -> State:
        h, c, *carried = self.embed(inputs)
        tie = c.sum() * 0.0  # scalar 0 with a grad_fn
        return (h, c, *(x + tie for x in carried))


class PipelineHead(nn.Module):
    """`DiTHead` as the last pipeline layer, with the carried tensors tied in at weight 0.

    DeepSpeed's PipelineEngine marks every floating-point tensor a stage receives as requiring
    grad and sends its `.grad` back, asserting it is not None (deepspeed/runtime/pipe/engine.py,
    `_exec_send_grads`). The mask and grid marker have no differentiable use, so the last layer
    adds 0 * their sums: exact zero gradients, the prediction unchanged.
    """

    def __init__(self, head: DiTHead):
        super().__init__()
        self.head = head

    def forward(self, state: State) -> Tensor:
        tie = sum(s.sum() for s in state[1:]) * 0.0  # scalar 0
        return self.head(state) + tie


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

    def pack_inputs(
        self,
        x: Tensor,
        t: Tensor,
        text: TextEmbedding,
        *,
        lowres: Optional[Tensor] = None,
        aug_level: Optional[Tensor] = None,
        guidance: Optional[Tensor] = None,
    ) -> tuple[Tensor, ...]:
        """The first pipeline layer's input: (x, t, tokens, mask float, pooled[, lowres,
        aug_level][, guidance]); all floating point, so it can travel between stages."""
        B = x.shape[0]
        t = t.to(x.dtype).expand(B) if t.ndim == 0 else t.to(x.dtype)
        inputs = [x, t, text.tokens.to(x.dtype), text.mask.to(x.dtype), text.pooled.to(x.dtype)]
        if self.spec.superres:
            if lowres is None:
                raise ValueError("a super-resolution DiT needs `lowres`, the low-resolution input")
            level = torch.zeros_like(t) if aug_level is None else aug_level.to(x.dtype)  # None: no augmentation
            inputs += [lowres, level]
        if self.spec.guidance:
            if guidance is None:
                raise ValueError("a guidance-conditioned DiT (model.guidance_embed) needs `guidance`, shape (B,)")
            inputs.append(guidance.to(x.dtype))
        return tuple(inputs)

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
        state = self.embed(self.pack_inputs(x, t, text, lowres=lowres, aug_level=aug_level, guidance=guidance))
        for block in self.blocks:
            state = block(state)
        return self.head(state)

    def pipeline_layers(self) -> list[nn.Module]:
        """[embed, block_0, ..., block_{depth-1}, head]: composing them on `pack_inputs(...)`
        equals `forward`. Each block owns its parameters; embedders live in the first layer."""
        return [PipelineEmbed(self.embed), *self.blocks, PipelineHead(self.head)]

    def count_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def macs(self, shape: Sequence[int], text_len: int = 0) -> int:
        """Analytic forward multiply-accumulates for an input x of `shape` (B, C, [F,] H, W)
        and `text_len` text tokens: every Linear (embedders and adaLN included) and the two
        attention matmuls, as fvcore counts them for the DiT paper; norms, activations and
        softmax are not counted. Cross-attention counts when the model has it and text_len > 0.
        Training costs about 3x this (forward + backward)."""
        s, p = self.spec, self.spec.preset
        B, frames = shape[0], (shape[2] if len(shape) == 5 else s.temporal_patch)
        f, area = frames // s.temporal_patch, (shape[-2] // p.patch) * (shape[-1] // p.patch)
        N, D, hidden = f * area, p.width, int(p.width * p.mlp_ratio)
        scalars = 1 + int(s.superres) + int(s.guidance)
        total = N * s.patch_features_in * D + scalars * (FREQUENCY_DIM * D + D * D) + s.pooled_dim * D
        block = 6 * D * D + 4 * N * D * D + 2 * N * hidden * D
        if s.temporal_blocks:
            block += 2 * f * area * area * D  # spatial attention matmuls
            if f > 1:
                block += 3 * D * D + 4 * N * D * D + 2 * area * f * f * D  # temporal attention
        else:
            block += 2 * N * N * D
        if s.text_dim and text_len:
            block += 2 * N * D * D + 2 * text_len * s.text_dim * D + 2 * N * text_len * D
        total += p.depth * block + 2 * D * D + N * D * s.patch_features_out
        return B * total


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
    "PipelineHead",
    "TextEmbedding",
    "build_dit",
    "dit_preset",
    "patchify",
    "unpatchify",
]
