"""Discriminator heads on a frozen DiT trunk (LADD / SDXL-Lightning)."""
from __future__ import annotations

import pytest
import torch

from trainer.config import ModelConfig
from trainer.models.discriminator import DiscriminatorHeads
from trainer.models.dit import TextEmbedding, build_dit


def trunk(**overrides):
    model = build_dit(ModelConfig(preset="DiT-Tiny/1", in_channels=4, **overrides), 16, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def text(batch: int) -> TextEmbedding:
    return TextEmbedding(torch.randn(batch, 5, 16), torch.ones(batch, 5, dtype=torch.bool), torch.randn(batch, 8))


@pytest.mark.parametrize("overrides,shape", [({}, (2, 4, 8, 8)), ({"video": True, "activation_checkpointing": True}, (2, 4, 3, 4, 4))])
def test_gradient_reaches_input_and_heads_but_not_trunk(overrides, shape):
    disc = DiscriminatorHeads(trunk(**overrides), block_ids=[0, 1], hidden=32)
    x_t = torch.randn(shape, requires_grad=True)
    logits = disc(x_t, torch.rand(2), text(2))
    assert logits.shape == (2, 2)
    logits.sum().backward()
    assert x_t.grad is not None and torch.count_nonzero(x_t.grad) > 0
    assert all(p.grad is None and not p.requires_grad for p in disc.trunk.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert {n.split(".")[0] for n, p in disc.named_parameters() if p.requires_grad} == {"heads"}


def test_heads_are_conditioned_on_time_and_pooled_text():
    disc = DiscriminatorHeads(trunk(), block_ids=[1], hidden=32)
    x_t, t, emb = torch.randn(1, 4, 4, 4), torch.tensor([0.3]), text(1)
    base = disc(x_t, t, emb)
    assert not torch.allclose(base, disc(x_t, torch.tensor([0.8]), emb))
    assert not torch.allclose(base, disc(x_t, t, TextEmbedding(emb.tokens, emb.mask, emb.pooled + 1)))


def test_trunk_stays_frozen_in_train_mode_and_ids_are_checked():
    disc = DiscriminatorHeads(trunk(), block_ids=[1, 0, 1])
    disc.train()
    assert disc.block_ids == [0, 1] and not disc.trunk.training and disc.heads.training
    with pytest.raises(ValueError, match="block_ids"):
        DiscriminatorHeads(trunk(), block_ids=[2])


def test_heads_embed_the_guidance_scale_only_where_the_trunk_does_not():
    disc = DiscriminatorHeads(trunk(), block_ids=[1], hidden=32, guidance=True)
    x_t, t, emb = torch.randn(1, 4, 4, 4), torch.tensor([0.3]), text(1)
    assert not torch.allclose(disc(x_t, t, emb, guidance=torch.tensor([1.0])),
                              disc(x_t, t, emb, guidance=torch.tensor([4.0])))
    with pytest.raises(ValueError, match="guidance"):
        disc(x_t, t, emb)
    with pytest.raises(ValueError, match="embeds the guidance scale already"):
        DiscriminatorHeads(trunk(guidance_embed=True), block_ids=[1], guidance=True)
