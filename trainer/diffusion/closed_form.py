"""The ideal denoiser of a finite training set, a reference "network" for tests and audits.

For data {x_i} (uniform weights) and x_t = alpha x0 + sigma eps, the MMSE estimate is
    E[x0 | x_t] = sum_i w_i x_i,   w = softmax_i(-||x_t - alpha x_i||^2 / (2 sigma^2))
(Karras et al. 2022 derive it for a finite data set in their appendix). A sampler driven by
it can only reproduce training points (memorization), which checks samplers end to end.
"""
from __future__ import annotations

import torch
from torch import Tensor

from trainer.diffusion.parametrization import check_prediction, convert
from trainer.diffusion.schedules import NoiseSchedule

_SIGMA2_FLOOR = 1e-30  # at t = 0 the logits are huge but finite: softmax picks the nearest point
_ALPHA_FLOOR = 1e-30  # x_t / alpha stays finite at alpha = 0, where SNR = 0 zeroes the logits


class ClosedFormDenoiser:
    """`model(x_t, t) -> prediction` (B, ...) of the posterior mean over `data` (N, ...).

    For alpha > 0, ||x_t - alpha x_i||^2 / (2 sigma^2) = (SNR / 2) ||x_t / alpha - x_i||^2, so the
    logits are one `torch.cdist` between x_t / alpha (B, D) and the data (N, D) in float64: no
    (B, N, D) intermediate, and torch switches to a matmul form for large sets by itself.
    alpha = 0 gives SNR = 0, equal weights and the data mean (alpha is floored only inside
    x_t / alpha, where SNR = 0 then cancels it); sigma -> 0 gives the nearest point (sigma^2 is
    floored, the logits stay finite). The weighted sum runs in the data's dtype (at least
    float32): the weights, not the sum, need float64. The x0 estimate is converted to
    `prediction`; x0 -> eps / v divides by sigma, so t must be > 0 for those (samplers never
    ask at t = 0).
    """

    def __init__(self, data: Tensor, schedule: NoiseSchedule, prediction: str = "v"):
        check_prediction(prediction)
        self.data = data.detach().flatten(1).double()  # (N, D) for the logits
        self.points = data.detach().flatten(1).to(torch.promote_types(data.dtype, torch.float32))  # (N, D)
        self.sample_shape = data.shape[1:]
        self.schedule = schedule
        self.prediction = prediction

    def denoise(self, x_t: Tensor, t: Tensor) -> Tensor:
        """E[x0 | x_t] in x_t's dtype. (B, ...)"""
        if x_t.shape[1:] != self.sample_shape:
            raise ValueError(f"x_t has sample shape {tuple(x_t.shape[1:])}, data {tuple(self.sample_shape)}")
        alpha, sigma = self.schedule.alpha_sigma(t.double())  # (B,), (B,) float64
        snr = alpha.square() / sigma.square().clamp(min=_SIGMA2_FLOOR)  # (B,)
        z = x_t.flatten(1).double() / alpha.clamp(min=_ALPHA_FLOOR)[:, None]  # (B, D) x_t in data scale
        data = self.data.to(x_t.device)  # (N, D)
        logits = -0.5 * snr[:, None] * torch.cdist(z, data).square()  # (B, N)
        weights = torch.softmax(logits, dim=1)  # (B, N)
        x0 = weights.to(self.points.dtype) @ self.points.to(x_t.device)  # (B, D)
        return x0.reshape(x_t.shape).to(x_t.dtype)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        x0 = self.denoise(x_t, t)  # (B, ...)
        alpha, sigma = self.schedule.alpha_sigma(t)  # (B,), (B,)
        return convert(x0, "x0", self.prediction, x_t, alpha, sigma)


def nearest_distance(samples: Tensor, data: Tensor) -> Tensor:
    """Euclidean distance from each sample (B, ...) to its nearest data point (N, ...). (B,)"""
    points = data.flatten(1).double().to(samples.device)  # (N, D)
    return torch.cdist(samples.flatten(1).double(), points).min(dim=1).values  # (B,)

