"""Per-sample diffusion losses and their SNR weightings.

Every weighting is defined in x0 space and carried into the prediction's own space with
    ||x0_hat - x0||^2 = ||eps_hat - eps||^2 / SNR = ||v_hat - v||^2 / (SNR + 1)
(at a fixed x_t; Salimans & Ho 2022, sec. 4), so the same weighting means the same thing
whatever the network predicts:

    weighting   x0-space weight          eps                      v
    uniform     (plain MSE in the prediction's own space: weight 1)
    min_snr     min(SNR, gamma)          min(SNR, gamma) / SNR    min(SNR, gamma) / (SNR + 1)
    trunc_snr   max(SNR, 1)              max(SNR, 1) / SNR        max(SNR, 1) / (SNR + 1)

min_snr: Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy".
trunc_snr: Salimans & Ho 2022, sec. 4 ("truncated SNR weighting").

The SNR is clamped to [SNR_MIN, SNR_MAX] before weighting, so the weights stay finite at
t = 0 (SNR = inf) and at t = 1 under zero terminal SNR (SNR = 0). Only two combinations hit
the clamp as a real value: eps + trunc_snr at SNR -> 0 (weight 1 / SNR_MIN) and
x0 + trunc_snr at SNR -> inf (weight SNR_MAX); the first is refused by the config anyway
(eps-prediction with zero terminal SNR). Every other weight is bounded by max(gamma, 1).
"""
from __future__ import annotations

import torch
from torch import Tensor

from trainer.diffusion.parametrization import check_prediction, target

WEIGHTINGS = ("uniform", "min_snr", "trunc_snr")
SNR_MIN = 1e-8
SNR_MAX = 1e8


def clamped_snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """alpha^2 / sigma^2 clamped to [SNR_MIN, SNR_MAX]. (B,) float64.

    alpha and sigma are never both 0 (alpha^2 + sigma^2 = 1), so the ratio is never 0/0.
    """
    a2, s2 = alpha.double() ** 2, sigma.double() ** 2
    return (a2 / s2).clamp(SNR_MIN, SNR_MAX)  # inf at sigma = 0 clamps to SNR_MAX


def loss_weight(
    alpha: Tensor, sigma: Tensor, prediction: str, weighting: str = "uniform", gamma: float = 5.0
) -> Tensor:
    """The per-sample weight of the prediction-space MSE (see the module table). (B,) float32."""
    check_prediction(prediction)
    if weighting == "uniform":
        return torch.ones_like(alpha, dtype=torch.float32)
    snr = clamped_snr(alpha, sigma)  # (B,)
    if weighting == "min_snr":
        w_x0 = snr.clamp(max=gamma)
    elif weighting == "trunc_snr":
        w_x0 = snr.clamp(min=1.0)
    else:
        raise ValueError(f"unknown loss weighting '{weighting}'; use one of {', '.join(WEIGHTINGS)}")
    to_space = {"x0": torch.ones_like(snr), "eps": snr, "v": snr + 1}[prediction]  # (B,)
    return (w_x0 / to_space).float()


def diffusion_loss(
    pred: Tensor,
    x0: Tensor,
    eps: Tensor,
    x_t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    prediction: str,
    weighting: str = "uniform",
    gamma: float = 5.0,
) -> Tensor:
    """Weighted MSE between the network output and its target, per sample. (B,) float32.

    pred: raw network output (B, ...) in the `prediction` parametrization; x0, eps: the clean
    sample and the noise that made x_t = alpha x0 + sigma eps. The target is built from
    (x0, eps) exactly, so x_t only has its shape checked; it is part of the signature so that
    callers hand over the whole noised triple. Reduce with `.mean()` (or a masked mean).
    """
    if not (pred.shape == x0.shape == eps.shape == x_t.shape):
        raise ValueError(
            f"pred {tuple(pred.shape)}, x0 {tuple(x0.shape)}, eps {tuple(eps.shape)} and "
            f"x_t {tuple(x_t.shape)} must have the same shape"
        )
    tgt = target(prediction, x0, eps, alpha, sigma)  # (B, ...)
    mse = (pred.float() - tgt.float()).square().flatten(1).mean(dim=1)  # (B,)
    return mse * loss_weight(alpha, sigma, prediction, weighting, gamma).to(mse.device)
