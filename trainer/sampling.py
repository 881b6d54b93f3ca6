"""Text -> base model -> (super-resolution stages) -> decode, as plain functions.

The network stays a plain function of (x_t, t, conditioning); guidance, parametrization and
time grids come from `trainer.diffusion`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from trainer.diffusion import SAMPLERS, NoiseSchedule, cfg_model, randn, sampling_timesteps


@dataclass
class SamplerSettings:
    steps: int = 25
    cfg_scale: float = 3.0
    guidance_rescale: float = 0.7  # Lin et al. 2023 recommend phi ~ 0.7 with zero terminal SNR
    sampler: str = "ddim"
    spacing: str = "trailing"


def text_conditioning(text_encoder: nn.Module, prompts: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Conditional and null-caption embeddings as dicts of batch-first tensors."""
    cond = text_encoder.encode(list(prompts))
    uncond = text_encoder.encode([""] * len(prompts))
    as_dict = lambda e: {"tokens": e.tokens, "mask": e.mask, "pooled": e.pooled}  # noqa: E731
    return as_dict(cond), as_dict(uncond)


def conditioned(net: nn.Module) -> Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]:
    """Adapt `net(x, t, TextEmbedding, **extras)` to the `model(x, t, cond_dict)` form of CFG."""
    from trainer.models.text import TextEmbedding

    def model(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        extras = {k: v for k, v in cond.items() if k not in ("tokens", "mask", "pooled")}
        text = TextEmbedding(tokens=cond["tokens"], mask=cond["mask"], pooled=cond["pooled"])
        return net(x, t, text, **extras)

    return model


@torch.no_grad()
def generate(
    net: nn.Module,
    text_encoder: nn.Module,
    schedule: NoiseSchedule,
    prediction: str,
    prompts: Sequence[str],
    shape: tuple[int, ...],
    settings: SamplerSettings,
    generator: torch.Generator,
    extras: Optional[dict[str, Tensor]] = None,
) -> Tensor:
    """Sample one x0 per prompt on the network's device; `shape` excludes the batch dim, e.g.
    (C, h, w) or (C, F, h, w). A CPU generator gives the same samples on every device."""
    device = next(net.parameters()).device
    cond, uncond = text_conditioning(text_encoder, prompts)
    for k, v in (extras or {}).items():
        cond[k] = uncond[k] = v.to(device)  # low-res input / aug level: the same in both CFG branches
    model = cfg_model(conditioned(net), cond, uncond, settings.cfg_scale, settings.guidance_rescale)
    x = randn((len(prompts), *shape), generator, device)
    ts = sampling_timesteps(schedule, settings.steps, settings.spacing)
    sampler = SAMPLERS[settings.sampler]
    kwargs = {"generator": generator} if settings.sampler in ("ddim", "ddpm") else {}
    return sampler(model, x, ts, schedule, prediction, **kwargs)
