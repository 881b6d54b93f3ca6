"""One rank of tests/trainer/test_ema_masters.py, under torchrun with 2 ranks over gloo: on
real DeepSpeed engines of every layout whose fp32 masters sit in a different place
(trainer/masters.py), the EMA must be, bit for bit, the average of the whole fp32 masters that
DeepSpeed's own `safe_get_full_fp32_param` gathers after each step. Prints one line per layout,
`<layout> ok <max |EMA - EMA of the module's weights|>`, and raises at the first mismatch."""
from __future__ import annotations

import torch
from torch import nn

from trainer.config import DeepSpeedConfig, EMAConfig, OptimConfig
from trainer.distributed import init_distributed
from trainer.elastic import player_weights
from trainer.ema import EMA
from trainer.masters import Masters
from trainer.optim import build_engine

STEPS = 3
LAYOUTS = {  # odd sizes: ZeRO 1-2 split a weight between the ranks, ZeRO-3 pads the last partition
    "fp32-zero0": DeepSpeedConfig(zero_stage=0),
    "bf16-zero0": DeepSpeedConfig(zero_stage=0, precision="bf16"),
    "bf16-zero1": DeepSpeedConfig(zero_stage=1, precision="bf16"),
    "bf16-zero2": DeepSpeedConfig(zero_stage=2, precision="bf16"),
    "fp32-zero2": DeepSpeedConfig(zero_stage=2),
    "bf16-zero3": DeepSpeedConfig(zero_stage=3, precision="bf16"),
    "bf16-zero2-offload": DeepSpeedConfig(zero_stage=2, precision="bf16", offload_optimizer=True),
    "bf16-zero3-offload": DeepSpeedConfig(zero_stage=3, precision="bf16", offload_optimizer=True,
                                          offload_params=True),
}


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(33, 47), nn.LayerNorm(47), nn.Linear(47, 5))


def module_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the forward pass uses, whole (gathered at ZeRO-3), in fp32."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {n: p.detach().float().clone() for n, p in module.named_parameters()}


def check(name: str, ds: DeepSpeedConfig, ctx) -> float:
    """Train STEPS steps, the EMA beside, and compare it with the average of the gathered
    masters; then a restored and a restarted EMA. Returns how far the module's weights' EMA
    would have been (0 in fp32)."""
    engine, optimizer = build_engine(network(), 1e-2, OptimConfig(), ds, 4, ctx, STEPS, torch.device("cpu"))
    module = engine.module
    names = {n: n for n, _ in module.named_parameters()}
    ema = EMA(module, EMAConfig(decay=0.7), masters=Masters(engine))
    masters = player_weights(engine, optimizer, names)
    expected = {n: t.clone() for n, t in masters.items()}
    of_weights = module_weights(module)
    dtype = next(module.parameters()).dtype
    generator = torch.Generator().manual_seed(1 + ctx.rank)
    for _ in range(STEPS):
        x = torch.randn(4, 33, generator=generator).to(dtype)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        weight = 1.0 - ema.decay()
        ema.update(module, optimizer.take_skip())
        masters, weights = player_weights(engine, optimizer, names), module_weights(module)
        for n in expected:
            expected[n].lerp_(masters[n], weight)
            of_weights[n].lerp_(weights[n], weight)
    full = ema.full_state_dict(module)
    assert not any(t.requires_grad for t in full.values()), f"{name}: the EMA is part of an autograd graph"
    for n, t in expected.items():
        assert torch.equal(full[n], t), f"{name}: the EMA of {n} is not the average of its fp32 masters"
    restored = EMA(module, EMAConfig(decay=0.7), masters=Masters(engine))
    restored.load_full_state_dict(module, full, STEPS)
    assert all(torch.equal(t, full[n]) for n, t in restored.full_state_dict(module).items()), name
    restored.restart(module)
    assert all(torch.equal(t, masters[n]) for n, t in restored.full_state_dict(module).items()), name
    # a rank that does not keep them takes part in each gather and holds none of the whole tensors
    kept = ema.full_state_dict(module, holds=ctx.rank == 0)
    assert kept == {} if ctx.rank else all(torch.equal(kept[n], full[n]) for n in full), name
    return max(float((full[n] - of_weights[n]).abs().max()) for n in full)


def main() -> None:
    ctx = init_distributed(1, 120)
    for name, ds in LAYOUTS.items():
        off = check(name, ds, ctx)
        if ctx.rank == 0:
            print(f"{name} ok {off:.3e}", flush=True)


if __name__ == "__main__":
    main()
