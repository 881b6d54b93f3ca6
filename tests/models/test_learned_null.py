"""The learned null caption (`model.text.null=learned`, classifier-free guidance as Ho & Salimans
2022): a weight of the DiT that fills every empty-caption row, trained by CFG dropout."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.models.test_dit_model import TEXT_DIM, TEXT_LEN, POOLED_DIM, make_text, randomize_, tiny
from trainer.config import TextEncoderConfig, load_config
from trainer.models.dit import TextEmbedding

TINY_RUN = "configs/test_tiny.yaml"


def learned_tiny() -> torch.nn.Module:
    return tiny(text=TextEncoderConfig(null="learned"))


def test_learned_null_is_a_zero_initialised_weight_of_the_dit():
    net = learned_tiny()
    state = net.state_dict()
    assert state["embed.null_tokens"].shape == (1, TEXT_DIM) and state["embed.null_pooled"].shape == (POOLED_DIM,)
    assert torch.count_nonzero(state["embed.null_tokens"]) == 0 and torch.count_nonzero(state["embed.null_pooled"]) == 0
    assert {"embed.null_tokens", "embed.null_pooled"} <= {n for n, p in net.named_parameters() if p.requires_grad}
    assert "embed.null_tokens" not in tiny().state_dict()  # null=zeros: nothing to learn


def test_weights_without_the_learned_null_do_not_load():
    with pytest.raises(RuntimeError, match="embed.null_tokens"):
        learned_tiny().load_state_dict(tiny().state_dict())  # strict: never a silent zero null
    with pytest.raises(RuntimeError, match="embed.null_pooled"):
        tiny().load_state_dict(learned_tiny().state_dict())


def test_rows_without_a_real_token_get_the_learned_null():
    """A learned-null DiT on [caption; empty] equals the same weights without a learned null fed
    the null explicitly (its token first and marked real, its pooled vector); captions are unchanged."""
    net = randomize_(learned_tiny()).eval()
    plain = tiny().eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if "null" not in k})
    text = make_text(2, [4, 0])  # row 1: no real token, the encoder's empty caption
    explicit_tokens = torch.zeros(1, TEXT_LEN, TEXT_DIM)
    explicit_tokens[0, 0] = net.embed.null_tokens.detach()[0]
    explicit = TextEmbedding(
        torch.cat([text.tokens[:1], explicit_tokens]),
        torch.cat([text.mask[:1], torch.arange(TEXT_LEN)[None] < 1]),
        torch.cat([text.pooled[:1], net.embed.null_pooled.detach()[None]]),
    )
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        ours, reference = net(x, t, text), plain(x, t, explicit)
        zero_null = plain(x, t, TextEmbedding(explicit.tokens * 0, explicit.mask, explicit.pooled * 0))
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(ours[1], zero_null[1], atol=1e-3)  # the learned values matter


def stage_step(cfg_dropout: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One AdamW step of a null=learned pretrain stage (test_tiny.yaml, weights moved off the
    adaLN-Zero init so gradients reach the conditioning) on a batch of 4 with CFG dropout p:
    (null weights before, their gradients, after)."""
    from trainer.stages import build_stage

    cfg = load_config(TINY_RUN, ["model.text.null=learned"])
    cfg = replace(cfg, stage=replace(cfg.stage, cfg_dropout=cfg_dropout))  # p=1 is past validate's range
    torch.manual_seed(0)
    stage = build_stage(cfg)
    net = stage.players["student"]
    randomize_(net.blocks)
    randomize_(net.head)
    names = ("embed.null_tokens", "embed.null_pooled")
    params = dict(net.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, 16, 16, generator=g) * 2 - 1,
             "caption": ["a large red circle at the top left", "a small blue square", "a green triangle", "two shapes"]}
    (_, loss, _), = stage.losses(batch, torch.Generator().manual_seed(1))
    loss.backward()
    grads = {n: params[n].grad for n in names}
    optimizer.step()
    return before, grads, {n: params[n].detach() for n in names}


def test_cfg_dropout_trains_the_learned_null():
    before, grads, after = stage_step(1.0)  # every caption dropped
    for name in before:
        assert grads[name] is not None and torch.count_nonzero(grads[name]) > 0, name
        assert not torch.equal(before[name], after[name]), name


def test_no_cfg_dropout_leaves_the_learned_null_untouched():
    before, grads, after = stage_step(0.0)
    for name in before:
        assert grads[name] is None or torch.count_nonzero(grads[name]) == 0, name
        assert torch.equal(before[name], after[name]), name
