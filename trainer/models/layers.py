"""Building blocks of the DiT: scalar-condition embedders, fixed positions, attention, MLP.

Shapes follow facebookresearch/DiT `models.py`: B batch, N tokens, D width, H heads, Dh = D / H
head width, L text tokens, Dt text width. A token grid is always 3-D, (F', H', W') latent
patches along frames, rows and columns; an image is frame 0 of a 1-frame video, so the same
positions serve images and videos and an image checkpoint initializes a video model exactly.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Grid = tuple[int, int, int]  # (F', H', W') patches along time, height, width
Rope = tuple[Tensor, Tensor]  # (cos, sin), each (N, Dh)

FREQUENCY_DIM = 256  # DiT TimestepEmbedder.frequency_embedding_size
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as the DDPM step index t * 1000 (DiT, Ho et al.)


def timestep_embedding(v: Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of scalar conditions (Vaswani et al. 2017; DiT `TimestepEmbedder`)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=v.device) / half  # (dim/2,)
    freqs = torch.exp(-math.log(max_period) * exponent)  # (dim/2,)
    args = v.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ScalarEmbedder(nn.Module):
    """(B,) float -> (B, D): sinusoids of 1000 * value, then SiLU MLP (DiT).

    Used for the diffusion time and the noise-augmentation level of super-resolution models
    (Ho et al. 2021, "Cascaded Diffusion Models"), both in [0, 1], and the guidance scale w of
    guidance-conditioned students (Meng et al. 2023), raw (e.g. 4.5; as Flux embeds it), each
    with its own MLP.
    """

    def __init__(self, dim: int, frequency_dim: int = FREQUENCY_DIM):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, v: Tensor) -> Tensor:
        freq = timestep_embedding(v * TIME_SCALE, self.frequency_dim)  # (B, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift in one fused kernel; x (B, N, D), shift/scale (B, 1, D)."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(h: Tensor, gate: Tensor, out: Tensor) -> Tensor:
    """h + gate * out in one fused kernel (adaLN-Zero gate, Peebles & Xie 2023 §3.2)."""
    return torch.addcmul(h, gate, out)


# ---------------------------------------------------------------------------------------------
# Fixed positions. Integer patch coordinates, so a larger grid extends a smaller one: the
# positions of a 16x16 grid restricted to its top-left 8x8 are those of an 8x8 grid.


def grid_coordinates(grid: Grid, axes: str, device: torch.device) -> Tensor:
    """(N', 3) integer (frame, row, col) of the tokens an attention of kind `axes` sees.

    axes "thw": all F' H' W' tokens (full attention); "hw": the H' W' tokens of one frame
    (frame 0); "t": the F' tokens of one spatial position (row 0, col 0).
    """
    f, h, w = grid
    sizes = (f if "t" in axes else 1, h if "h" in axes else 1, w if "w" in axes else 1)
    ranges = [torch.arange(n, device=device) for n in sizes]
    return torch.stack(torch.meshgrid(*ranges, indexing="ij"), dim=-1).reshape(-1, 3)  # (N', 3)


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) positions -> (N, dim): [sin, cos] at DiT's frequencies 1 / 10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (N, dim)


@functools.lru_cache(maxsize=32)
def sincos_table(grid: Grid, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(N, D) fixed 3-D sin-cos positions, N = F' H' W' in (frame, row, col) order.

    Spatial part: exactly DiT's `get_2d_sincos_pos_embed` (first half of the width from the
    column index, second half from the row index, as its meshgrid puts w first). Temporal part:
    a 1-D sin-cos over the full width minus its value at frame 0 (as Latte adds a temporal
    embedding to the spatial one), so frame 0 - an image - gets exactly the 2-D table.
    """
    coords = grid_coordinates(grid, "thw", torch.device("cpu"))  # (N, 3)
    spatial = torch.cat([_sincos_1d(dim // 2, coords[:, 2]), _sincos_1d(dim // 2, coords[:, 1])], 1)  # (N, D)
    frame0 = _sincos_1d(dim, torch.zeros(1))  # (1, D)
    temporal = _sincos_1d(dim, coords[:, 0]) - frame0  # (N, D), zero on frame 0
    return (spatial + temporal).to(device=device, dtype=dtype)


def rope_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotary frequency pairs per axis (frame, row, col): 3/8 of the pairs to each spatial axis."""
    pairs = head_dim // 2
    spatial = pairs * 3 // 8
    return pairs - 2 * spatial, spatial, spatial


@functools.lru_cache(maxsize=64)
def rope_table(grid: Grid, axes: str, head_dim: int, device: torch.device, dtype: torch.dtype) -> Rope:
    """3-D rotary embedding (Su et al. 2021, RoFormer; per-axis split as in FiT / Lumina-T2X).

    Returns (cos, sin), each (N', Dh), for the tokens of an attention of kind `axes`
    (see `grid_coordinates`). Axes an attention does not span sit at coordinate 0, where the
    rotation is the identity; in q.k only coordinate differences matter, so this equals
    rotating with the full 3-D coordinates.
    """
    coords = grid_coordinates(grid, axes, torch.device("cpu")).double()  # (N', 3)
    angles = []
    for axis, n in enumerate(rope_pairs(head_dim)):
        freqs = 10000.0 ** (-torch.arange(n, dtype=torch.float64) / max(n, 1))  # (n,)
        angles.append(coords[:, axis : axis + 1] * freqs[None])  # (N', n)
    theta = torch.cat(angles, dim=1)  # (N', Dh/2)
    theta = torch.cat([theta, theta], dim=1)  # (N', Dh), rotate-half layout
    return theta.cos().to(device=device, dtype=dtype), theta.sin().to(device=device, dtype=dtype)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate pairs (x_i, x_{i + Dh/2}); x (..., N', Dh), cos/sin (N', Dh)."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)  # (..., N', Dh/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (..., N', Dh)
    return torch.addcmul(x * cos, rotated, sin)


# ---------------------------------------------------------------------------------------------
# Attention through torch.nn.functional.scaled_dot_product_attention. q, k, v are strided
# views of one fused projection; SDPA reads them in place (no .contiguous() copies), and its
# CPU and flash kernels write the output as (B, N, H, Dh), so the head merge is a free view.


def activation_dtype(like: Tensor) -> torch.dtype:
    """The dtype a linear layer gives for the input `like`: autocast's where it is on for that
    device (bf16, fp16), else `like`'s own."""
    device = like.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype


class HeadRMSNorm(nn.RMSNorm):
    """nn.RMSNorm in the input's dtype: its (float32) weight cast to it, and outside autocast.
    Under bf16 autocast the projections hand it bf16; with a float32 weight `torch.rms_norm`
    cannot use its fused kernel, falls back to the composite (several kernels, float32 output:
    the eager qk-norm took 36 ms of a 207 ms DiT-XL/2 step on the H200) and warns. CUDA's
    autocast also runs rms_norm in float32 (CPU's has no rule for it): q and k would reach
    attention in float32, twice the memory the plan counts and twice the bytes of the
    sequence-parallel exchange, and be cast back by attention's own rule. The fused kernel
    accumulates in float32 anyway. Same parameters, same keys."""

    def forward(self, x: Tensor) -> Tensor:  # (..., Dh) -> (..., Dh), x's dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def _qk_norm(dim: int, enabled: bool) -> nn.Module:
    """Per-head RMSNorm of queries and keys (QK-norm, Dehghani et al. 2023; SD3)."""
    return HeadRMSNorm(dim, eps=1e-6) if enabled else nn.Identity()


class Attend(nn.Module):
    """softmax(q k^T / sqrt(Dh)) v along the sequence axis (Vaswani et al. 2017), with the
    rotary positions applied first; q, k, v (B, N, H, Dh) -> (B, N, H, Dh).

    Its own module, without parameters, so that a parallelism can wrap the sequence mixing from
    outside the model: sequence parallelism (DeepSpeed-Ulysses) exchanges q, k, v and the output
    around it, so it sees every token of a subset of heads (`trainer.sequence_parallel`).
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor, rope: Optional[Rope] = None) -> Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, Dh) views
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, N, H, Dh)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, optional QK-norm and RoPE."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = _qk_norm(dim // heads, qk_norm)
        self.k_norm = _qk_norm(dim // heads, qk_norm)
        self.attend = Attend()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: Optional[Rope] = None) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.unbind(2)  # (B, N, H, Dh) each
        out = self.attend(self.q_norm(q), self.k_norm(k), v, rope)  # (B, N, H, Dh)
        return self.proj(out.reshape(B, N, D))  # (B, N, D)


class CrossAttention(nn.Module):
    """Attention from image tokens to text tokens; padding tokens (mask False) are never seen.

    Keys and values are projected straight from the text width Dt (one fused kv projection).
    """

    def __init__(self, dim: int, text_dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.q_norm = _qk_norm(dim // heads, qk_norm)
        self.k_norm = _qk_norm(dim // heads, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        B, N, D = x.shape
        L, Dh = tokens.shape[1], D // self.heads
        q = self.q_norm(self.q(x).view(B, N, self.heads, Dh)).transpose(1, 2)  # (B, H, N, Dh)
        k, v = self.kv(tokens).view(B, L, 2, self.heads, Dh).unbind(2)  # (B, L, H, Dh) each
        k = self.k_norm(k).transpose(1, 2)  # (B, H, L, Dh)
        attend = mask[:, None, None, :]  # (B, 1, 1, L), True = real token
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=attend)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Mlp(nn.Module):
    """Pointwise feed-forward with tanh-GELU, as DiT (timm Mlp, approximate="tanh")."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (B, N, D)


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


def upsample_like(lowres: Tensor, x: Tensor) -> Tensor:
    """Resize the low-resolution image/video to x's (F,) H, W: bilinear / trilinear."""
    if lowres.ndim != x.ndim:
        raise ValueError(f"lowres has {lowres.ndim} dims but x has {x.ndim}: both images or both videos")
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(lowres.to(x.dtype), size=x.shape[2:], mode=mode, align_corners=False)
