"""What the network predicts: eps, x0 or v, and exact conversions between them.

x_t = alpha x0 + sigma eps with alpha^2 + sigma^2 = 1, and (Salimans & Ho 2022, "Progressive
Distillation for Fast Sampling of Diffusion Models", sec. 4)

    v   = alpha eps - sigma x0
    x0  = alpha x_t - sigma v          eps = sigma x_t + alpha v
    x0  = (x_t - sigma eps) / alpha    eps = (x_t - alpha x0) / sigma
    v   = (eps - sigma x_t) / alpha    v   = (alpha x_t - x0) / sigma

v is the default: it is defined everywhere, including t = 1 under zero terminal SNR.
Conversions that divide by alpha (from eps) are undefined where alpha = 0 (pure noise: eps is
the input itself and says nothing about x0), those that divide by sigma (from x0 to eps or v)
where sigma = 0 (t = 0). Both raise `ValueError` there instead of returning inf/NaN; samplers
never evaluate the network at t = 0, and eps-prediction with zero terminal SNR is refused by
the config. alpha, sigma are (B,) and broadcast over the trailing dims of the (B, ...) tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from trainer.diffusion.utils import coef

PREDICTIONS = ("eps", "x0", "v")


def check_prediction(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction '{kind}'; use one of {', '.join(PREDICTIONS)}")


_ZERO_AT = {"alpha": "t = 1 under zero terminal SNR", "sigma": "t = 0"}


def _divisor(d: Tensor, like: Tensor, name: str, what: str) -> Tensor:
    """d shaped for `like`, after checking that no sample divides by zero (on an accelerator
    with a device-side assert, so that the step does not wait for the device)."""
    message = (f"{what} divides by {name}, which is 0 at {_ZERO_AT[name]}; "
               "use v-prediction (defined everywhere) or do not convert at that t")
    if d.device.type != "cpu":
        torch._assert_async((d != 0).all(), message)
    elif bool((d == 0).any()):
        raise ValueError(message)
    return coef(d, like)


def to_x0(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """The x0 implied by a `kind` prediction at x_t. (B, ...)"""
    check_prediction(kind)
    if kind == "x0":
        return pred
    if kind == "v":
        return coef(alpha, x_t) * x_t - coef(sigma, pred) * pred
    return (x_t - coef(sigma, pred) * pred) / _divisor(alpha, x_t, "alpha", "eps -> x0")


def to_eps(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """The eps implied by a `kind` prediction at x_t. (B, ...)"""
    check_prediction(kind)
    if kind == "eps":
        return pred
    if kind == "v":
        return coef(sigma, x_t) * x_t + coef(alpha, pred) * pred
    return (x_t - coef(alpha, pred) * pred) / _divisor(sigma, x_t, "sigma", "x0 -> eps")


def to_v(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """The v implied by a `kind` prediction at x_t. (B, ...)"""
    check_prediction(kind)
    if kind == "v":
        return pred
    if kind == "eps":
        return (pred - coef(sigma, x_t) * x_t) / _divisor(alpha, x_t, "alpha", "eps -> v")
    return (coef(alpha, x_t) * x_t - pred) / _divisor(sigma, x_t, "sigma", "x0 -> v")


_CONVERTERS = {"x0": to_x0, "eps": to_eps, "v": to_v}


def convert(pred: Tensor, from_kind: str, to_kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """A `from_kind` prediction at x_t expressed as a `to_kind` prediction. (B, ...)"""
    check_prediction(to_kind)
    return _CONVERTERS[to_kind](pred, x_t, alpha, sigma, from_kind)


def target(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of a `kind` network for x_t = alpha x0 + sigma eps. (B, ...)

    Built from (x0, eps) directly, so it is exact at every t, t = 0 and t = 1 included.
    """
    check_prediction(kind)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    return coef(alpha, eps) * eps - coef(sigma, x0) * x0
