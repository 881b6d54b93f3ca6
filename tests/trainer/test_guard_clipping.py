"""Gradient clipping of fp32 weights at ZeRO-0, done by the finite guard (trainer/optim.py
`clips_in_guard`): DeepSpeed's own clipping there dropped the norm, so every step logged 0; and
without clipping (optim.grad_clip=0) DeepSpeed computed none, so every step logged 0 too."""
from __future__ import annotations

import pytest
import torch

from tests.trainer.harness import one_rank_group
from trainer.config import DeepSpeedConfig, OptimConfig
from trainer.optim import build_engine, build_optimizer, deepspeed_dict


def test_the_guard_clips_to_the_norm_and_keeps_it_for_the_engine():
    w = torch.nn.Parameter(torch.zeros(4))
    optimizer = build_optimizer([w], 0.1, OptimConfig(grad_clip=1.0, weight_decay=0.0), DeepSpeedConfig(zero_stage=0),
                                torch.device("cpu"))
    w.grad = torch.tensor([6.0, 8.0, 0.0, 0.0])  # norm 10
    optimizer.step()
    assert float(optimizer._global_grad_norm) == pytest.approx(10.0)  # before clipping, as DeepSpeed reports it
    assert torch.allclose(w.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), atol=1e-5)  # clipped to norm 1


@pytest.mark.parametrize("zero, precision, in_guard", [(0, "fp32", True), (0, "bf16", False), (2, "fp32", False)])
def test_one_of_the_guard_and_deepspeed_clips(zero, precision, in_guard):
    ds, optim = DeepSpeedConfig(zero_stage=zero, precision=precision), OptimConfig(grad_clip=1.0)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], 0.1, optim, ds, torch.device("cpu"))
    assert (optimizer.clip_norm, deepspeed_dict(ds, optim, 2, 1)["gradient_clipping"]) == ((1.0, 0.0) if in_guard
                                                                                          else (None, 1.0))


@pytest.mark.parametrize("zero", [0, 2])
def test_the_engine_reports_the_norm_with_clipping_off(zero):
    """optim.grad_clip=0: a real engine's logged norm (`Trainer.optimizer_metrics`) is the
    gradient's, at ZeRO-0 (the guard's) as at ZeRO-2 (DeepSpeed's), not None (logged as 0)."""
    with one_rank_group() as ctx:
        module = torch.nn.Linear(4, 1)
        with torch.no_grad():
            module.weight.fill_(1.0)
            module.bias.fill_(0.0)
        engine, _ = build_engine(module, 0.0, OptimConfig(grad_clip=0.0), DeepSpeedConfig(zero_stage=zero), 2, ctx,
                                 4, torch.device("cpu"))
        engine.backward(engine(torch.ones(2, 4)).square().mean())  # d/dw (w.x + b)^2 = 2 (w.x + b) x = 8 x
        engine.step()
        assert engine.get_global_grad_norm() == pytest.approx(8 * 5 ** 0.5)  # |8 (1, 1, 1, 1, 1)|


def test_fp16_overflows_are_the_loss_scalers_search_until_near_its_floor():
    """A skip of an engine with DeepSpeed's dynamic loss scaler counts as its search for a scale
    while it can halve twice more (DeepSpeed raises at an overflow at its minimum; the stop,
    read a step late, must come first); a static scaler (bf16) or none never searches."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    from trainer.engine import searching_loss_scale

    scaler = DynamicLossScaler(init_scale=2.0**12, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)  # as deepspeed_dict's fp16 section makes it
    engine = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler))
    searching = []
    with one_rank_group():  # the scaler logs on rank 0
        for _ in range(12):
            scaler.update_scale(True)  # an overflow: hysteresis first, then half the scale
            searching.append((scaler.cur_scale, searching_loss_scale(engine)))
    assert searching[:2] == [(4096.0, True), (2048.0, True)]
    assert searching[-3:] == [(8.0, True), (4.0, True), (2.0, False)]
    assert not searching_loss_scale(SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=LossScaler(1.0))))
    assert not searching_loss_scale(SimpleNamespace(optimizer=object()))


def test_a_stop_on_an_fp16_forward_overflow_points_to_bf16_not_the_learning_rate():
    """The loss scale keeps the backward in fp16's range, not the forward: a run whose loss
    itself was inf or NaN (activations past 65504) searched down to the scale's floor and was
    then told to lower the learning rate. The skipped players' forward metrics decide (over the
    ranks); a finite loss with overflowing gradients keeps the learning-rate advice."""
    from trainer.engine import forward_nonfinite, nonfinite_advice

    inf = torch.tensor(float("inf"))
    infos = [("student", {"loss": (torch.tensor(0.5), torch.tensor(4.0)), "loss_t0": (0.0, 0.0)}),
             ("discriminator", {"d_loss": (inf, torch.tensor(4.0))})]
    with one_rank_group():
        assert not forward_nonfinite(infos, ["student"])
        assert forward_nonfinite(infos, ["discriminator"])
        assert forward_nonfinite([("student", {"loss": float("nan")})], ["student"])
        assert not forward_nonfinite([], ["student"])  # a pipeline stage before the last: no loss here
    assert "bf16" in nonfinite_advice("fp16", True) and "learning rate" not in nonfinite_advice("fp16", True)
    assert "learning rate" in nonfinite_advice("fp16", False) and "learning rate" in nonfinite_advice("bf16", True)
