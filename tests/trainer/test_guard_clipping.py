"""Gradient clipping of fp32 weights at ZeRO-0, done by the finite guard (trainer/optim.py
`clips_in_guard`): DeepSpeed's own clipping there dropped the norm, so every step logged 0."""
from __future__ import annotations

import pytest
import torch

from trainer.config import DeepSpeedConfig, OptimConfig
from trainer.optim import build_optimizer, deepspeed_dict


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
                                                                                          else (0.0, 1.0))
