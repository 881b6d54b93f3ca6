"""Text -> base model -> (super-resolution stages) -> decode, as plain functions.

The network stays a plain function of (x_t, t, conditioning); guidance, parametrization and
time grids come from `trainer.diffusion`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from trainer.diffusion import SAMPLERS, NoiseSchedule, SamplerSettings, cfg_model, randn, sampling_timesteps
from trainer.diffusion.utils import Generators
from trainer.models.text import conditioned, text_conditioning


@torch.no_grad()
def generate(
    net: nn.Module,
    text_encoder: nn.Module,
    schedule: NoiseSchedule,
    prediction: str,
    prompts: Sequence[str],
    shape: tuple[int, ...],
    settings: SamplerSettings,
    generator: Generators,
    extras: Optional[dict[str, Tensor]] = None,
) -> Tensor:
    """Sample one x0 per prompt on the network's device; `shape` excludes the batch dim, e.g.
    (C, h, w) or (C, F, h, w).

    `generator`: one for the batch, whose draws (initial noise, then DDPM/DDIM-eta step noise)
    are split over the batch in order, so a prompt's sample depends on its batch; or a list, one
    per prompt (trainer.diffusion.noise), so that each prompt's noise is its own whatever shares
    its batch (`trainer.cascade.PromptSeeds`). Draws happen on the generators' device and are
    moved to the network's: CPU generators give the same samples on every device."""
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
