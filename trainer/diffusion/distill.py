"""The maths of distillation into few-step samplers, as pure functions of tensors.

Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models"): the student learns to do in ONE deterministic DDIM step what the teacher
does in several, on nested trailing grids of a zero-terminal-SNR schedule (Lin et al. 2023);
its x0 target is the x0 for which one DDIM step t -> t'' lands on the teacher's z_t'' (Alg. 2):

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

weighted by the truncated SNR max(SNR, 1) in x0 space (their sec. 4). Guided distillation
(Meng et al. 2023, "On Distillation of Guided Diffusion Models"): the teacher is sampled with
classifier-free guidance at a per-sample scale w. The adversarial stage (SDXL-Lightning, Lin et
al. 2024) uses the same student times, teacher paths and x0 regression. Imports torch only.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from trainer.diffusion.guidance import CondModel, apply_guidance
from trainer.diffusion.losses import diffusion_loss
from trainer.diffusion.parametrization import to_eps, to_x0
from trainer.diffusion.samplers import Model, ddim_step, ddim_x0_target
from trainer.diffusion.schedules import NoiseSchedule
from trainer.diffusion.timesteps import sampling_timesteps
from trainer.diffusion.utils import Generators, append_dims, draw_device, rand, randint


def draw_student_steps(num_steps: int, batch: int, generator: Generators,
                       device: Optional[torch.device] = None) -> Tensor:
    """Which step k ~ U{0, ..., N-1} of the N-step student sampler each sample trains. (B,) int64"""
    return randint(num_steps, (batch,), generator, device or draw_device(generator, None))


def student_step_times(schedule: NoiseSchedule, num_steps: int, substeps: int, k: Tensor) -> list[Tensor]:
    """Times of step k (B,) of an N-step trailing sampler, split into the `substeps` steps the
    teacher's N * substeps-step trailing sampler takes over the same interval.

    Trailing grids nest (Lin et al. 2023, Table 2): j = round(T - i T / (N s)) at i = k s is
    j = round(T - k T / N), so the first time is the student's t and the last its next time.
    Returns substeps + 1 tensors (B,), decreasing; progressive distillation uses substeps = 2.
    """
    # (N s + 1,), made on the host: copied without waiting for the device's queue
    grid = sampling_timesteps(schedule, num_steps * substeps, "trailing").to(k.device, non_blocking=True)
    return [grid[k * substeps + j] for j in range(substeps + 1)]


def ddim_from_prediction(pred: Tensor, x_t: Tensor, t: Tensor, t_next: Tensor, schedule: NoiseSchedule,
                         prediction: str) -> Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12) t -> t_next from a raw prediction at
    (x_t, t), with the eps it implies (finite at alpha = 0 for v-prediction). (B, ...)"""
    alpha, sigma = schedule.alpha_sigma(t)  # (B,), (B,)
    x0, eps = to_x0(pred, x_t, alpha, sigma, prediction), to_eps(pred, x_t, alpha, sigma, prediction)
    return ddim_step(x_t, x0, t, t_next, schedule, eps=eps)


def ddim_path(model: Model, x_t: Tensor, times: Sequence[Tensor], schedule: NoiseSchedule, prediction: str) -> Tensor:
    """Deterministic DDIM through per-sample `times` (each (B,)): x at times[-1]. (B, ...)"""
    x = x_t
    for t, t_next in zip(times[:-1], times[1:]):
        x = ddim_from_prediction(model(x, t), x, t, t_next, schedule, prediction)
    return x


def teacher_x0_target(teacher: Model, x_t: Tensor, times: Sequence[Tensor], schedule: NoiseSchedule,
                      prediction: str) -> Tensor:
    """The student's x0 target (Salimans & Ho 2022, Alg. 2): the x0 whose single DDIM step
    times[0] -> times[-1] lands where the teacher's DDIM steps through `times` land. (B, ...)"""
    x_next = ddim_path(teacher, x_t, times, schedule, prediction)  # (B, ...)
    return ddim_x0_target(x_t, x_next, times[0], times[-1], schedule)


def distill_loss(pred: Tensor, x0_target: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule,
                 prediction: str, weighting: str = "trunc_snr", gamma: float = 5.0) -> Tensor:
    """Weighted MSE of the student's raw prediction against the x0 target, carried into the
    prediction's own space (`diffusion_loss`): trunc_snr is max(SNR, 1) ||x0_hat - x~||^2
    (Salimans & Ho 2022, sec. 4); `gamma` is min_snr's (diffusion.min_snr_gamma). Needs t > 0
    (the target's eps divides by sigma). (B,)"""
    alpha, sigma = schedule.alpha_sigma(t)  # (B,), (B,)
    eps_target = to_eps(x0_target, x_t, alpha, sigma, "x0")  # (B, ...)
    return diffusion_loss(pred, x0_target, eps_target, x_t, alpha, sigma, prediction, weighting, gamma)


def guided_model(model: CondModel, cond: dict[str, Tensor], uncond: dict[str, Tensor], scale: Tensor,
                 rescale: float = 0.0) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022) at a per-sample scale w (B,), the teacher
    of guided distillation (Meng et al. 2023): one batched forward over [cond; uncond], then
    u + w (c - u) with guidance rescale (a teacher at w = 1 is called without it:
    trainer.stages.distillation.Teacher)."""

    def guided(x: Tensor, t: Tensor) -> Tensor:
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}  # (2B, ...)
        c, u = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)  # (B, ...) each
        return apply_guidance(c, u, append_dims(scale, c.ndim), rescale)  # type: ignore[arg-type]

    return guided


def valid_weight(batch: dict[str, Any], x0: Tensor) -> Tensor:
    """1 for real samples, 0 for the loader's padding repeats (`batch["valid"]`). (B,)"""
    return batch["valid"].to(x0.dtype) if "valid" in batch else x0.new_ones(x0.shape[0])


def masked_mean(per_sample: Tensor, weight: Tensor) -> Tensor:
    """Mean of a per-sample value (B,) over the samples of weight 1; scalar."""
    return (per_sample * weight).sum() / weight.sum().clamp(min=1.0)


def draw_guidance(low: float, high: float, batch: int, generator: Generators, device: torch.device) -> Tensor:
    """w ~ U[low, high] per sample (Meng et al. 2023, sec. 4). (B,)"""
    return low + (high - low) * rand((batch,), generator, device)
