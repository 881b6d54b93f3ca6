"""Diffusion maths shared by training, sampling and distillation: schedules (zero terminal SNR,
SNR shift), eps/x0/v parametrizations, losses and weightings, timestep samplers, samplers,
classifier-free guidance and the closed-form ideal denoiser. Imports torch only.

Time convention: t in [0, 1], (B,) float tensors; t = 0 is clean data, t = 1 the terminal step;
table index i of a T-step schedule sits at t = (i + 1) / T.
"""
from trainer.diffusion.closed_form import ClosedFormDenoiser, nearest_distance
from trainer.diffusion.guidance import apply_guidance, cfg_model
from trainer.diffusion.losses import WEIGHTINGS, clamped_snr, diffusion_loss, loss_weight
from trainer.diffusion.parametrization import (
    PREDICTIONS,
    check_prediction,
    convert,
    target,
    to_eps,
    to_v,
    to_x0,
)
from trainer.diffusion.samplers import (
    SAMPLERS,
    SamplerSettings,
    ddim_step,
    ddim_x0_target,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
)
from trainer.diffusion.schedules import (
    SCHEDULES,
    NoiseSchedule,
    add_noise,
    alphas_cumprod,
    cosine_betas,
    linear_betas,
    make_betas,
    make_schedule,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    schedule_for_shape,
    shape_size,
    snr_shift,
)
from trainer.diffusion.timesteps import (
    SPACINGS,
    sample_logit_normal,
    sample_timesteps,
    sample_uniform_discrete,
    sampling_timesteps,
)
from trainer.diffusion.utils import append_dims, rand, randint, randn

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "SamplerSettings",
    "SPACINGS",
    "WEIGHTINGS",
    "ClosedFormDenoiser",
    "NoiseSchedule",
    "add_noise",
    "alphas_cumprod",
    "append_dims",
    "rand",
    "randint",
    "randn",
    "apply_guidance",
    "cfg_model",
    "check_prediction",
    "clamped_snr",
    "convert",
    "cosine_betas",
    "ddim_step",
    "ddim_x0_target",
    "diffusion_loss",
    "linear_betas",
    "loss_weight",
    "make_betas",
    "make_schedule",
    "nearest_distance",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_logit_normal",
    "sample_timesteps",
    "sample_uniform_discrete",
    "sampling_timesteps",
    "scaled_linear_betas",
    "schedule_for_shape",
    "shape_size",
    "snr_shift",
    "target",
    "to_eps",
    "to_v",
    "to_x0",
]
