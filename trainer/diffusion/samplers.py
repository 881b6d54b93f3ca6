"""Samplers, one free function each, in the style of k-diffusion `sampling.py`.

Every sampler takes the network as a plain callable `model(x_t, t) -> raw prediction` in the
`prediction` parametrization (condition and guidance are closed over by the caller, see
`guidance.cfg_model`), the initial noise `x` (B, ...), and `ts`: the decreasing times from
`timesteps.sampling_timesteps`, ending at 0. The network is evaluated at ts[:-1] only, never at
t = 0, and each sampler returns the final x0 estimate. Starting at t = 1 under zero terminal
SNR is supported everywhere: alpha = 0 there, so x is pure noise, x0 = mean prediction and
eps = x, and every update below stays finite (needs v- or x0-prediction: eps cannot give x0).

Step coefficients come from the schedule in float64 once per call; x stays in its own dtype
(at least float32). `callback(dict(i, t, x, denoised))` is called after each step, and
`progress=True` shows a tqdm bar (tqdm is imported only then).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from trainer.diffusion.parametrization import to_eps, to_x0
from trainer.diffusion.schedules import NoiseSchedule
from trainer.diffusion.utils import batch_t, coef, randn_like

Model = Callable[[Tensor, Tensor], Tensor]
Callback = Optional[Callable[[dict[str, Any]], None]]


class _Grid:
    """alpha, sigma and half log-SNR lambda = log(alpha / sigma) at each t of ts, as floats."""

    def __init__(self, ts: Tensor, schedule: NoiseSchedule):
        if ts.ndim != 1 or ts.numel() < 2 or float(ts[-1]) != 0.0 or not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError("ts must be 1-d, strictly decreasing and end at 0 (see sampling_timesteps)")
        t64 = ts.detach().double().cpu()  # (S + 1,)
        alpha, sigma = schedule.alpha_sigma(t64)
        self.t: list[float] = t64.tolist()
        self.alpha: list[float] = alpha.tolist()
        self.sigma: list[float] = sigma.tolist()
        self.lam: list[float] = (schedule.log_snr(t64) / 2).tolist()  # -inf at alpha = 0

    def __len__(self) -> int:
        return len(self.t) - 1


def _steps(n: int, progress: bool) -> Iterable[int]:
    if not progress:
        return range(n)
    from tqdm.auto import tqdm  # optional display only; this package otherwise imports torch only

    return tqdm(range(n))


def _denoise(model: Model, x: Tensor, grid: _Grid, i: int, prediction: str) -> tuple[Tensor, Tensor]:
    """Evaluate the network at grid point i: (x0, eps) estimates, each (B, ...)."""
    t = batch_t(grid.t[i], x)  # (B,)
    alpha, sigma = torch.full_like(t, grid.alpha[i]), torch.full_like(t, grid.sigma[i])  # (B,), (B,)
    pred = model(x, t)  # (B, ...)
    return to_x0(pred, x, alpha, sigma, prediction), to_eps(pred, x, alpha, sigma, prediction)


def _report(callback: Callback, i: int, t: float, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "denoised": denoised})


def ddim_step(
    x_t: Tensor,
    x0_pred: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    schedule: NoiseSchedule,
    eps: Optional[Tensor] = None,
    eta: float = 0.0,
    noise: Optional[Tensor] = None,
) -> Tensor:
    """One DDIM update t -> t_next < t (Song et al. 2021, "Denoising Diffusion Implicit
    Models", eq. 12 and 16): x_next = alpha' x0 + sqrt(sigma'^2 - c^2) eps + c noise,
    c = eta (sigma' / sigma) sqrt(1 - alpha^2 / alpha'^2).

    t, t_next: scalars or (B,) (per-sample steps, as progressive distillation uses). eps
    defaults to (x_t - alpha x0) / sigma, which needs t > 0; pass the eps implied by the
    network's own prediction when you have it. eta > 0 needs `noise` (B, ...).
    """
    t, t_next = batch_t(t, x_t), batch_t(t_next, x_t)  # (B,), (B,)
    alpha, sigma = schedule.alpha_sigma(t.double())  # (B,), (B,)
    alpha_n, sigma_n = schedule.alpha_sigma(t_next.double())
    if eps is None:
        eps = to_eps(x0_pred, x_t, alpha, sigma, "x0")
    if eta == 0.0:
        return coef(alpha_n, x0_pred) * x0_pred + coef(sigma_n, eps) * eps
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    c2 = (eta * sigma_n / sigma) ** 2 * (1 - (alpha / alpha_n) ** 2)  # (B,)
    direction = (sigma_n**2 - c2).clamp(min=0).sqrt()  # (B,)
    return coef(alpha_n, x0_pred) * x0_pred + coef(direction, eps) * eps + coef(c2.sqrt(), noise) * noise


def ddim_x0_target(
    x_t: Tensor, x_next: Tensor, t: Tensor | float, t_next: Tensor | float, schedule: NoiseSchedule
) -> Tensor:
    """The x0 for which one deterministic DDIM step from (x_t, t) lands on (x_next, t_next).

    Inverse of `ddim_step(eta=0)`; the student target of progressive distillation (Salimans &
    Ho 2022, Alg. 2): x0 = (x'' - (sigma'' / sigma) x_t) / (alpha'' - (sigma'' / sigma) alpha).
    Finite at alpha = 0 (the denominator is then alpha'' > 0). (B, ...)
    """
    t, t_next = batch_t(t, x_t), batch_t(t_next, x_t)  # (B,), (B,)
    alpha, sigma = schedule.alpha_sigma(t.double())
    alpha_n, sigma_n = schedule.alpha_sigma(t_next.double())
    ratio = sigma_n / sigma  # (B,)
    return (x_next - coef(ratio, x_t) * x_t) / coef(alpha_n - ratio * alpha, x_t)


@torch.no_grad()
def sample_ddpm(
    model: Model,
    x: Tensor,
    ts: Tensor,
    schedule: NoiseSchedule,
    prediction: str,
    generator: Optional[torch.Generator] = None,
    callback: Callback = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 6-7),
    on any decreasing subset of times as in Nichol & Dhariwal 2021 (sec. 4): draw x_s from the
    posterior q(x_s | x_t, x0_hat) with, for a_ts = alpha_t / alpha_s and
    s2_ts = sigma_t^2 - a_ts^2 sigma_s^2,
        mean = (a_ts sigma_s^2 / sigma_t^2) x_t + (alpha_s s2_ts / sigma_t^2) x0_hat,
        var  = s2_ts sigma_s^2 / sigma_t^2.
    At alpha_t = 0 this is alpha_s x0_hat + sigma_s z; the last step (s = 0) returns x0_hat.
    """
    grid = _Grid(ts, schedule)
    for i in _steps(len(grid), progress):
        x0, _ = _denoise(model, x, grid, i, prediction)
        a_t, s_t, a_s, s_s = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
        a_ts = a_t / a_s
        s2_ts = s_t**2 - a_ts**2 * s_s**2
        x = (a_ts * s_s**2 / s_t**2) * x + (a_s * s2_ts / s_t**2) * x0
        if grid.t[i + 1] > 0:
            x = x + math.sqrt(max(s2_ts, 0.0) * s_s**2 / s_t**2) * randn_like(x, generator)
        _report(callback, i, grid.t[i], x, x0)
    return x


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: Tensor,
    ts: Tensor,
    schedule: NoiseSchedule,
    prediction: str,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Callback = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"): `ddim_step` along ts.

    eta = 0 is the deterministic probability-flow sampler; eta = 1 draws from the DDPM
    posterior (it equals `sample_ddpm` for the same generator). Noise is drawn only for steps
    that end at t > 0.
    """
    grid = _Grid(ts, schedule)
    for i in _steps(len(grid), progress):
        x0, eps = _denoise(model, x, grid, i, prediction)
        step_eta = eta if grid.t[i + 1] > 0 else 0.0  # the noise term vanishes at t' = 0
        noise = randn_like(x, generator) if step_eta > 0 else None
        x = ddim_step(x, x0, grid.t[i], grid.t[i + 1], schedule, eps=eps, eta=step_eta, noise=noise)
        _report(callback, i, grid.t[i], x, x0)
    return x


@torch.no_grad()
def sample_euler(
    model: Model,
    x: Tensor,
    ts: Tensor,
    schedule: NoiseSchedule,
    prediction: str,
    callback: Callback = None,
    progress: bool = False,
) -> Tensor:
    """Euler steps (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
    Generative Models", Alg. 1 without the Heun correction) on the probability-flow ODE.

    k-diffusion integrates in x / alpha against sigma / alpha, which is infinite at alpha = 0.
    We use the rectified-flow coordinates instead (Liu et al. 2022; Esser et al. 2024):
        y = x / (alpha + sigma),   s = sigma / (alpha + sigma) in [0, 1],   y = (1 - s) x0 + s eps,
    so dy/ds = eps - x0 and y_next = y + (s_next - s)(eps - x0). alpha + sigma >= 1, so every
    step, t = 1 included, is finite; the last step (s = 0) returns x0. For a single step these
    coordinates are linear in s, so the Euler update coincides with deterministic DDIM (Karras
    et al. 2022 remark the same for their coordinates); it is kept as its own
    integrator for users who ask for "euler" and as an independent check of DDIM.
    """
    grid = _Grid(ts, schedule)
    for i in _steps(len(grid), progress):
        x0, eps = _denoise(model, x, grid, i, prediction)
        norm, norm_n = grid.alpha[i] + grid.sigma[i], grid.alpha[i + 1] + grid.sigma[i + 1]
        s, s_n = grid.sigma[i] / norm, grid.sigma[i + 1] / norm_n
        y = x / norm + (s_n - s) * (eps - x0)  # (B, ...) rectified-flow coordinates at s_next
        x = y * norm_n
        _report(callback, i, grid.t[i], x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model,
    x: Tensor,
    ts: Tensor,
    schedule: NoiseSchedule,
    prediction: str,
    callback: Callback = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", Alg. 2), data-prediction multistep form in the half
    log-SNR lambda = log(alpha / sigma), h = lambda' - lambda:
        x' = (sigma' / sigma) x - alpha' expm1(-h) D,
        D = x0_i (first order)  or  (1 + 1 / 2r) x0_i - (1 / 2r) x0_{i-1}, r = h_{i-1} / h.
    The first step is first order; so is a step whose previous h is infinite (the step from
    t = 1 under zero SNR, lambda = -inf: the first-order step is then exactly DDIM, with
    expm1(-inf) = -1 and no NaN); the last step (t' = 0, lambda' = +inf) returns x0 as in
    k-diffusion.
    """
    grid = _Grid(ts, schedule)
    x0_prev: Optional[Tensor] = None
    h_prev = math.inf
    for i in _steps(len(grid), progress):
        x0, _ = _denoise(model, x, grid, i, prediction)
        if grid.t[i + 1] == 0:
            x = x0
        else:
            h = grid.lam[i + 1] - grid.lam[i]  # > 0; inf when alpha_i = 0
            d = x0
            if x0_prev is not None and math.isfinite(h_prev):
                half_r = h / (2 * h_prev)  # 1 / (2 r)
                d = (1 + half_r) * x0 - half_r * x0_prev
            x = (grid.sigma[i + 1] / grid.sigma[i]) * x - grid.alpha[i + 1] * math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        _report(callback, i, grid.t[i], x, x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "dpmpp2m": sample_dpmpp_2m,
}


@dataclass
class SamplerSettings:
    """How to sample: steps on the `spacing` grid, the sampler, the CFG scale and its rescale."""

    steps: int = 25
    cfg_scale: float = 3.0
    guidance_rescale: float = 0.7  # Lin et al. 2023 recommend phi ~ 0.7 with zero terminal SNR
    sampler: str = "ddim"
    spacing: str = "trailing"
