"""Which t to train on (timestep samplers) and which t to sample at (timestep spacing).

Samplers return t as (B,) float32 in the trainer's convention (t = 0 clean, t = 1 terminal).
Random draws happen on the generator's device and are then moved, so a seeded CPU generator
gives the same t on every device.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from trainer.diffusion.schedules import NoiseSchedule
from trainer.diffusion.utils import Generators, draw_device, randint, randn

if TYPE_CHECKING:
    from trainer.config import DiffusionConfig

SPACINGS = ("leading", "linspace", "trailing")
TIMESTEP_SAMPLERS = ("uniform", "logit_normal")


def sample_uniform_discrete(
    batch: int,
    num_timesteps: int,
    generator: Generators = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """i ~ U{0, ..., T-1}, returned as t = (i + 1) / T on the discrete grid (Ho et al. 2020). (B,)"""
    i = randint(num_timesteps, (batch,), generator, draw_device(generator, device))
    return ((i + 1).float() / num_timesteps).to(device or i.device)


def sample_logit_normal(
    batch: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: Generators = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """t = sigmoid(n), n ~ N(mean, std^2) (Esser et al. 2024, "Scaling Rectified Flow
    Transformers", logit-normal sampling). Continuous, in (0, 1) up to float32
    rounding of sigmoid for |n| > ~17. (B,)"""
    n = randn((batch,), generator, draw_device(generator, device))  # (B,)
    return torch.sigmoid(mean + std * n).to(device or n.device)


def sample_timesteps(
    cfg: "DiffusionConfig",
    batch: int,
    generator: Generators = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """Training timesteps as configured by `diffusion.timestep_sampler`. (B,) float32."""
    if cfg.timestep_sampler == "uniform":
        return sample_uniform_discrete(batch, cfg.num_timesteps, generator, device)
    if cfg.timestep_sampler == "logit_normal":
        return sample_logit_normal(batch, cfg.logit_normal_mean, cfg.logit_normal_std, generator, device)
    raise ValueError(
        f"unknown diffusion.timestep_sampler '{cfg.timestep_sampler}'; "
        f"use one of {', '.join(TIMESTEP_SAMPLERS)}"
    )


def sampling_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str = "trailing") -> Tensor:
    """num_steps + 1 decreasing t values for a sampler, the last one 0 (clean data).

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2,
    with 1-based table steps j (our t = j / T); for T = 1000, 10 steps:
      linspace  j = round(linspace(1, T, S))        1000, 889, ..., 112, 1
      leading   j = 1 + k * (T // S)                 901, 801, ..., 101, 1
      trailing  j = round(T - k * T / S)            1000, 900, ..., 200, 100
    Only linspace and trailing start at the terminal step t = 1; with zero terminal SNR use
    trailing (leading never sees the pure-noise step the model was trained on).
    """
    j = table_steps(schedule.num_timesteps, num_steps, spacing)  # (S,)
    t = torch.cat([j / schedule.num_timesteps, j.new_zeros(1)])  # (S + 1,), decreasing, t[-1] = 0
    return t.float()


def table_steps(num_timesteps: int, num_steps: int, spacing: str = "trailing") -> Tensor:
    """The S decreasing 1-based table steps j (float64 integers) of `sampling_timesteps`; the
    exported diffusers pipeline steps through them too (its timestep index is j - 1): the
    scheduler's own trailing grid ends in -1 at some step counts (61, 103, 121, 122 of 1000:
    float error in its arange) and picks other halves at others (48, 96, ...)."""
    n = num_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be in [1, {n}] for a {n}-step schedule, got {num_steps}")
    k = torch.arange(num_steps, dtype=torch.float64)  # (S,)
    if spacing == "linspace":
        return torch.linspace(1, n, num_steps, dtype=torch.float64).round().flip(0)
    if spacing == "leading":
        return (1 + k * (n // num_steps)).flip(0)
    if spacing == "trailing":
        return (n - k * n / num_steps).round()
    raise ValueError(f"unknown spacing '{spacing}'; use one of {', '.join(SPACINGS)}")
