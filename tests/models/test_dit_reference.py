"""The DiT against a straightforward reference written token by token from the papers: DiT's
patch order and 2-D sin-cos table (Peebles & Xie 2023), adaLN-Zero (shift, scale, gate of the
attention, then of the MLP), RoPE rotating pairs (i, i + Dh/2) by per-axis angles, factorized
attention as per-frame spatial then per-position temporal attention (Latte), cross-attention
with -inf on padding, the learned null, super-resolution's upsampled input. On non-square grids
with patch 2 and temporal patch 2, where a swapped row/col or frame/row order would show."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.models.test_dit_model import POOLED_DIM, TEXT_DIM, make_text, randomize_
from trainer.config import ModelConfig, TextEncoderConfig
from trainer.models.dit import build_dit
from trainer.models.layers import rope_pairs
from trainer.models.presets import DiTPreset

PRESET = DiTPreset(depth=2, width=64, heads=4, patch=2)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


def scalar_embedding(embedder: torch.nn.Module, v: torch.Tensor) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    args = (v * 1000)[:, None] * freqs[None]
    return embedder.mlp(torch.cat([args.cos(), args.sin()], -1))


def rotate(x: torch.Tensor, coords: torch.Tensor, head_dim: int) -> torch.Tensor:
    angles = []
    for axis, n in enumerate(rope_pairs(head_dim)):
        freqs = 10000.0 ** (-torch.arange(n, dtype=torch.float64) / max(n, 1))
        angles.append(coords[:, axis: axis + 1].double() * freqs[None])
    theta = torch.cat(angles, 1).float()  # (N, Dh/2)
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
    return torch.cat([x1 * theta.cos() - x2 * theta.sin(), x2 * theta.cos() + x1 * theta.sin()], -1)


def attention(q, k, v, mask=None):  # (B, H, N, Dh)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def self_attention(m, x, coords, rope):
    B, N, D = x.shape
    Dh = D // m.heads
    q, k, v = m.qkv(x).view(B, N, 3, m.heads, Dh).unbind(2)
    q, k, v = m.q_norm(q).transpose(1, 2), m.k_norm(k).transpose(1, 2), v.transpose(1, 2)
    if rope:
        q, k = rotate(q, coords, Dh), rotate(k, coords, Dh)
    return m.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def reference(model, x, t, text, lowres=None, aug_level=None):
    s, D = model.spec, model.spec.preset.width
    p, pt = s.preset.patch, s.temporal_patch
    image = x.ndim == 4
    tokens, mask, pooled = text.tokens.clone(), text.mask.clone(), text.pooled.clone()
    if s.learned_null:
        for b in range(x.shape[0]):
            if not mask[b].any():
                tokens[b], mask[b, 0], pooled[b] = 0, True, model.embed.null_pooled
                tokens[b, 0] = model.embed.null_tokens[0]
    if s.superres:
        x = torch.cat([x, F.interpolate(lowres, size=x.shape[2:], mode="bilinear" if image else "trilinear")], 1)
    video = x.unsqueeze(2).expand(-1, -1, pt, -1, -1) if image else x
    B, _, frames, H, W = video.shape
    grid = (frames // pt, H // p, W // p)
    coords = torch.tensor([(f, i, j) for f in range(grid[0]) for i in range(grid[1]) for j in range(grid[2])])
    patches = torch.stack([video[:, :, f * pt:(f + 1) * pt, i * p:(i + 1) * p, j * p:(j + 1) * p]
                           .permute(0, 2, 3, 4, 1).reshape(B, -1) for f, i, j in coords.tolist()], 1)
    h = model.embed.x_embedder(patches)
    if not s.rope:
        spatial = torch.cat([sincos_1d(D // 2, coords[:, 2]), sincos_1d(D // 2, coords[:, 1])], 1)
        h = h + (spatial + sincos_1d(D, coords[:, 0]) - sincos_1d(D, torch.zeros(1))).float()
    c = scalar_embedding(model.embed.t_embedder, t) + model.embed.pooled_embedder(pooled)
    if s.superres:
        c = c + scalar_embedding(model.embed.aug_embedder, aug_level)
    for block in model.blocks:
        shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c)[:, None].chunk(6, -1)
        x1 = layer_norm(h) * (1 + scale1) + shift1
        if block.temporal is None or grid[0] == 1:
            out = self_attention(block.attn, x1, coords, s.rope)
        else:
            out = torch.zeros_like(x1)
            for f in range(grid[0]):  # each frame alone, at frame coordinate 0
                idx = (coords[:, 0] == f).nonzero()[:, 0]
                out[:, idx] = self_attention(block.attn, x1[:, idx], coords[idx] * torch.tensor([0, 1, 1]), s.rope)
        h = h + gate1 * out
        if block.temporal is not None and grid[0] > 1:
            shift, scale, gate = block.temporal.adaLN_modulation(c)[:, None].chunk(3, -1)
            xt = layer_norm(h) * (1 + scale) + shift
            out = torch.zeros_like(xt)
            for i in range(grid[1]):
                for j in range(grid[2]):  # each spatial position alone, along the frames
                    idx = ((coords[:, 1] == i) & (coords[:, 2] == j)).nonzero()[:, 0]
                    out[:, idx] = self_attention(block.temporal.attn, xt[:, idx], coords[idx] * torch.tensor([1, 0, 0]), s.rope)
            h = h + gate * out
        cross, heads = block.cross_attn, block.cross_attn.heads
        q = cross.q_norm(cross.q(block.norm_cross(h)).view(B, h.shape[1], heads, -1)).transpose(1, 2)
        k, v = cross.kv(tokens).view(B, tokens.shape[1], 2, heads, -1).unbind(2)
        out = attention(q, cross.k_norm(k).transpose(1, 2), v.transpose(1, 2), mask[:, None, None, :])
        h = h + cross.proj(out.transpose(1, 2).reshape(B, h.shape[1], D))
        h = h + gate2 * block.mlp(layer_norm(h) * (1 + scale2) + shift2)
    shift, scale = model.head.adaLN_modulation(c)[:, None].chunk(2, -1)
    out = model.head.linear(layer_norm(h) * (1 + scale) + shift)
    y = torch.zeros(B, s.out_channels, frames, H, W)
    for n, (f, i, j) in enumerate(coords.tolist()):
        y[:, :, f * pt:(f + 1) * pt, i * p:(i + 1) * p, j * p:(j + 1) * p] = \
            out[:, n].reshape(B, pt, p, p, s.out_channels).permute(0, 4, 1, 2, 3)
    return y.mean(2) if image else y


@pytest.mark.parametrize("overrides,shape", [
    ({"positions": "sincos", "learn_sigma": True}, (2, 4, 8, 12)),
    ({"positions": "rope"}, (2, 4, 12, 8)),
    ({"video": True, "temporal_patch": 2, "positions": "rope"}, (2, 4, 4, 6, 10)),
    ({"video": True, "temporal_patch": 2, "positions": "sincos"}, (2, 4, 6, 4, 6)),
    ({"video": True, "attention": "full", "positions": "rope"}, (2, 4, 3, 4, 6)),
    ({"video": True, "attention": "full", "temporal_patch": 2, "positions": "sincos"}, (2, 4, 4, 6, 4)),
    ({"video": True, "temporal_patch": 2, "positions": "rope"}, (2, 4, 6, 10)),  # an image in a video model
])
def test_dit_equals_the_token_by_token_reference(overrides, shape):
    model = randomize_(build_dit(ModelConfig(preset="DiT-Tiny/1", in_channels=4, **overrides), TEXT_DIM, POOLED_DIM,
                                 preset=PRESET))
    x, t, text = torch.randn(shape), torch.rand(2), make_text(2, [3, 5])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text), reference(model, x, t, text), rtol=1e-4, atol=1e-4)


def test_superres_and_learned_null_equal_the_reference():
    cfg = ModelConfig(preset="DiT-Tiny/1", in_channels=4, superres=True, text=TextEncoderConfig(null="learned"))
    model = randomize_(build_dit(cfg, TEXT_DIM, POOLED_DIM, preset=PRESET))
    x, low, t, level = torch.randn(3, 4, 8, 12), torch.randn(3, 4, 4, 6), torch.rand(3), torch.rand(3)
    text = make_text(3, [3, 0, 6])  # the middle caption is empty: the learned null fills it
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text, lowres=low, aug_level=level),
                                   reference(model, x, t, text, lowres=low, aug_level=level), rtol=1e-4, atol=1e-4)
